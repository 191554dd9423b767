"""Recipes on a labelled scene (Ped2): a sweep through the Detector, chosen on calibration clips.

For each feature set (an embeddings folder, optionally ``#block`` of a multi-block one) it fits
the Detector once with every motion lag the sweep uses, searches every test clip once, then
scores every recipe of the grid and ranks them by AUROC on the threshold-calibration clips alone
(the evaluated clips play no part). It prints the top recipes with their metrics on the
evaluated clips at the calibrated threshold and the label-free threshold's false-alarm rate,
and writes a run folder that ``vitad report`` renders. With ``--model``, a `vitad fit` model's
own recipe (the paper's, say) is scored beside them.

    python bench/quality.py --manifest ../shared/data/ucsd_ped2/manifest.csv \\
        --features "224 block 9=runs/ped2/embeddings/dinov2-s14#9" --out runs/quality
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from vitad_ray.data.embeddings import load_embeddings, select_layers
from vitad_ray.data.frames import clip_key
from vitad_ray.detect import Detector, get_recipe
from vitad_ray.detect.detector import FITTED_SETTINGS
from vitad_ray.detect.model import load_model
from vitad_ray.detect.offline import score_frames
from vitad_ray.detect.recipe import view_splits
from vitad_ray.detect.sweep import Sweep, choose_on_calibration, recipe_grid
from vitad_ray.evaluation.evaluate import split_test_clips
from vitad_ray.evaluation.localize import MASK_SIZE, load_masks, pixel_auroc
from vitad_ray.evaluation.metrics import auroc, evaluate_scores
from vitad_ray.evaluation.runfolder import write_run

COLUMNS = ["option", "calib_auroc", "auroc", "auroc_all", "pr_auc", "balanced_accuracy",
           "precision", "recall", "fpr", "label_free_fpr", "pixel_auroc"]


def parse_feature(text: str) -> tuple[str, str, tuple[int, ...]]:
    name, _, path = text.partition("=")
    if not path:
        raise SystemExit(f"--features takes NAME=DIR[#block], got {text!r}")
    path, _, blocks = path.partition("#")
    return name.strip(), path, tuple(int(b) for b in blocks.split(",") if b)


def parse_axis(text: str) -> tuple[str, list]:
    """``pool=1,3`` -> ("pool", [1, 3]); lags as ``motion_lags=2;4;2+4;none``."""
    key, _, values = text.partition("=")
    if key == "motion_lags":
        return key, [tuple(int(x) for x in v.split("+")) if v != "none" else ()
                     for v in values.split(";")]
    cast = {"pool": int, "motion_pool": int, "temporal_window": int, "fusion": str}.get(key, float)
    return key, [cast(v) for v in values.split(",")]


def manifest_frames(manifest: str) -> pd.DataFrame:
    man = pd.read_csv(manifest, dtype={"clip": str, "split": str})
    man["mask_path"] = man["mask_path"].fillna("") if "mask_path" in man else ""
    root = Path(manifest).parent
    man["clip"] = [clip_key(s, c) for s, c in zip(man["split"], man["clip"])]  # as embedded
    man["image_path"] = [str(root / p) for p in man["path"]]
    man["mask_path"] = [str(root / p) if p else "" for p in man["mask_path"]]
    return man[["split", "clip", "frame_index", "image_path", "mask_path"]]


def load_split(path: str, split: str | list[str], blocks: tuple[int, ...]):
    emb = load_embeddings(path, splits=[split] if isinstance(split, str) else split)
    return select_layers(emb, blocks) if blocks else emb


def metrics_row(option, s, y, split, threshold, calib_auroc=float("nan")) -> dict:
    cal = split.is_calib
    ev = evaluate_scores(option, y[~cal], s[~cal], y_calib=y[cal], s_calib=s[cal])
    return {"option": option, "calib_auroc": calib_auroc, "auroc": ev.auroc,
            "auroc_all": auroc(y, s), "pr_auc": ev.pr_auc, "threshold": ev.threshold,
            "label_free_fpr": float((s[y == 0] >= threshold).mean()),
            **{k: ev.metrics[k] for k in ("precision", "recall", "fpr", "specificity", "f1",
                                          "balanced_accuracy")}}


def fmt_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                                       for c in columns) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--features", action="append", required=True,
                   help="NAME=EMBEDDINGS_DIR[#block]; the first is the report's")
    p.add_argument("--recipe", default="default", help="the base recipe (name or YAML)")
    p.add_argument("--sweep", action="append", default=[],
                   help="a setting and its values, e.g. pool=1,3 or motion_lags=2;4;2+4;none "
                        "(default: lags, pooling, top-k and smoothing window)")
    p.add_argument("--model", help="a `vitad fit` model of the first feature set, scored with "
                                   "its own recipe beside the sweep")
    p.add_argument("--fitted", help="a `vitad fit` model of a cross-clip recipe on the first "
                                    "feature set whose streams cover the sweep's lags: its "
                                    "detector is swept instead of fitting one")
    p.add_argument("--top", type=int, default=12, help="recipes shown per feature set")
    p.add_argument("--calib-fraction", type=float, default=1 / 3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    base = get_recipe(args.recipe).replace(image_size=None, block=None)
    axes = dict(parse_axis(a) for a in args.sweep) or {
        "motion_lags": [(), (4,), (8,)], "pool": [1, 3], "top_k": [0.04, 0.08, 0.16],
        "motion_pool": [1, 3], "motion_top_k": [0.08, 0.16], "temporal_window": [8, 16]}
    recipes = recipe_grid(base, **axes)
    lags = tuple(sorted({lag for r in recipes for lag in r.motion_lags}))
    man = manifest_frames(args.manifest)
    scores, maps, rows, features, picks = {}, {}, [], [], []
    ids = masks = split = None
    for i, text in enumerate(args.features):
        name, path, blocks = parse_feature(text)
        t0 = time.perf_counter()
        if i == 0 and args.fitted:
            detector = load_model(args.fitted)
            if not set(lags) <= set(detector.recipe.motion_lags):
                raise SystemExit(f"{args.fitted} has lags {detector.recipe.motion_lags}, the "
                                 f"sweep needs {lags}")
            base = base.replace(**{k: getattr(detector.recipe, k) for k in FITTED_SETTINGS})
            recipes = [r.replace(**{k: getattr(base, k) for k in FITTED_SETTINGS})
                       for r in recipes]
        else:
            train = load_split(path, "train", blocks)
            views = load_split(path, view_splits(base, ["train"]), blocks) \
                if base.zoom_views else None
            detector = Detector(base.replace(motion_lags=lags)).fit(train, views=views)
            del train, views
        fit_s = time.perf_counter() - t0
        test = load_split(path, "test", blocks)
        if ids is None:
            ids = test.ids.merge(man, on=["split", "clip", "frame_index"], how="left")
            y = ids["label"].to_numpy().astype(int)
            split = split_test_clips(ids, args.calib_fraction, args.seed)
            masks = load_masks(list(ids["mask_path"].fillna("")), MASK_SIZE)
            if args.model:
                model = load_model(args.model)
                order, det = score_frames(model, test.ids, test.global_, test.local)
                back = np.argsort(order)
                option = f"[{name}] recipe {model.recipe.name} ({args.model})"
                scores[option] = det.frame_score[back]
                maps[option] = det.patch_scores[back]
                rows.append(metrics_row(option, scores[option], y, split, det.threshold))
        elif not test.ids["frame_id"].reset_index(drop=True).equals(ids["frame_id"]):
            raise SystemExit(f"{path}: test frames differ from the first feature set's")
        t0 = time.perf_counter()
        sweep = Sweep(detector, test.ids, test.global_, test.local)
        search_s = time.perf_counter() - t0
        ranked = choose_on_calibration(sweep, recipes, y, split.is_calib)
        print(f"[{name}] fit {fit_s:.1f} s, search of {len(test)} frames {search_s:.1f} s, "
              f"{len(recipes)} recipes", flush=True)
        appearance = next((r for r in ranked if not r[0].motion_lags), None)
        keep = ranked[:args.top] + ([appearance] if appearance not in ranked[:args.top] else [])
        for recipe, calib, det in keep:
            option = f"[{name}] {recipe.name}"
            scores[option], maps[option] = det.frame_score, det.patch_scores
            rows.append(metrics_row(option, det.frame_score, y, split, det.threshold, calib))
        picks.append((ranked[0][1], f"[{name}] {ranked[0][0].name}"))
        features.append({"features": name, "dim": int(test.global_.shape[1]),
                         "grid": int(detector.grid_), "fit_s": fit_s, "search_s": search_s})
        del sweep, detector, test

    for r in rows:
        r["pixel_auroc"] = pixel_auroc(maps[r["option"]], masks) if masks.any() else float("nan")
    chosen = max(picks)[1]
    best = max(rows, key=lambda r: (r["auroc"], r["balanced_accuracy"]))["option"]
    text = "\n\n".join([
        f"Calibration clips (recipe choice and thresholds): {', '.join(split.calibration_clips)}"
        f"; evaluated clips: {', '.join(split.evaluated_clips)}. auroc_all: all {len(y)} test "
        f"frames; label_free_fpr: the fit's label-free threshold (target "
        f"{base.target_fpr:g}) on all normal test frames.",
        fmt_table(rows, COLUMNS),
        fmt_table(features, ["features", "dim", "grid", "fit_s", "search_s"]),
        f"Chosen on the calibration clips: {chosen}",
        f"Best on the evaluated clips, in hindsight: {best}"])
    print(text)
    summary = {"command": " ".join(sys.argv), "calibration_clips": split.calibration_clips,
               "evaluated_clips": split.evaluated_clips, "table": rows, "features": features,
               "chosen": chosen, "best": best, "mask_size": MASK_SIZE,
               "base_recipe": base.to_dict()}
    grid = maps[chosen].shape
    keep_maps = {n: m for n, m in maps.items() if m.shape == grid}
    out = write_run(args.out, ids, scores, keep_maps, summary)
    (out / "quality.md").write_text(text + "\n")
    print(f"run folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
