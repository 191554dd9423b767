"""Frame-level evaluation of a scores table: the paper's Table II/III layout plus AUROC.

Test clips are split (by clip) into calibration clips, on which thresholds are chosen, and
evaluated clips; or, in the paper's mode, thresholds are chosen on the evaluated set itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.frames import split_clips
from ..pipeline.score import METHODS, read_scores, vote_score
from ..storage.atomic import write_json
from .metrics import Evaluation, auroc, evaluate_scores, to_csv, to_markdown

METHOD_TITLES = {"kmeans": "k-Means", "hdbscan": "HDBSCAN"}


@dataclass
class Split:
    calibration_clips: list[str]
    evaluated_clips: list[str]
    is_calib: np.ndarray  # per frame


def split_test_clips(ids, fraction: float = 1 / 3, seed: int = 0) -> Split:
    """Test clips split (by clip) into threshold-calibration clips and evaluated clips."""
    y, clips = ids["label"].to_numpy(), ids["clip"].to_numpy()
    calib, rest = split_clips({c: y[clips == c] for c in np.unique(clips)}, fraction, seed)
    return Split(list(map(str, calib)), list(map(str, rest)), np.isin(clips, calib))


def frame_scores(df, arrays: dict, method: str) -> dict[str, np.ndarray]:
    """{"global": [N], "local": [N]} frame scores; local is the majority-vote score."""
    out = {}
    if f"global_{method}" in df:
        out["global"] = df[f"global_{method}"].to_numpy(np.float64)
    if f"local_{method}" in arrays:
        out["local"] = vote_score(arrays[f"local_{method}"]).astype(np.float64)
    return out


def evaluate_run(scores_path: str | os.PathLike, name: str, mode: str = "calibrated",
                 calib_fraction: float = 1 / 3, seed: int = 0, model_doc: dict | None = None
                 ) -> dict:
    """Metrics of what ``vitad score`` wrote: the frame score at the model's threshold in force
    (label-free for a cross-clip recipe) and at one calibrated on held-out clips; for the paper
    recipe its k-Means / HDBSCAN global and local rows, as the paper's tables have them."""
    from ..detect import recipe_from_model

    df, arrays = read_scores(scores_path)
    labelled = df["label"].to_numpy() >= 0
    if not labelled.any():
        raise ValueError(f"{scores_path}: no labelled frames to evaluate")
    df = df[labelled].reset_index(drop=True)
    arrays = {k: v[labelled] for k, v in arrays.items()}
    y = df["label"].to_numpy().astype(int)
    clips = df["clip"].to_numpy()
    if mode == "calibrated":
        split = split_test_clips(df, calib_fraction, seed)
    else:
        split = Split([], sorted(map(str, np.unique(clips))), np.zeros(len(y), bool))
    calib, rest, is_calib = split.calibration_clips, split.evaluated_clips, split.is_calib
    is_eval = ~is_calib
    recipe = recipe_from_model(model_doc or {})
    in_force = (model_doc or {}).get("thresholds", {})

    evaluations: list[Evaluation] = []
    thresholds = {}
    label_free = {}
    frame_evaluation = None
    if recipe.kind != "paper":
        s = df["frame_score"].to_numpy(np.float64)
        if "frame" in in_force:
            t, source = float(in_force["frame"]), in_force.get("source", "model")
            if "label_free" in in_force:  # the fit's own threshold, kept when one was calibrated
                t, source = in_force["label_free"]["frame"], in_force["label_free"]["source"]
            evaluations.append(evaluate_scores(f"{name} / {recipe.name} / {source}", y[is_eval],
                                               s[is_eval], mode="fixed", threshold=t,
                                               source=source))
            normal = y == 0
            label_free = {"threshold": t, "source": source,
                          "target_fpr": in_force.get("target_fpr"),
                          "fpr_normal_test_frames": float((s[normal] >= t).mean()),
                          "normal_test_frames": int(normal.sum())}
        ev = evaluate_scores(f"{name} / {recipe.name} / calibration-clips", y[is_eval],
                             s[is_eval], y_calib=y[is_calib], s_calib=s[is_calib], mode=mode)
        evaluations.append(ev)
        frame_evaluation = ev
        thresholds = {"frame": ev.threshold,
                      "appearance": in_force.get("appearance", ev.threshold),
                      "source": "calibration-clips" if mode == "calibrated" else "paper-mode",
                      "label_free": {k: in_force[k] for k in ("frame", "appearance", "source",
                                                              "target_fpr") if k in in_force}
                      if "label_free" not in in_force else in_force["label_free"]}
    else:
        for method in METHODS:
            for scope, s in frame_scores(df, arrays, method).items():
                ev = evaluate_scores(f"{name} / paper / {METHOD_TITLES[method]} / {scope}",
                                     y[is_eval], s[is_eval], y_calib=y[is_calib],
                                     s_calib=s[is_calib], mode=mode)
                evaluations.append(ev)
                if (method, scope) == ("kmeans", "local"):  # the paper recipe's frame score
                    frame_evaluation = ev
                thresholds.setdefault(method, {})["global" if scope == "global" else "patch"] = \
                    ev.threshold
        thresholds["source"] = "calibration-clips" if mode == "calibrated" else "paper-mode"
    return {
        "mode": mode,
        "recipe": recipe.name,
        "calibration_clips": list(map(str, calib)),
        "evaluated_clips": list(map(str, rest)),
        "evaluations": evaluations,
        "frame_evaluation": frame_evaluation,
        "thresholds": thresholds,
        "label_free": label_free,
        "diagnostics": diagnostics(df, arrays, y, is_eval),
    }


def diagnostics(df, arrays: dict, y: np.ndarray, is_eval: np.ndarray) -> dict:
    """How saturated the paper's capped confidence is, and what the uncapped signals carry."""
    out = {}
    if "global_kmeans" in df:
        g = df["global_kmeans"].to_numpy()
        out["share_global_confidence_at_1"] = float((g[is_eval] >= 1.0).mean())
        out["auroc_global_ratio"] = auroc(y[is_eval], df["global_kmeans_ratio"].to_numpy()[is_eval])
        out["auroc_global_d"] = auroc(y[is_eval], df["global_kmeans_d"].to_numpy()[is_eval])
    if "local_kmeans" in arrays:
        local = arrays["local_kmeans"][is_eval]
        out["share_patch_confidence_at_1"] = float((local >= 1.0).mean())
        for name in ("ratio", "d"):
            values = arrays[f"local_kmeans_{name}"][is_eval]
            out[f"auroc_local_vote_{name}"] = auroc(y[is_eval], vote_score(values))
            out[f"auroc_local_max_{name}"] = auroc(y[is_eval], values.max(axis=1))
    return out


def write_report(out_dir: str | os.PathLike, result: dict, timings: dict | None = None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluations = result["evaluations"]
    (out_dir / "table.csv").write_text(to_csv(evaluations))
    diag = result["diagnostics"]
    sources = sorted({e.threshold_source for e in evaluations})
    lines = [
        f"# Evaluation: recipe {result.get('recipe', 'paper')}", "",
        f"Thresholds: {'; '.join(sources) or '-'}.",
        f"Calibration clips: {', '.join(result['calibration_clips']) or '-'}; evaluated clips: "
        f"{', '.join(result['evaluated_clips'])}.", "",
        to_markdown(evaluations),
    ]
    free = result.get("label_free")
    if free:
        lines += [f"Label-free threshold ({free['source']}): false-alarm rate "
                  f"{free['fpr_normal_test_frames']:.4f} on the {free['normal_test_frames']} "
                  f"normal test frames, against a target of {free['target_fpr']}.", ""]
    if result.get("recipe", "paper") == "paper":
        lines += ["Local = the paper's majority vote (a frame is anomalous when #anomalous "
                  "patches >= #normal patches); its AUROC ranks frames by the median-rank patch "
                  "confidence, whose threshold gives exactly that vote.", ""]
    if diag:
        lines += ["## Diagnostics (evaluated frames)", "", "| what | value |", "|---|---|",
                  *[f"| {k} | {v:.4f} |" for k, v in diag.items()], ""]
    if timings:
        lines += ["## Wall times", "", "| step | seconds |", "|---|---|",
                  *[f"| {k} | {v:.1f} |" for k, v in timings.items()], ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    summary = {
        "mode": result["mode"],
        "recipe": result.get("recipe", "paper"),
        "calibration_clips": result["calibration_clips"],
        "evaluated_clips": result["evaluated_clips"],
        "thresholds": result["thresholds"],
        "label_free": result.get("label_free", {}),
        "diagnostics": diag,
        "timings_s": timings or {},
        "table": [{"configuration": e.name, "threshold": e.threshold, **e.metrics,
                   "auroc": e.auroc, "pr_auc": e.pr_auc, "frames": e.n} for e in evaluations],
    }
    write_json(out_dir / "summary.json", summary, indent=2, default=float)
    return summary


def write_evaluation_run(run_dir: str | os.PathLike, results: dict[str, dict],
                         scores_paths: dict[str, str | os.PathLike],
                         frame_files: dict[str, tuple[str, str]] | None = None) -> Path:
    """The run folder `vitad report` renders for one backbone's evaluation: an option per
    recipe (its frame score and patch grid), its calibrated row, pixel AUROC where masks
    exist. The first recipe is the one the report stands behind."""
    import pandas as pd

    from .localize import MASK_SIZE, load_masks, pixel_auroc
    from .runfolder import write_run

    scores, maps, rows, ids = {}, {}, [], None
    for recipe, path in scores_paths.items():
        df, arrays = read_scores(path)
        labelled = df["label"].to_numpy() >= 0
        df = df[labelled].reset_index(drop=True)
        if ids is None:
            ids = df[["frame_id", "clip", "frame_index", "timestamp_s", "split", "label"]].copy()
            files = frame_files or {}
            ids["image_path"] = [files.get(f, ("", ""))[0] for f in ids["frame_id"]]
            ids["mask_path"] = [files.get(f, ("", ""))[1] for f in ids["frame_id"]]
        elif not df["frame_id"].equals(ids["frame_id"]):
            raise ValueError(f"{path} scores other frames than {next(iter(scores_paths.values()))}")
        scores[recipe] = df["frame_score"].to_numpy(np.float64)
        maps[recipe] = arrays["patch_scores"][labelled]
        ev = results[recipe]["frame_evaluation"]
        y = ids["label"].to_numpy()
        rows.append({"option": recipe, "threshold": ev.threshold, **ev.metrics,
                     "auroc": ev.auroc, "pr_auc": ev.pr_auc, "auroc_all": auroc(y, scores[recipe])})
    with_masks = ids["mask_path"].astype(bool)
    masks = load_masks(list(ids["mask_path"]), MASK_SIZE) if with_masks.any() else None
    for r in rows:
        r["pixel_auroc"] = pixel_auroc(maps[r["option"]], masks) if masks is not None \
            else float("nan")
    first = next(iter(results.values()))
    best = max(rows, key=lambda r: np.nan_to_num(r["auroc"], nan=-1))["option"]
    summary = {"command": "vitad evaluate", "calibration_clips": first["calibration_clips"],
               "evaluated_clips": first["evaluated_clips"], "table": rows,
               "chosen": rows[0]["option"], "best": best}
    return write_run(run_dir, pd.DataFrame(ids), scores, maps, summary)
