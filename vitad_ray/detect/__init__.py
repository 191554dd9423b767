"""Detection: recipes, the Detector, stream state and the model directory's detector state."""

from .recipe import DEFAULT, PAPER, RECIPES, Recipe, get_recipe, recipe_from_model

__all__ = ["DEFAULT", "PAPER", "RECIPES", "Detection", "Detector", "Recipe", "StreamState",
           "get_recipe", "label_free_threshold", "loo_groups", "recipe_from_model"]

_DETECTOR = ("Detection", "Detector", "StreamState", "label_free_threshold", "loo_groups")


def __getattr__(name: str):
    # The Detector pulls in scikit-learn (seconds to import): the CLI reads recipes and checks
    # its inputs without it.
    if name in _DETECTOR:
        from . import detector

        return getattr(detector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
