"""The detector a model directory holds, as every consumer loads it."""

from __future__ import annotations

import os

from ..normality import METHODS
from .detector import Detector
from .paper import PaperDetector
from .recipe import recipe_from_model
from .state import load_detector


def apply_thresholds(detector: Detector, thresholds: dict) -> Detector:
    """The thresholds in force (model.json's) instead of the ones recomputed at load."""
    detector.threshold_ = float(thresholds["frame"])
    detector.threshold_appearance_ = float(thresholds.get("appearance", thresholds["frame"]))
    return detector


def load_model(model_dir: str | os.PathLike, *, index: str = "exact",
               methods=METHODS, device: str | None = None,
               scopes: slice = slice(None), projected: bool = False, doc: dict | None = None
               ) -> Detector | PaperDetector:
    """The model directory's detector with the thresholds in force. ``scopes`` (cross-clip
    recipes): only that range of scopes' memories, for a serving shard."""
    from ..storage.modeldir import read_model_json

    doc = doc or read_model_json(model_dir)
    recipe = recipe_from_model(doc)
    if recipe.kind == "paper":
        from ..pipeline.score import ModelScorer

        scorer = ModelScorer(model_dir, index=index, hdbscan="hdbscan" in methods,
                             device=device, projected=projected)
        return PaperDetector(scorer, recipe, doc["thresholds"], methods)
    return apply_thresholds(load_detector(model_dir, recipe, device, scopes), doc["thresholds"])
