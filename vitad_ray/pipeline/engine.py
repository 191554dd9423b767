"""The engine (anomalib's ``Engine``): embed -> fit -> score -> evaluate, for every backbone and
recipe, with plain arguments. `vitad evaluate` and `vitad demo` are this and nothing more; the
other commands call its steps (``feature_choices``, ``fit_settings``) one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


def feature_choices(backbones: list[str], weights: list[str | None] | None,
                    image_size: int | None, layers: str | None, recipes=None) -> list:
    """The backbones to embed with and their features: ``image_size`` / ``layers`` when given,
    else what the recipes need (one pass gives every block they use; they share one size)."""
    from ..detect import DEFAULT
    from ..features.backbones import get_spec, parse_layers
    from .embed import BackboneChoice

    weights = list(weights or []) + [None] * (len(backbones) - len(weights or []))
    recipes = recipes or [DEFAULT]
    sizes = {r.image_size for r in recipes if r.image_size is not None}
    size = image_size or (sizes.pop() if len(sizes) == 1 else None)
    out = []
    for name, w in zip(backbones, weights):
        depth = get_spec(name).depth
        if layers is not None:
            blocks = () if layers == "last" else parse_layers(layers)
        else:
            wanted = {r.layers_for(depth) or (depth,) for r in recipes}
            blocks = tuple(sorted({b for bl in wanted for b in bl}))
            blocks = () if blocks == (depth,) else blocks
        out.append(BackboneChoice(name, w, size, blocks))
    return out


def fit_settings(recipe, shards: int = 1, chroma_url: str | None = None):
    """The FitConfig of ``recipe`` with the storage settings."""
    from .fit import FitConfig

    return FitConfig.from_recipe(recipe, n_shards=shards, chroma_url=chroma_url)


def fit_summary(recipe, res) -> str:
    """One line for a finished fit."""
    if recipe.kind == "paper":
        return (f"recipe {recipe.name}: fitted {res.fitted} scopes ({res.skipped} already done) "
                f"in {res.seconds:.1f}s on {len(res.nodes)} node(s); model directory: "
                f"{res.model_dir}")
    return (f"recipe {recipe.name}: fitted {res.fitted} streams ({res.skipped} already done) in "
            f"{res.seconds:.1f}s; label-free threshold {res.threshold:.4f} (target false-alarm "
            f"rate {recipe.target_fpr:g} on training frames scored leave-one-clip-out); "
            f"model directory: {res.model_dir}")


def frame_files(items: list[dict], manifest: str | None) -> dict[str, tuple[str, str]]:
    """frame_id -> (image path, mask path) of image items; masks from a manifest's mask_path."""
    masks = {}
    if manifest:
        import csv

        from ..data.frames import clip_key

        root = Path(manifest).parent
        with open(manifest, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("mask_path"):
                    fid = f"{clip_key(row['split'], row['clip'])}/{int(row['frame_index'])}"
                    masks[fid] = str(root / row["mask_path"])
    return {f"{it['clip']}/{it['frame_index']}": (str(it["path"]), masks.get(
        f"{it['clip']}/{it['frame_index']}", "")) for it in items if it["kind"] == "image"}


def _reuse_blocks(folder: Path, choice):
    """A folder that already holds these features with more blocks (say 9 and 12 where only
    12 is needed) is resumed as it is: each recipe selects its block from it."""
    from ..data.embeddings import METADATA_FILE

    path = folder / METADATA_FILE
    if not path.exists():
        return choice
    meta = json.loads(path.read_text())
    spec = choice.spec
    have = [int(x) for x in meta.get("layers") or []]
    need = list(spec.layers) or [spec.depth]
    if meta.get("image_size") == spec.image_size and have and set(need) <= set(have):
        return dataclasses.replace(choice, layers=tuple(have))
    return choice


@dataclass
class Engine:
    """Runs the whole pipeline into ``out``: ``embeddings[-<size>px]/<backbone>/``,
    ``models/<backbone>/<recipe>/``, ``scores/<backbone>/<recipe>.parquet`` and
    ``report/<backbone>/`` (the evaluation run and its HTML page), ``report/table.md``."""

    out: Path
    recipes: list
    backbones: list[str]
    weights: list[str | None] | None = None
    image_size: int | None = None
    layers: str | None = None
    batch_size: int = 32
    actors: int | None = None
    shards: int = 1
    chroma_url: str | None = None
    index: str = "exact"
    threshold_mode: str = "calibrated"
    calib_fraction: float = 1 / 3
    seed: int = 0
    say: Callable[[str], None] = print
    timings: dict = field(default_factory=dict)

    def feature_groups(self) -> list[tuple[str, list, list]]:
        """(embeddings folder, recipes, backbone choices) per image size the recipes need, the
        first recipe's size first: each size is embedded once, with every block its recipes
        use."""
        groups: dict = {}
        for r in self.recipes:
            groups.setdefault(self.image_size or r.image_size, []).append(r)
        return [("embeddings" if i == 0 else f"embeddings-{size}px", rs,
                 feature_choices(self.backbones, self.weights, self.image_size, self.layers, rs))
                for i, (size, rs) in enumerate(groups.items())]

    def _timed(self, name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[name] = time.perf_counter() - t
        return result

    def embed(self, items: list[dict]) -> list[tuple[str, list, list]]:
        from .embed import run_embedding

        groups = self.feature_groups()
        for folder, recipes, choices in groups:
            choices[:] = [_reuse_blocks(self.out / folder / c.name, c) for c in choices]
            zooms = tuple(sorted({z for r in recipes for z in r.zoom_views}))
            emb = self._timed(f"embed {folder}", run_embedding, items, choices,
                              self.out / folder, batch_size=self.batch_size,
                              actors_per_backbone=self.actors, zooms=zooms)
            self.say(f"[1/4] embedded {emb.written} frames ({emb.already_present} already "
                     f"present, {len(emb.errors)} skipped) in "
                     f"{self.timings[f'embed {folder}']:.1f}s at {choices[0].spec.image_size} "
                     f"px, blocks {list(choices[0].layers) or 'last'} -> {self.out / folder}")
        return groups

    def run(self, items: list[dict], manifest: str | None = None) -> dict:
        """embed -> fit (train split) -> score (test split) -> evaluate; the summaries."""
        from ..evaluation.evaluate import evaluate_run, write_evaluation_run, write_report
        from ..evaluation.metrics import to_markdown
        from ..evaluation.report import build_report
        from ..storage.modeldir import read_model_json, write_thresholds
        from .fit import fit_recipe
        from .score import score_embeddings

        groups = self.embed(items)
        out = self.out
        summaries, evaluations = {}, []
        files = frame_files(items, manifest)
        emb_dirs = {(c.name, r.name): out / folder / c.name
                    for folder, rs, choices in groups for c in choices for r in rs}
        for choice in groups[0][2]:
            results, scored = {}, {}
            for recipe in self.recipes:
                emb_dir = emb_dirs[(choice.name, recipe.name)]
                key = f"{choice.name}/{recipe.name}"
                model_dir = out / "models" / choice.name / recipe.name
                fit = self._timed(f"fit {key}", fit_recipe, emb_dir, model_dir, recipe,
                                  fit_settings(recipe, self.shards, self.chroma_url))
                self.say(f"[2/4] {fit_summary(recipe, fit)}")
                scores_path = out / "scores" / choice.name / f"{recipe.name}.parquet"
                res = self._timed(f"score {key}", score_embeddings, model_dir, emb_dir,
                                  scores_path, index=self.index, splits=["test"])
                self.say(f"[3/4] recipe {recipe.name}: scored {res['frames']} test frames in "
                         f"{self.timings[f'score {key}']:.1f}s -> {scores_path}")
                result = evaluate_run(scores_path, choice.name, self.threshold_mode,
                                      self.calib_fraction, self.seed, read_model_json(model_dir))
                report_dir = out / "report" / choice.name / recipe.name
                summaries[key] = write_report(report_dir, result, self.timings)
                write_thresholds(model_dir, result["thresholds"])
                evaluations += result["evaluations"]
                results[recipe.name], scored[recipe.name] = result, scores_path
                free = result["label_free"]
                self.say(
                    f"[4/4] recipe {recipe.name}: report -> {report_dir / 'report.md'}; "
                    f"thresholds calibrated on clips "
                    f"{', '.join(result['calibration_clips']) or '-'} written to "
                    f"{model_dir / 'model.json'}" + (
                        f"; the label-free threshold flags {free['fpr_normal_test_frames']:.4f} "
                        f"of the {free['normal_test_frames']} normal test frames (target "
                        f"{free['target_fpr']})" if free else ""))
            run = write_evaluation_run(out / "report" / choice.name, results, scored, files)
            self.say(f"report page: {build_report(run)}")
        table = to_markdown(evaluations)
        (out / "report").mkdir(parents=True, exist_ok=True)
        (out / "report" / "table.md").write_text(table)
        first = next(iter(summaries.values()))
        self.say(f"\nEvaluated clips {', '.join(first['evaluated_clips'])}; thresholds "
                 f"calibrated on clips {', '.join(first['calibration_clips']) or '-'} (rows "
                 f"'calibration-clips') or set by `vitad fit` without labels (rows "
                 f"'label-free@fpr=...'):\n\n{table}")
        return summaries
