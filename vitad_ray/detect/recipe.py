"""Recipes: the named, serialisable settings that define a detector.

A recipe says which features a model is fitted on (input size, transformer block, motion lags),
how each scope's nearest-neighbour distance is calibrated, how patches become a frame score
(pooling, top-k), how appearance, motion and the global scope are fused, how scores are smoothed
in time, and how the label-free threshold is set. ``vitad fit`` writes the recipe into
``model.json``; everything that scores reads it back from there.

Named recipes: ``paper`` is the seed paper's rule exactly (k-Means / HDBSCAN per scope, capped
k-NNN confidence, majority vote over patches); ``default`` is the cross-clip detector, chosen on
Ped2's calibration clips (docs/benchmarks.md) and checked on generated scenes with still and
single-frame anomalies; ``appearance`` is the same without motion (no stream state).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..normality import CALIBRATIONS

KINDS = ("crossclip", "paper")
FUSIONS = ("max", "mean")


@dataclass(frozen=True)
class Recipe:
    name: str = "default"
    kind: str = "crossclip"  # crossclip: the Detector; paper: k-Means/HDBSCAN over Chroma
    # Features. image_size None: as embedded. block: the transformer block the tokens come from,
    # as a share of the backbone's depth (0.75 = block 9 of 12, 24 of 32; 1.0 = the last), or
    # None for the features as embedded.
    image_size: int | None = 224
    block: float | None = 0.75
    # Motion streams: each scope's change since this many frames earlier (frame_index units).
    motion_lags: tuple[int, ...] = (4,)
    # Perspective views: every training frame is also embedded zoomed toward its top edge by
    # these factors (``vitad embed --zoom-views``), and those vectors join every stream's memory.
    # A fixed camera looking down on a floor sees what comes nearer larger and lower in the
    # frame; without these views a pedestrian walking closer to the camera than any training one
    # did is as novel as a cart. 1.5 gave the lightest tail of leave-one-clip-out scores on
    # Ped2's training clips, no labels used (docs/benchmarks.md).
    zoom_views: tuple[float, ...] = (1.5,)
    # Per-scope calibration of the nearest distance d, all leave-one-clip-out: raw d, the uncapped
    # ratio d / loc_dens, a z-score or the empirical CDF of the training frames' distances.
    calibration: str = "raw"
    m: int = 5  # neighbours behind loc_dens
    # Appearance evidence: patch scores averaged over a pool x pool grid neighbourhood (1:
    # none), then the mean of the top share (float) or count (int) of patches.
    pool: int = 1
    top_k: float = 0.08
    # The same for the motion streams: a moving object's change spans its trail, so motion is
    # pooled wider than appearance.
    motion_pool: int = 3
    motion_top_k: float = 0.16
    # Evidence on one scale (each standardized against the training frames scored
    # leave-one-clip-out), then fused: "max" flags a frame when any evidence is high, "mean"
    # averages them. The global scope joins with this weight (0: not used).
    fusion: str = "max"
    global_weight: float = 0.0
    # Causal mean over the last W frames of the motion evidence only: motion is noisy frame to
    # frame, while appearance evidence (a still object, a one-frame event) is never smoothed away.
    temporal_window: int = 16
    coreset: float | None = None  # share of training vectors kept per scope (k-center)
    # Leave-one-clip-out needs clips: with fewer than loo_min_clips training clips, every clip
    # is cut into segments of loo_segment_s seconds that act as clips.
    loo_min_clips: int = 4
    loo_segment_s: float = 10.0
    target_fpr: float = 0.01  # the label-free threshold's false-alarm rate on training frames
    # paper: the k-Means sweep's largest k (None: half the training clips, at most 50), HDBSCAN.
    k_max: int | None = None
    hdbscan: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"recipe kind must be one of {KINDS}, got {self.kind!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if any(float(z) <= 1 for z in self.zoom_views):
            raise ValueError(f"zoom views are factors > 1, got {list(self.zoom_views)}")
        if any(int(lag) < 1 for lag in self.motion_lags):
            raise ValueError(f"motion lags are >= 1 frame, got {list(self.motion_lags)}")
        if self.block is not None and not 0 < float(self.block) <= 1:
            raise ValueError(f"block is a share of the backbone's depth in (0, 1], got {self.block}")
        if min(self.pool, self.motion_pool, self.temporal_window) < 1:
            raise ValueError("pool, motion_pool and temporal_window are >= 1")
        if not 0 < self.target_fpr < 1:
            raise ValueError(f"target_fpr is in (0, 1), got {self.target_fpr}")
        if self.coreset is not None and not 0 < self.coreset <= 1:
            raise ValueError(f"coreset is a share in (0, 1], got {self.coreset}")
        if not 0 <= self.global_weight <= 1:
            raise ValueError(f"global_weight is in [0, 1], got {self.global_weight}")
        object.__setattr__(self, "motion_lags", tuple(int(x) for x in self.motion_lags))
        object.__setattr__(self, "zoom_views", tuple(float(x) for x in self.zoom_views))

    @property
    def context_frames(self) -> int:
        """Frames of a stream's past its next frame's score depends on."""
        return max(self.motion_lags, default=0) + self.temporal_window - 1

    def layers_for(self, depth: int) -> tuple[int, ...]:
        """The block numbers to embed for a backbone of ``depth`` blocks (() = the last, or as
        embedded when the recipe names no block)."""
        if self.block is None:
            return ()
        block = max(1, min(depth, round(float(self.block) * depth)))
        return () if block == depth else (block,)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["motion_lags"] = list(self.motion_lags)
        out["zoom_views"] = list(self.zoom_views)
        return out

    @classmethod
    def from_dict(cls, doc: dict) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"unknown recipe settings {unknown}; known: {sorted(known)}")
        return cls(**doc)

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)


PAPER = Recipe(name="paper", kind="paper", image_size=224, block=1.0, motion_lags=(),
               zoom_views=(), calibration="ratio", pool=1, top_k=0.5, temporal_window=1)
DEFAULT = Recipe()
# The default without motion: a frame needs no stream state (one stream, half the default's
# memory and search), and a still scene's appearance alone decides.
APPEARANCE = DEFAULT.replace(name="appearance", motion_lags=(), temporal_window=1)
RECIPES = {r.name: r for r in (DEFAULT, APPEARANCE, PAPER)}


def get_recipe(name_or_path: str | Path | Recipe | None) -> Recipe:
    """A named recipe, or one read from a YAML / JSON file (a named ``base`` plus changes)."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if name_or_path is None:
        return DEFAULT
    text = str(name_or_path)
    if text in RECIPES:
        return RECIPES[text]
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"unknown recipe {text!r}: name one of {sorted(RECIPES)} or a YAML file")
    import yaml

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a recipe file is a mapping of settings")
    base = doc.pop("base", "default")
    if base not in RECIPES:
        raise ValueError(f"{path}: base must be one of {sorted(RECIPES)}, got {base!r}")
    doc.setdefault("name", path.stem)
    return Recipe.from_dict({**RECIPES[base].to_dict(), **doc})


def recipe_from_model(doc: dict) -> Recipe:
    """The recipe a model.json was fitted with (models written before recipes: ``paper``;
    before zoomed views and motion's own pooling: none, and the appearance's)."""
    if "recipe" not in doc:
        return PAPER
    recipe = dict(doc["recipe"])
    recipe.setdefault("zoom_views", [])
    recipe.setdefault("motion_pool", recipe.get("pool", Recipe.pool))
    recipe.setdefault("motion_top_k", recipe.get("top_k", Recipe.top_k))
    return Recipe.from_dict(recipe)


def recipe_json(recipe: Recipe) -> str:
    return json.dumps(recipe.to_dict(), sort_keys=True)


def view_splits(recipe: Recipe, splits) -> list[str]:
    """The splits of the zoomed views of the training splits ``splits`` the recipe's memory
    holds."""
    from ..data.frames import view_split

    return [view_split(s, z) for s in splits for z in recipe.zoom_views]


def check_views(recipe: Recipe, present: set[str], splits) -> None:
    """Refuses embeddings that lack the training frames' zoomed views the recipe needs."""
    missing = [s for s in view_splits(recipe, splits) if s not in present]
    if missing and recipe.kind != "paper":
        zooms = ",".join(f"{z:g}" for z in recipe.zoom_views)
        raise ValueError(f"recipe {recipe.name!r} needs the training frames' zoomed views "
                         f"({', '.join(missing)}), these embeddings hold none: run `vitad embed` "
                         f"again with --zoom-views {zooms} into the same --out (the frames "
                         "already embedded are kept), or fit a recipe file with zoom_views: []")


def embedding_layers(recipe: Recipe, metadata: dict) -> tuple[int, ...]:
    """The blocks of an embeddings folder the recipe uses: () for all of it as it is, or the
    blocks to select from a multi-block embedding. Refuses features the recipe was not made
    for, naming the ``vitad embed`` flags that give them."""
    depth = int(metadata.get("depth") or 0)
    if not depth and metadata.get("backbone"):  # embedded before depth was recorded
        from ..features.backbones import get_spec

        depth = get_spec(metadata["backbone"]).depth
    have = [int(x) for x in metadata.get("layers") or []]
    size = int(metadata["image_size"])
    wanted = recipe.layers_for(depth) if depth else ()
    hint = (f"embed with --image-size {recipe.image_size or size}"
            + f" --layers {wanted[0] if wanted else 'last'}"
            + ", or fit another recipe (--recipe paper, or a recipe file with image_size and "
              "block set to null for the features as embedded)")
    if recipe.image_size is not None and recipe.image_size != size:
        raise ValueError(f"recipe {recipe.name!r} needs {recipe.image_size} px features, these "
                         f"embeddings are {size} px: {hint}")
    if recipe.block is None or not depth:  # as embedded
        return ()
    last = (depth,)
    need = wanted or last
    if have == list(need) or (not have and need == last):
        return ()
    if set(need) <= set(have):
        return tuple(need)
    got = f"blocks {have}" if have else f"the last block ({depth})"
    raise ValueError(f"recipe {recipe.name!r} needs block {need[0]} of {depth}, these embeddings "
                     f"hold {got}: {hint}")
