"""Detection: recipes, the Detector, stream state and the model directory's detector state."""

from .detector import Detection, Detector, StreamState, label_free_threshold, loo_groups
from .recipe import DEFAULT, PAPER, RECIPES, Recipe, get_recipe, recipe_from_model

__all__ = ["DEFAULT", "PAPER", "RECIPES", "Detection", "Detector", "Recipe", "StreamState",
           "get_recipe", "label_free_threshold", "loo_groups", "recipe_from_model"]
