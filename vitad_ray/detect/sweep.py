"""Many recipes on one fitted detector: how a default is chosen, on calibration clips alone.

The costly part of a detector, the per-scope neighbour search of every stream, does not depend
on the aggregation settings (pooling, top-k, fusion, smoothing, which lags are fused). A sweep
searches once, with every lag any recipe uses, and replays ``Detector.decide`` per recipe.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from ..evaluation.metrics import auroc
from ..pipeline.fit import stack_scopes
from .detector import Detection, Detector, StreamState, stream_names
from .offline import clip_rows, concat
from .recipe import Recipe

AXES = ("motion_lags", "pool", "top_k", "motion_pool", "motion_top_k", "temporal_window",
        "fusion", "global_weight")


def recipe_grid(base: Recipe, **axes) -> list[Recipe]:
    """Every combination of the given settings on ``base``, each named by what it sets."""
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise ValueError(f"sweepable settings are {list(AXES)}, got {unknown}")
    names, values = list(axes), [list(v) for v in axes.values()]
    out, seen = [], set()
    for combo in itertools.product(*values):
        changes = dict(zip(names, combo))
        if not changes.get("motion_lags", base.motion_lags):
            changes.pop("temporal_window", None)  # nothing to smooth without motion
            changes["temporal_window"] = 1
            label = ", ".join(f"{k}={_fmt(v)}" for k, v in changes.items()
                              if k != "temporal_window")
        else:
            label = ", ".join(f"{k}={_fmt(v)}" for k, v in changes.items())
        recipe = base.replace(**changes)
        if recipe in seen:  # settings that make no difference (a window without motion)
            continue
        seen.add(recipe)
        out.append(recipe.replace(name=f"{base.name} [{label}]"))
    return out


def _fmt(value) -> str:
    if isinstance(value, (tuple, list)):
        return "+".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


class Sweep:
    """The scope scores of a set of test frames (each clip a stream, in time order) under a
    detector fitted with every lag of the recipes to come."""

    def __init__(self, detector: Detector, ids: pd.DataFrame, global_: np.ndarray,
                 local: np.ndarray):
        self.detector, self.ids = detector, ids.reset_index(drop=True)
        self.global_, self.local = global_, local
        self.clips = []
        for rows in clip_rows(self.ids):
            index = self.ids["frame_index"].to_numpy()[rows]
            queries = detector.queries(global_[rows], local[rows], index, StreamState())
            scores = {name: detector.scope_scores(name, stack_scopes(*q))
                      for name, q in queries.items()}
            self.clips.append((rows, index, scores))
        self.order = np.concatenate([rows for rows, _, _ in self.clips])

    def score(self, recipe: Recipe) -> Detection:
        """The recipe's detection of every frame, in the ids' row order."""
        det = self.detector.with_recipe(recipe)
        names = [n for n, _ in stream_names(recipe)]
        parts = [det.decide({n: scores[n] for n in names}, index, StreamState(),
                            (self.global_[rows], self.local[rows]))
                 for rows, index, scores in self.clips]
        out = concat(parts)
        back = np.argsort(self.order)
        return Detection(out.frame_score[back], out.anomalous[back], out.patch_scores[back],
                         {k: v[back] for k, v in out.evidence.items()}, out.threshold,
                         out.stateful)


def choose_on_calibration(sweep: Sweep, recipes: list[Recipe], y: np.ndarray,
                          is_calib: np.ndarray) -> list[tuple[Recipe, float, Detection]]:
    """(recipe, AUROC on the calibration clips, detection) for every recipe, best first: the
    evaluated clips' labels play no part in the order."""
    y, is_calib = np.asarray(y), np.asarray(is_calib, bool)
    rows = []
    for recipe in recipes:
        det = sweep.score(recipe)
        rows.append((recipe, auroc(y[is_calib], det.frame_score[is_calib]), det))
    return sorted(rows, key=lambda r: -np.nan_to_num(r[1], nan=-1.0))
