"""The run folder ``vitad report`` renders: per-frame scores of named options, their patch maps
and a summary. ``vitad evaluate`` writes one per backbone (an option per recipe), and so do the
benchmarks (an option per recipe they sweep).

    frames.parquet   identity columns, image_path / mask_path where known, score_<i> per option
    patch_maps.npy   [options with maps, frames, P] float32
    summary.json     table rows (option, metrics), options, patch_map_options, clips, chosen
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..storage.atomic import write_json

FRAMES_FILE = "frames.parquet"
PATCH_MAPS_FILE = "patch_maps.npy"
SUMMARY_FILE = "summary.json"


def write_run(out_dir: str | os.PathLike, ids: pd.DataFrame, scores: dict[str, np.ndarray],
              patch_maps: dict[str, np.ndarray], summary: dict) -> Path:
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
    write_json(out_dir / SUMMARY_FILE, summary, indent=2, default=_json_default)
    return out_dir


def read_run(run_dir: str | os.PathLike) -> tuple[pd.DataFrame, dict, np.ndarray | None]:
    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY_FILE).exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no {SUMMARY_FILE}); give the "
                                "run folder `vitad evaluate` or a benchmark wrote")
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    frames = pd.read_parquet(run_dir / FRAMES_FILE)
    maps_path = run_dir / PATCH_MAPS_FILE
    maps = np.load(maps_path, mmap_mode="r", allow_pickle=False) if maps_path.exists() else None
    return frames, summary, maps


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x))
