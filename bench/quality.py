"""Detection quality on a labelled scene (Ped2): the paper's rules against the cross-clip options.

For each feature set (embeddings folder, optionally `#blocks` of a multi-block embedding) it
scores every test frame against the training frames, turns the distances into every named
option, and prints frame AUROC / PR AUC / balanced accuracy (thresholds calibrated on held-out
test clips), pixel AUROC of the patch maps, and the coreset's cost in AUROC and time. It writes a
run folder that `vitad report` renders.

    python bench/quality.py --manifest ../shared/data/ucsd_ped2/manifest.csv \
        --features "S/14 block 12, 224=runs/ped2/embeddings/dinov2-s14" \
        --model runs/ped2/models/dinov2-s14 --out runs/quality
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import pandas as pd

from vitad_ray.embeddings import load_embeddings, select_layers
from vitad_ray.frames import clip_key
from vitad_ray.localize import load_masks, pixel_auroc
from vitad_ray.motion import patch_motion
from vitad_ray.quality import (CrossClipScores, appearance_motion_options, chosen_on_calibration,
                               evaluate_options, frame_options, fused_raw, paper_options,
                               split_test_clips, write_run)

MASK_SIZE = (80, 120)  # a third of Ped2's 240 x 360: 19 M pixels over the 2,010 test frames


def _picked(title: str, option: str | None, rows: list[dict]) -> str:
    if option is None:
        return f"{title}: none"
    r = next(r for r in rows if r["option"] == option)
    return (f"{title}: {option} (AUROC {r['auroc']:.3f}, balanced accuracy "
            f"{r['balanced_accuracy']:.3f})")


def parse_feature(text: str) -> tuple[str, str, tuple[int, ...]]:
    name, _, path = text.partition("=")
    if not path:
        raise SystemExit(f"--features takes NAME=DIR[#blocks], got {text!r}")
    path, _, blocks = path.partition("#")
    return name.strip(), path, tuple(int(b) for b in blocks.split(",") if b)


def manifest_frames(manifest: str) -> pd.DataFrame:
    man = pd.read_csv(manifest, dtype={"clip": str, "split": str})
    man["mask_path"] = man["mask_path"].fillna("") if "mask_path" in man else ""
    root = Path(manifest).parent
    man["clip"] = [clip_key(s, c) for s, c in zip(man["split"], man["clip"])]  # as embedded
    man["image_path"] = [str(root / p) for p in man["path"]]
    man["mask_path"] = [str(root / p) if p else "" for p in man["mask_path"]]
    return man


def load_split(path: str, split: str, blocks: tuple[int, ...], man: pd.DataFrame):
    """One split of a feature set, restricted to the manifest's frames of that split (a
    subsampled manifest compares feature sets embedded from different samples on one sample)."""
    emb = load_embeddings(path, splits=[split])
    listed = man[man["split"] == split]
    if len(listed):  # a split the manifest does not list (videos, say) is taken whole
        keys = set(zip(listed["clip"], listed["frame_index"]))
        emb = emb.select([k in keys for k in zip(emb.ids["clip"], emb.ids["frame_index"])])
    if not len(emb):
        raise SystemExit(f"{path}: no {split} frames of the manifest")
    return select_layers(emb, blocks) if blocks else emb


def with_manifest(ids: pd.DataFrame, man: pd.DataFrame) -> pd.DataFrame:
    merged = ids.merge(man[["split", "clip", "frame_index", "image_path", "mask_path"]],
                       on=["split", "clip", "frame_index"], how="left", validate="one_to_one")
    if merged["image_path"].isna().any():
        raise SystemExit("some embedded frames are not in the manifest")
    return merged


def fmt_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(
            f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |")
    return "\n".join(lines)


def feature_streams(train, test, lags: list[int]):
    """(label, train, test) of appearance, then of motion per lag, each made when its turn
    comes: at 448 a pair of splits is 5 GB."""
    yield "", train, test
    for lag in lags:
        yield f", motion lag {lag}", patch_motion(train, lag), patch_motion(test, lag)


def calibration_sources(per_stream: list, lags: list[int], fusion_weight: float) -> dict:
    """The raw-distance sources the calibration clips choose among: appearance, each motion
    lag, the lags together, appearance with motion."""
    sources = {"appearance": per_stream[0]}
    sources.update({f"motion lag {lag}": o for lag, o in zip(lags, per_stream[1:])})
    if len(lags) > 1:
        sources[f"motion lags {'+'.join(map(str, lags))}"] = fused_raw(per_stream[1:])
    if lags:
        motion = list(sources.values())[-1]
        sources["appearance+motion"] = fused_raw([per_stream[0], motion],
                                                 [fusion_weight, 1 - fusion_weight])
    return sources


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--features", action="append", required=True,
                   help="NAME=EMBEDDINGS_DIR[#blocks]; the first is the primary feature set")
    p.add_argument("--model", help="a `vitad fit` model of the primary features: paper rows")
    p.add_argument("--k", type=lambda t: float(t) if "." in t else int(t), default=10,
                   help="top-k patches: a count (10), or a share of the grid (0.04)")
    p.add_argument("--fusion-weight", type=float, default=0.5)
    p.add_argument("--temporal", default="mean", choices=["none", "mean", "ema"])
    p.add_argument("--temporal-size", type=float, default=16,
                   help="causal window (mean) or half-life (ema), in frames")
    p.add_argument("--motion-lag", type=int, nargs="*", default=[2],
                   help="add a motion stream per lag: patch change since this many frames "
                        "earlier (none: no motion); with several, their fusion is a source too")
    p.add_argument("--coreset", type=float, default=0.25)
    p.add_argument("--calib-fraction", type=float, default=1 / 3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    scores, maps, feature_rows, coreset_rows = {}, {}, [], []
    picks = []  # (calibration AUROC, option): each feature set's choice on the calibration clips
    ids = None
    man = manifest_frames(args.manifest)
    options_kw = dict(k=args.k, fusion_weight=args.fusion_weight, temporal=args.temporal,
                      temporal_size=args.temporal_size)
    for i, text in enumerate(args.features):
        name, path, blocks = parse_feature(text)
        t0 = time.perf_counter()
        train = load_split(path, "train", blocks, man)
        test = load_split(path, "test", blocks, man)
        if ids is None:
            ids = with_manifest(test.ids, man)
            masks = load_masks(list(ids["mask_path"]), MASK_SIZE)
            split = split_test_clips(ids, args.calib_fraction, args.seed)
            if args.model:
                paper = paper_options(args.model, test)
                scores.update(paper.scores)
                maps.update(paper.patch_maps)
        elif not test.ids["frame_id"].reset_index(drop=True).equals(ids["frame_id"]):
            raise SystemExit(f"{path}: test frames differ from the first feature set's")
        load_s = time.perf_counter() - t0
        runs = [(None, "")] + ([(args.coreset, f" coreset {args.coreset:g}")]
                               if i == 0 and args.coreset else [])
        lags = [lag for lag in args.motion_lag if lag]
        for coreset, tag in runs:
            per_stream = []
            for stream, tr, te in feature_streams(train, test, lags):
                label = f"{name}{stream}{tag}"
                cs = CrossClipScores(tr, te, coreset=coreset)
                opts = frame_options(cs, te.ids, prefix=f"[{label}] ", **options_kw)
                scores.update(opts.scores)
                maps.update(opts.patch_maps)
                per_stream.append(opts)
                feature_rows.append({"features": label, "dim": int(tr.global_.shape[1]),
                                     "grid": cs.grid, "memory_MB": cs.memory_bytes / 2**20,
                                     "fit_s": cs.fit_s, "score_s": cs.score_s, "load_s": load_s})
                print(f"{label}: fit {cs.fit_s:.1f} s, nearest search of {len(te)} frames "
                      f"{cs.score_s:.1f} s, memory {cs.memory_bytes / 2**20:.0f} MB", flush=True)
                del cs, tr, te
                gc.collect()
            if coreset is None:
                chosen, choices = chosen_on_calibration(
                    calibration_sources(per_stream, lags, args.fusion_weight), test.ids,
                    ids["label"].to_numpy().astype(int), split, prefix=f"[{name}] ")
                scores.update(chosen.scores)
                maps.update(chosen.patch_maps)
                picks.append((choices[0].calib_auroc, next(iter(chosen.scores))))
                for c in choices:
                    print(f"[{name}] chosen on the calibration clips: {c.source}, pool "
                          f"{c.pool}x{c.pool}, top-{c.k:g}, window {c.window} (calibration "
                          f"AUROC {c.calib_auroc:.3f})", flush=True)
            if len(per_stream) > 1:  # appearance with the first lag's motion
                both = appearance_motion_options(
                    *per_stream[:2], test.ids, prefix=f"[{name}{tag}] ",
                    **{k: v for k, v in options_kw.items() if k != "k"})
                scores.update(both.scores)
                maps.update(both.patch_maps)
            del per_stream
        del train, test
        gc.collect()

    y = ids["label"].to_numpy().astype(int)
    rows = evaluate_options(scores, y, split)
    pixel_of, by_array = {}, {}
    for name, patch in maps.items():  # options sharing one map share its pixel AUROC
        if id(patch) not in by_array:
            by_array[id(patch)] = pixel_auroc(patch, masks)
        pixel_of[name] = by_array[id(patch)]
    for r in rows:
        r["pixel_auroc"] = pixel_of.get(r["option"], float("nan"))
    # The option to use is the one chosen on the calibration clips alone; the best on the
    # evaluated clips is picked in hindsight and reported beside it, as an upper reference.
    chosen = max(picks)[1] if picks else None
    best = max((r for r in rows if not r["option"].startswith("paper")),
               key=lambda r: (r["auroc"], r["balanced_accuracy"]))
    if args.coreset:
        primary = parse_feature(args.features[0])[0]
        tag = f" coreset {args.coreset:g}"
        mine = [r for r in rows if r["option"].startswith(f"[{primary}")]
        full = {r["option"]: r for r in mine if tag not in r["option"]}
        for r in mine:
            if tag in r["option"]:
                base = full[r["option"].replace(tag, "", 1)]
                coreset_rows.append({"option": base["option"], "auroc_full": base["auroc"],
                                     "auroc_coreset": r["auroc"],
                                     "delta": r["auroc"] - base["auroc"]})

    cols = ["option", "auroc_all", "auroc", "pr_auc", "balanced_accuracy", "precision", "recall",
            "fpr", "f1", "pixel_auroc"]
    text = "\n\n".join([
        f"Calibration clips (thresholds): {', '.join(split.calibration_clips)}; evaluated clips: "
        f"{', '.join(split.evaluated_clips)}. auroc_all: all {len(y)} test frames.",
        fmt_table(rows, cols),
        fmt_table(feature_rows, ["features", "dim", "grid", "memory_MB", "fit_s", "score_s"]),
        fmt_table(coreset_rows, ["option", "auroc_full", "auroc_coreset", "delta"])
        if coreset_rows else "",
        _picked("Chosen on the calibration clips", chosen, rows),
        _picked("Best on the evaluated clips, in hindsight", best["option"], rows),
    ])
    print(text)
    summary = {"command": " ".join(sys.argv), "calibration_clips": split.calibration_clips,
               "evaluated_clips": split.evaluated_clips, "table": rows,
               "features": feature_rows, "coreset": coreset_rows, "chosen": chosen,
               "best": best["option"], "mask_size": MASK_SIZE}
    # The report draws heatmaps of the chosen option (else the best one with a patch map); keep
    # the maps of that grid only (a 448 grid does not stack with a 224 one, and all of them
    # would be large).
    with_maps = [r for r in rows if r["option"] in maps]
    best_map = chosen if chosen in maps else (
        max(with_maps, key=lambda r: r["auroc"])["option"] if with_maps else None)
    keep = {n: m for n, m in maps.items()
            if best_map and m.shape == maps[best_map].shape and
            (n == best_map or n.startswith("paper"))}
    out = write_run(args.out, ids, scores, keep, summary)
    (out / "quality.md").write_text(text + "\n")
    print(f"run folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
