"""Detection quality of the paper's rules and of the cross-clip options, on one labelled scene.

``CrossClipScores`` scores a test set against a training set for one feature set (backbone,
layers, resolution) once, and serves every calibration of it; ``frame_options`` turns those into
named frame scores; ``evaluate_options`` gives each the paper's metrics at a threshold
calibrated on held-out test clips, plus AUROC and PR AUC. ``bench/quality.py`` drives it on
Ped2 and writes a run folder that ``vitad report`` renders.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .aggregate import fuse, pool_patches, smooth_in_time, standardize, topk_mean
from .crossclip import CrossClipNormality
from .embeddings import Embeddings
from .evaluate import Split, split_test_clips  # noqa: F401 (part of this module's API)
from .fit import stack_scopes
from .metrics import auroc, evaluate_scores
from .score import vote_score

FRAMES_FILE = "frames.parquet"
PATCH_MAPS_FILE = "patch_maps.npy"
SUMMARY_FILE = "summary.json"


class CrossClipScores:
    """Nearest-neighbour distances of a test set, per scope, and their leave-one-clip-out
    reference, for one feature set. Scopes: 0 is global, 1.. the patch grid."""

    def __init__(self, train: Embeddings, test: Embeddings, m: int = 5,
                 coreset: float | None = None, device: str | None = None):
        start = time.perf_counter()
        train_s = stack_scopes(train.global_, train.local)
        self.est = CrossClipNormality(m=m, coreset=coreset, device=device).fit(
            train_s, train.ids["clip"].to_numpy())
        del train_s
        self.fit_s = time.perf_counter() - start
        test_s = stack_scopes(test.global_, test.local)
        start = time.perf_counter()
        self.d, self.nn = self.est.nearest(test_s)
        self.score_s = time.perf_counter() - start
        self.memory_bytes = int(self.est.memory_.nbytes)
        self.grid = int(round(np.sqrt(test.local.shape[1])))

    def scores(self, calibration: str) -> tuple[np.ndarray, np.ndarray]:
        """(test [S, M], reference [S, N]) calibrated scores."""
        return (self.est.calibrate(self.d, self.nn, calibration),
                self.est.train_scores(calibration))


@dataclass
class FrameOptions:
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [M] frame score
    patch_maps: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [M, P]
    # Standardized (against leave-one-clip-out training frames) z-score evidence for fusion:
    # name -> [M]; and the patch z-scores [M, P] behind the local one.
    evidence: dict[str, np.ndarray] = field(default_factory=dict)
    local_z: np.ndarray | None = None
    local_raw: np.ndarray | None = None
    local_raw_ref: np.ndarray | None = None  # leave-one-clip-out raw d of training frames [N, P]

    def raw_evidence(self, k: int | float, pool: int = 1) -> np.ndarray:
        """The top-k raw-distance frame score (patches pooled over ``pool`` x ``pool``
        neighbours first), standardized against the training frames'."""
        return standardize(topk_mean(pool_patches(self.local_raw, pool), k),
                           topk_mean(pool_patches(self.local_raw_ref, pool), k))


def frame_options(cs: CrossClipScores, test_ids: pd.DataFrame, k: int | float = 10,
                  fusion_weight: float = 0.5, temporal: str = "mean", temporal_size: float = 16,
                  prefix: str = "") -> FrameOptions:
    """Every cross-clip option of one feature stream as a frame score; names say what each
    does. The paper's capped rule is kept, fed with leave-one-clip-out loc_dens."""
    out = FrameOptions()
    clips, index = test_ids["clip"].to_numpy(), test_ids["frame_index"].to_numpy()
    smooth = f"causal {temporal} {temporal_size:g}"
    raw, _ = cs.scores("raw")
    out.scores[f"{prefix}global d (raw)"] = raw[0]
    raw_local = topk_mean(raw[1:].T, k)
    out.scores[f"{prefix}local top-{k} mean d (raw)"] = raw_local
    out.scores[f"{prefix}local top-{k} mean d (raw) + {smooth}"] = smooth_in_time(
        raw_local, clips, index, temporal, temporal_size)
    out.patch_maps[f"{prefix}local top-{k} mean d (raw)"] = raw[1:].T
    out.patch_maps[f"{prefix}local top-{k} mean d (raw) + {smooth}"] = raw[1:].T
    out.local_raw = raw[1:].T
    out.local_raw_ref = cs.est.loo_d_[1:].T
    out.evidence["local raw"] = out.raw_evidence(k)
    ratio, _ = cs.scores("ratio")
    capped = np.minimum(ratio, 1.0)
    out.scores[f"{prefix}global, paper rule, LOO-clip loc_dens"] = capped[0]
    out.scores[f"{prefix}local vote, paper rule, LOO-clip loc_dens"] = vote_score(capped[1:].T)
    out.scores[f"{prefix}local top-{k} ratio (LOO-clip loc_dens)"] = topk_mean(ratio[1:].T, k)
    ecdf, _ = cs.scores("ecdf")
    out.scores[f"{prefix}local top-{k} ecdf"] = topk_mean(ecdf[1:].T, k)
    out.patch_maps[f"{prefix}local top-{k} ecdf"] = ecdf[1:].T
    z, z_ref = cs.scores("zscore")
    g, local = z[0], topk_mean(z[1:].T, k)
    out.scores[f"{prefix}global zscore"] = g
    out.scores[f"{prefix}local top-{k} zscore"] = local
    out.patch_maps[f"{prefix}local top-{k} zscore"] = z[1:].T
    out.scores[f"{prefix}local top-{k} zscore + {smooth}"] = smooth_in_time(
        local, clips, index, temporal, temporal_size)
    out.evidence["global"] = standardize(g, z_ref[0])
    out.evidence["local"] = standardize(local, topk_mean(z_ref[1:].T, k))
    out.local_z = z[1:].T
    fused = fuse(out.evidence["global"], out.evidence["local"], fusion_weight)
    name = f"{prefix}fusion global+local zscore (w={fusion_weight:g})"
    out.scores[name] = fused
    out.scores[f"{name} + {smooth}"] = smooth_in_time(fused, clips, index, temporal,
                                                      temporal_size)
    out.patch_maps[name] = out.patch_maps[f"{name} + {smooth}"] = z[1:].T
    return out


def appearance_motion_options(appearance: FrameOptions, motion: FrameOptions,
                              test_ids: pd.DataFrame, fusion_weight: float = 0.5,
                              temporal: str = "mean", temporal_size: float = 16,
                              prefix: str = "") -> FrameOptions:
    """Appearance and motion evidence on one scale, averaged; with the global scope; smoothed."""
    out = FrameOptions()
    clips, index = test_ids["clip"].to_numpy(), test_ids["frame_index"].to_numpy()
    smooth = f"causal {temporal} {temporal_size:g}"
    local = (appearance.evidence["local"] + motion.evidence["local"]) / 2
    maps = (appearance.local_z + motion.local_z) / 2
    name = f"{prefix}appearance+motion local zscore"
    out.scores[name] = local
    out.scores[f"{name} + {smooth}"] = smooth_in_time(local, clips, index, temporal,
                                                      temporal_size)
    raw = fuse(appearance.evidence["local raw"], motion.evidence["local raw"], fusion_weight)
    rname = f"{prefix}appearance+motion local d (raw, standardized; w={fusion_weight:g})"
    out.scores[rname] = raw
    out.scores[f"{rname} + {smooth}"] = smooth_in_time(raw, clips, index, temporal,
                                                       temporal_size)
    fused = fuse(appearance.evidence["global"], local, fusion_weight)
    fname = f"{prefix}appearance+motion, fusion with global (w={fusion_weight:g})"
    out.scores[fname] = fused
    out.scores[f"{fname} + {smooth}"] = smooth_in_time(fused, clips, index, temporal,
                                                       temporal_size)
    raw_maps = (appearance.local_raw + motion.local_raw) / 2
    for n in out.scores:
        out.patch_maps[n] = raw_maps if n.startswith(rname) else maps
    return out


@dataclass
class FusedRaw:
    """Several streams' raw-distance evidence on one scale (each standardized against its own
    leave-one-clip-out training frames), averaged with weights: motion over several lags, or
    appearance with motion. A source for ``chosen_on_calibration`` like one stream's options."""

    parts: list[FrameOptions]
    weights: list[float]

    def raw_evidence(self, k: int | float, pool: int = 1) -> np.ndarray:
        return sum(w * p.raw_evidence(k, pool) for p, w in zip(self.parts, self.weights))

    @property
    def local_raw(self) -> np.ndarray:
        """The patch map: each stream's patch d over the spread of its training frames' d."""
        return sum(w * p.local_raw / max(float(p.local_raw_ref.std()), 1e-12)
                   for p, w in zip(self.parts, self.weights))


def fused_raw(parts: list, weights: list[float] | None = None) -> FusedRaw:
    """Equal weights unless given; a FusedRaw among ``parts`` is opened up into its streams."""
    weights = weights or [1 / len(parts)] * len(parts)
    flat, flat_w = [], []
    for p, w in zip(parts, weights):
        inner = p.parts if isinstance(p, FusedRaw) else [p]
        inner_w = p.weights if isinstance(p, FusedRaw) else [1.0]
        flat += inner
        flat_w += [w * iw for iw in inner_w]
    return FusedRaw(flat, flat_w)


@dataclass
class Choice:
    source: str
    k: float
    window: int
    calib_auroc: float
    pool: int = 1


def chosen_on_calibration(sources: dict[str, FrameOptions | FusedRaw], test_ids: pd.DataFrame,
                          y: np.ndarray, split: Split, ks=(0.01, 0.02, 0.04, 0.08, 0.16),
                          windows=(1, 4, 8, 16), pools=(1, 3), prefix: str = ""
                          ) -> tuple[FrameOptions, list[Choice]]:
    """The source, patch pooling, top-k share and causal window of the raw-distance options,
    chosen by AUROC on the threshold-calibration clips alone, so the evaluated clips play no
    part in the choice.

    ``sources`` maps a name ("appearance", "motion lag 4", "appearance+motion", ...) to one
    stream's options or a ``FusedRaw`` of several. One option per source, best first: the first
    is the choice among sources too."""
    clips, index = test_ids["clip"].to_numpy(), test_ids["frame_index"].to_numpy()
    cal = split.is_calib
    out, choices = FrameOptions(), []
    for name, source in sources.items():
        best = None
        for pool, k in itertools.product(pools, ks):
            frame = source.raw_evidence(k, pool)
            for w in windows:
                s = frame if w == 1 else smooth_in_time(frame, clips, index, "mean", w)
                a = auroc(y[cal], s[cal])
                if best is None or a > best[0].calib_auroc:
                    best = (Choice(name, k, w, a, pool), s)
        choice, s = best
        pooled = f", {choice.pool}x{choice.pool} pooled" if choice.pool > 1 else ""
        label = (f"{prefix}{name} local top-{choice.k:g} d (raw{pooled})"
                 + (f" + causal mean {choice.window}" if choice.window > 1 else "")
                 + " [chosen on calibration clips]")
        out.scores[label] = s
        out.patch_maps[label] = pool_patches(source.local_raw, choice.pool)
        choices.append(choice)
    order = sorted(range(len(choices)), key=lambda i: -choices[i].calib_auroc)
    names = list(out.scores)
    out.scores = {names[i]: out.scores[names[i]] for i in order}
    return out, [choices[i] for i in order]


def paper_options(model_dir: str | os.PathLike, test: Embeddings) -> FrameOptions:
    """The paper's own k-Means rule from a fitted model: global confidence and majority vote."""
    from .score import ModelScorer

    scorer = ModelScorer(model_dir, index="exact", hdbscan=False)
    conf = scorer.score(test.global_, test.local, methods=("kmeans",))["kmeans"]
    out = FrameOptions()
    out.scores["paper global (k-Means, capped confidence)"] = conf[0]
    out.scores["paper local (k-Means, majority vote)"] = vote_score(conf[1:].T)
    out.patch_maps["paper local (k-Means, majority vote)"] = conf[1:].T
    return out


def evaluate_options(scores: dict[str, np.ndarray], y: np.ndarray, split: Split) -> list[dict]:
    """One row per option: metrics on the evaluated clips at the threshold calibrated on the
    held-out clips, AUROC / PR AUC on the evaluated clips, and AUROC over all test frames."""
    rows = []
    ev_mask = ~split.is_calib
    for name, s in scores.items():
        ev = evaluate_scores(name, y[ev_mask], s[ev_mask], y_calib=y[split.is_calib],
                             s_calib=s[split.is_calib], mode="calibrated")
        rows.append({"option": name, "auroc_all": auroc(y, s), "auroc": ev.auroc,
                     "pr_auc": ev.pr_auc, "threshold": ev.threshold, **{
                         k: ev.metrics[k] for k in ("precision", "recall", "fpr", "specificity",
                                                    "f1", "balanced_accuracy")}})
    return rows


def write_run(out_dir: str | os.PathLike, ids: pd.DataFrame, scores: dict[str, np.ndarray],
              patch_maps: dict[str, np.ndarray], summary: dict) -> Path:
    """The run folder ``vitad report`` reads: per-frame scores, patch maps, summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(scores)
    columns = pd.DataFrame({f"score_{i}": np.asarray(scores[name], np.float64)
                            for i, name in enumerate(names)})
    frames = pd.concat([ids.reset_index(drop=True), columns], axis=1)  # one insert, not 70
    frames.to_parquet(out_dir / FRAMES_FILE)
    map_names = [n for n in names if n in patch_maps]
    if map_names:
        np.save(out_dir / PATCH_MAPS_FILE,
                np.stack([patch_maps[n] for n in map_names]).astype(np.float32))
    summary = dict(summary, options=names, patch_map_options=map_names)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=_json_default))
    return out_dir


def read_run(run_dir: str | os.PathLike) -> tuple[pd.DataFrame, dict, np.ndarray | None]:
    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY_FILE).exists():
        raise FileNotFoundError(f"{run_dir} is not a quality run folder (no {SUMMARY_FILE})")
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    frames = pd.read_parquet(run_dir / FRAMES_FILE)
    maps_path = run_dir / PATCH_MAPS_FILE
    maps = np.load(maps_path, mmap_mode="r") if maps_path.exists() else None
    return frames, summary, maps


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x))
