"""Paths and documents of a model directory (the contract in DESIGN.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import write_json

MODEL_FILE = "model.json"
SCOPES_DIR = "scopes"
HDBSCAN_DIR = "hdbscan"

# Decision: a confidence at or above the threshold is anomalous. For k-Means, 1.0 means "at
# least as far from the training data as the local density of its nearest neighbour"; for
# HDBSCAN, 0.5 means "membership strength under one half". `vitad evaluate` replaces them with
# thresholds calibrated on held-out clips.
DEFAULT_THRESHOLDS = {
    "kmeans": {"global": 1.0, "patch": 1.0},
    "hdbscan": {"global": 0.5, "patch": 0.5},
    "source": "paper",
}


def scope_marker(model_dir: str | os.PathLike, scope: str) -> Path:
    return Path(model_dir) / SCOPES_DIR / f"{scope}.json"


def hdbscan_path(model_dir: str | os.PathLike, scope: str) -> Path:
    return Path(model_dir) / HDBSCAN_DIR / f"{scope}.npz"


def read_model_json(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no {MODEL_FILE}); "
                                "run `vitad fit` first")
    return json.loads(path.read_text())


def embeddings_entry(emb_dir: str | os.PathLike, meta: dict, layers: tuple[int, ...]) -> dict:
    """model.json's record of the embeddings a model was fitted on: where, which weights and
    features, and the blocks it selected from them (() = all of it)."""
    return {"path": str(Path(emb_dir).resolve()),
            **{k: meta[k] for k in ("weights", "weights_sha256", "dim", "num_patches", "grid",
                                    "image_size", "patch_size", "global_pool")},
            "layers": list(meta.get("layers", [])), "selected_layers": list(layers)}


def write_model_json(model_dir: str | os.PathLike, doc: dict) -> None:
    """Atomically: a reader sees the old document or the new one, never half of one."""
    write_json(Path(model_dir) / MODEL_FILE, doc, indent=2)


def write_thresholds(model_dir: str | os.PathLike, thresholds: dict) -> None:
    doc = read_model_json(model_dir)
    doc["thresholds"] = thresholds
    write_model_json(model_dir, doc)


def shard_locations(model_dir: str | os.PathLike, doc: dict) -> list[tuple[str, list[str]]]:
    """(store location, scopes) per shard; folder locations are relative to the model dir."""
    out = []
    for shard in doc["shards"]:
        loc = shard["location"]
        if not loc.startswith(("http://", "https://")):
            loc = str(Path(model_dir) / loc)
        out.append((loc, shard["scopes"]))
    return out
