"""The seed paper's rule behind the Detector's interface (recipe ``paper``).

Per scope, the k-NNN confidence min(1, d / loc_dens) against the scope's training vectors
(k-Means clusters, Chroma stores; ``score.ModelScorer``), and HDBSCAN's 1 - membership. The
frame score is the local majority vote's: the ceil(P/2)-th largest patch confidence, whose
threshold t flags exactly the frames where #patches >= t is at least #patches < t. Stateless:
the paper scores frames one by one.
"""

from __future__ import annotations

import numpy as np

from ..normality import METHODS
from .detector import Detection
from .recipe import Recipe


class PaperDetector:
    def __init__(self, scorer, recipe: Recipe, thresholds: dict, methods=METHODS):
        self.scorer, self.recipe = scorer, recipe
        self.thresholds = thresholds
        self.methods = tuple(m for m in methods if m == "kmeans" or scorer.hdbscan)

    @property
    def threshold_(self) -> float:
        return float(self.thresholds["kmeans"]["patch"])

    def score(self, global_: np.ndarray, local: np.ndarray, frame_index=None, state=None
              ) -> Detection:
        from ..pipeline.score import frame_results

        results = frame_results(self.scorer.score(global_, local, self.methods),
                                self.scorer.scopes, self.thresholds)
        return detection_from_results(results, self.thresholds)


def detection_from_results(results: dict, thresholds: dict) -> Detection:
    """A Detection from the paper's per-frame results (``score.frame_results``): the k-Means
    majority vote decides; the global and local confidences are its evidence."""
    from ..pipeline.score import vote_score

    local = np.asarray(results["local_kmeans"], np.float32)
    vote = vote_score(local).astype(np.float64)
    t = thresholds["kmeans"]
    evidence = {"local": vote}
    limits = {"local": float(t["patch"])}
    if "global_kmeans" in results:
        evidence["global"] = np.asarray(results["global_kmeans"], np.float64)
        limits["global"] = float(t["global"])
    return Detection(vote, np.asarray(results["local_kmeans_anomalous"], bool), local, evidence,
                     float(t["patch"]), stateful=False, extra=results, limits=limits)
