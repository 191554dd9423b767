"""Fitting a cross-clip Detector into a model directory with Ray tasks.

Work unit: one stream's range of scopes (leave-one-clip-out neighbours, local density and
calibration, ``CrossClipNormality``). A stream's training vectors go into the object store once;
tasks read their slice zero-copy. A finished stream is written whole with a marker, so an
interrupted fit resumes at the first stream without one.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..normality.crossclip import memory_layout
from ..pipeline.progress import Progress
from .detector import (APPEARANCE, FITTED_SETTINGS, Detector, stream_names, training_frames,
                       view_frames)
from .recipe import Recipe
from .state import (DETECTOR_DIR, TRAIN_FRAMES, load_detector, save_stream, save_train_frames,
                    stream_done)


def fit_scope_range(train: np.ndarray, lo: int, hi: int, groups: np.ndarray, recipe: dict,
                    extra: np.ndarray | None = None, extra_groups: np.ndarray | None = None
                    ) -> dict:
    """One task: scopes lo:hi of one stream (``extra``: its memory-only vectors, the views of
    the training frames). Returns their arrays (state_, train scores)."""
    import torch

    torch.set_num_threads(1)
    r = Recipe.from_dict(recipe)
    est = Detector(r).normality().fit(train[lo:hi], groups,
                                      None if extra is None else extra[lo:hi], extra_groups)
    own = r.coreset is None and extra is None  # memory = the training vectors, already held
    return {"lo": lo, "hi": hi, "loc_dens": est.loc_dens_, "mu": est.mu_, "sigma": est.sigma_,
            "ref_sorted": est.ref_sorted_, "train_scores": est.train_scores(r.calibration),
            "loo_d": est.loo_d_, "memory": None if own else est.memory_}


def signature(emb_meta: dict, frame_ids: list[str], recipe: Recipe,
              view_ids: list[str] = ()) -> str:
    h = hashlib.sha256()
    h.update(f"{emb_meta['backbone']}|{emb_meta['weights_sha256']}|{emb_meta.get('layers')}|"
             f"{emb_meta['image_size']}|".encode())
    h.update("\n".join(frame_ids).encode())
    if view_ids:  # (models fitted before views keep their signature)
        h.update(("\n" + "\n".join(view_ids)).encode())
    # zoom_views are in the view ids hashed above.
    fitted = {k: v for k, v in recipe.to_dict().items()
              if k in FITTED_SETTINGS and k != "zoom_views"}
    h.update(json.dumps(fitted, sort_keys=True).encode())
    return h.hexdigest()


def fit_streams(emb, model_dir: str | Path, recipe: Recipe, scope_chunk: int = 32,
                show_progress: bool = True, views=None) -> tuple[Detector, dict]:
    """Fit (or resume) every stream of ``recipe`` on training embeddings ``emb`` (and their
    zoomed ``views``, memory only); returns the fitted Detector and what was done. The
    embeddings' arrays are let go of once stacked scope-major (at 448 px a copy is
    gigabytes)."""
    import ray

    model_dir = Path(model_dir)
    ids, metadata = emb.ids, emb.metadata
    order = np.lexsort((ids["frame_index"].to_numpy(), ids["clip"].to_numpy()))
    frame_ids = ids["frame_id"].to_numpy()[order].tolist()
    stacked, clips, index, groups = training_frames(emb, recipe)
    emb.global_ = emb.local = None
    view_ids = [] if views is None else sorted(views.ids["frame_id"].tolist())
    sig = signature(metadata, frame_ids, recipe, view_ids)
    det = Detector(recipe)
    extra = det.view_streams(view_frames(views, clips, recipe))
    if views is not None:
        views.global_ = views.local = None
    task = ray.remote(num_cpus=1, max_retries=3)(fit_scope_range)
    n_scopes = stacked.shape[0]
    done, fitted = [], []
    progress = Progress("fit", total=n_scopes * len(stream_names(recipe)), enabled=show_progress)
    for name, train in det.training_streams(stacked, clips, index):
        extra_x, extra_groups = extra.pop(name, (None, None))
        if stream_done(model_dir, name, sig):
            done.append(name)
            progress.update(n_scopes, f"stream {name} already fitted")
            continue
        ref = ray.put(train)
        extra_ref = None if extra_x is None else ray.put(extra_x)
        del extra_x
        pending = [task.remote(ref, lo, min(n_scopes, lo + scope_chunk), groups,
                               recipe.to_dict(), extra_ref, extra_groups)
                   for lo in range(0, n_scopes, scope_chunk)]
        arrays = {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            part = ray.get(ready[0])
            for key, value in part.items():
                if key in ("lo", "hi") or value is None:
                    continue
                if key not in arrays:
                    arrays[key] = np.empty((n_scopes, *value.shape[1:]), value.dtype)
                arrays[key][part["lo"]:part["hi"]] = value
            progress.update(part["hi"] - part["lo"], f"stream {name}")
        arrays.setdefault("memory", train)
        if recipe.coreset is None:  # every training vector in the memory: it can be updated
            arrays["memory_groups"], arrays["train_rows"] = (
                (np.asarray(groups).astype(str), np.arange(len(groups))) if extra_groups is None
                else memory_layout(groups, extra_groups)[1:])
        save_stream(model_dir, name, arrays, sig)
        fitted.append(name)
        del ref, extra_ref, train, arrays
    progress.close()
    frames = pd.DataFrame({"frame_id": frame_ids, "clip": clips, "frame_index": index,
                           "loo_group": groups})
    save_train_frames(model_dir, frames)
    det = load_detector(model_dir, recipe)
    frames["frame_score"] = det.train_scores_.astype(np.float32)
    frames["appearance_score"] = det.train_scores_appearance_.astype(np.float32)
    save_train_frames(model_dir, frames)
    return det, {"fitted": fitted, "resumed": done, "signature": sig,
                 "loo_groups": int(len(np.unique(groups))),
                 "detector_dir": str(model_dir / DETECTOR_DIR)}


def fit_detector_model(emb_dir: str | Path, model_dir: str | Path, recipe: Recipe,
                       train_splits: tuple[str, ...] = ("train",), show_progress: bool = True
                       ) -> dict:
    """Load the training frames of an embeddings folder, fit the recipe's streams, write
    ``model.json``; returns what was done."""
    from ..data.embeddings import frame_rate
    from ..pipeline.fit import load_training_frames, load_training_views
    from ..storage.modeldir import embeddings_entry, write_model_json
    from ..storage.versions import package_versions

    start = time.perf_counter()
    model_dir = Path(model_dir)
    emb, layers = load_training_frames(emb_dir, recipe, train_splits)
    views = load_training_views(emb_dir, recipe, train_splits, layers)
    n_views = 0 if views is None else len(views)
    meta = emb.metadata
    model_dir.mkdir(parents=True, exist_ok=True)
    det, done = fit_streams(emb, model_dir, recipe, show_progress=show_progress, views=views)
    previous = {}
    if (model_dir / "model.json").exists():
        previous = json.loads((model_dir / "model.json").read_text())
    thresholds = {"frame": det.threshold_, "appearance": det.threshold_appearance_,
                  "target_fpr": det.target_fpr_, "source": f"label-free@fpr={det.target_fpr_:g}"}
    if previous.get("recipe") == recipe.to_dict() and \
            previous.get("thresholds", {}).get("source", "").startswith(("calibration", "user")):
        thresholds = previous["thresholds"]  # a re-run keeps thresholds set after the fit
    memory = sum((model_dir / DETECTOR_DIR / n / "memory.npy").stat().st_size
                 for n, _ in stream_names(recipe))
    doc = {
        "format": 2,
        "backbone": meta["backbone"],
        "embeddings": embeddings_entry(emb_dir, meta, layers),
        "recipe": recipe.to_dict(),
        "train": {"splits": list(train_splits), "clips": sorted(map(str, emb.ids["clip"].unique())),
                  "n_frames": len(emb), "n_views": n_views, "loo_groups": done["loo_groups"],
                  "fps": frame_rate(emb.ids)},
        "detector": {"streams": [n for n, _ in stream_names(recipe)], "memory_bytes": memory,
                     "signature": done["signature"],
                     "train_fpr_at_threshold": float((det.train_scores_ >= det.threshold_).mean())},
        "shards": [],
        "thresholds": thresholds,
        "versions": package_versions(),
        "fit_seconds": round(time.perf_counter() - start, 2),
    }
    write_model_json(model_dir, doc)
    return {**done, "seconds": time.perf_counter() - start, "threshold": thresholds["frame"]}


def update_detector_model(model_dir: str | Path, emb_dir: str | Path,
                          train_splits: tuple[str, ...] = ("train",),
                          show_progress: bool = True) -> dict:
    """``vitad update``: the normal frames of new clips in ``emb_dir`` (and their zoomed views)
    join every stream's memory and calibration of a fitted model directory, without refitting
    the rest; the model then scores as a fit on all its clips would. The detector is written
    beside the old one and swapped in whole; ``model.json``'s version goes up by one."""
    import os
    import shutil

    from ..data.embeddings import read_metadata
    from ..pipeline.fit import load_training_frames, load_training_views
    from ..pipeline.score import model_features
    from ..storage.modeldir import read_model_json, write_model_json
    from .recipe import recipe_from_model

    start = time.perf_counter()
    model_dir = Path(model_dir)
    doc = read_model_json(model_dir)
    recipe = recipe_from_model(doc)
    if recipe.kind == "paper":
        raise ValueError("the paper recipe's k-Means and HDBSCAN are fitted on all the vectors "
                         "at once: refit it with `vitad fit`")
    model_features(doc, read_metadata(emb_dir), emb_dir)
    emb, _ = load_training_frames(emb_dir, recipe, train_splits)
    views = load_training_views(emb_dir, recipe, train_splits,
                                tuple(doc["embeddings"].get("selected_layers") or ()))
    det = load_detector(model_dir, recipe, mmap=False)
    missing = [n for n, est in det.streams_.items() if getattr(est, "train_rows_", None) is None]
    if missing:
        raise ValueError(f"{model_dir} was fitted before models could be updated (streams "
                         f"{missing} lack their leave-one-clip-out state): refit it")
    frames = pd.read_parquet(model_dir / DETECTOR_DIR / TRAIN_FRAMES)
    new_ids = emb.ids
    progress = Progress("update", total=len(det.streams_), enabled=show_progress)
    t0 = time.perf_counter()
    det.update(emb, views)
    update_s = time.perf_counter() - t0
    del emb, views
    every = pd.concat([frames[["frame_id", "clip", "frame_index"]],
                       new_ids[["frame_id", "clip", "frame_index"]]], ignore_index=True)
    every["clip"] = every["clip"].astype(str)
    every = every.sort_values(["clip", "frame_index"], kind="stable").reset_index(drop=True)
    sig = hashlib.sha256(f"{doc['detector']['signature']}|update|".encode()
                         + "\n".join(new_ids["frame_id"]).encode()).hexdigest()
    staging = model_dir / f"{DETECTOR_DIR}.update"
    shutil.rmtree(staging, ignore_errors=True)
    for name, est in det.streams_.items():
        save_stream(staging.parent, name, {
            "memory": est.memory_, "loc_dens": est.loc_dens_, "mu": est.mu_,
            "sigma": est.sigma_, "ref_sorted": est.ref_sorted_,
            "train_scores": det.train_scope_scores_[name], "loo_d": est.loo_d_,
            "train_rows": est.train_rows_, "memory_groups": est.memory_clips_},
            sig, detector_dir=staging.name)
        progress.update(1, f"stream {name}")
    progress.close()
    every["loo_group"] = np.asarray(det.streams_[APPEARANCE].memory_clips_)[
        det.streams_[APPEARANCE].train_rows_]
    every["frame_score"] = det.train_scores_.astype(np.float32)
    every["appearance_score"] = det.train_scores_appearance_.astype(np.float32)
    save_train_frames(model_dir, every, detector_dir=staging.name)
    # The swap: the old detector moves aside, the new one in, the old one goes.
    old = model_dir / f"{DETECTOR_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(model_dir / DETECTOR_DIR, old)
    os.replace(staging, model_dir / DETECTOR_DIR)
    shutil.rmtree(old, ignore_errors=True)
    thresholds = doc["thresholds"]
    label_free = {"frame": det.threshold_, "appearance": det.threshold_appearance_,
                  "target_fpr": det.target_fpr_, "source": f"label-free@fpr={det.target_fpr_:g}"}
    kept = thresholds.get("source", "").startswith(("calibration", "user"))
    if not kept:
        thresholds = label_free
    clips = sorted(map(str, new_ids["clip"].unique()))
    doc["train"].update(clips=sorted(set(doc["train"]["clips"]) | set(clips)),
                        n_frames=len(every),
                        n_views=int(det.streams_[APPEARANCE].memory_.shape[1]) - len(every))
    doc["detector"].update(signature=sig, train_fpr_at_threshold=float(
        (det.train_scores_ >= det.threshold_).mean()), memory_bytes=sum(
        (model_dir / DETECTOR_DIR / n / "memory.npy").stat().st_size for n in det.streams_))
    doc["thresholds"] = thresholds
    doc["version"] = int(doc.get("version", 1)) + 1
    doc.setdefault("updates", []).append({
        "clips": clips, "frames": len(new_ids), "seconds": round(update_s, 2),
        "label_free_threshold": label_free["frame"], "thresholds_kept": kept})
    write_model_json(model_dir, doc)
    return {"version": doc["version"], "clips": clips, "frames": len(new_ids),
            "update_seconds": update_s, "seconds": time.perf_counter() - start,
            "threshold": thresholds["frame"], "thresholds_kept": kept}
