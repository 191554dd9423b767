"""k-Means scoring throughput of a fitted model, three ways, plus fit time and sizes; and, side
by side in the same run, a cross-clip recipe's model scoring the same frames.

    python bench/score_throughput.py MODEL_DIR EMB_DIR [--frames 512] [--sequential-frames 4] \
        [--recipe-model DEFAULT_MODEL_DIR --recipe-embeddings ITS_EMB_DIR]

1. sequential: one Chroma query per frame per scope (the paper's way);
2. batched Chroma: one HNSW query per scope for a whole batch of frames;
3. batched exact: one stacked matmul over all scopes (torch).
Global-only and local (all patch scopes) are timed separately. Prints frames/s, ratios, how far
the ways agree, the fit time recorded in model.json, peak memory and the model's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitad_ray.data.embeddings import load_embeddings  # noqa: E402
from vitad_ray.normality.estimators import knnn_confidence  # noqa: E402
from vitad_ray.pipeline.score import ModelScorer  # noqa: E402
from vitad_ray.storage.modeldir import read_model_json  # noqa: E402
from vitad_ray.storage.store import GLOBAL, collection_name  # noqa: E402


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def sequential_chroma(scorer: ModelScorer, global_, local, n_frames: int) -> np.ndarray:
    """The paper's way: every frame, every scope, its own query. Returns conf [S, n_frames]."""
    conf = np.empty((len(scorer.scopes), n_frames), np.float32)
    for f in range(n_frames):
        queries = scorer._queries(global_[f:f + 1], local[f:f + 1])
        for s, scope in enumerate(scorer.scopes):
            store = scorer._store_of[scope]
            dist, rows = store.query_nearest(collection_name(scorer.backbone, scope), queries[s], 1)
            conf[s, f] = knnn_confidence(dist[:, 0], scorer.loc_dens_[s, rows[:, 0]])[0]
    return conf


def disk_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def recipe_throughput(args, frame_ids: list[str], paper_fps: float) -> dict:
    """The recipe model's Detector on the same frames (clips as streams, in time order)."""
    from vitad_ray.data.embeddings import select_layers
    from vitad_ray.detect.model import load_model
    from vitad_ray.detect.offline import score_frames

    doc = read_model_json(args.recipe_model)
    emb = load_embeddings(args.recipe_embeddings or args.embeddings,
                          splits=[args.split] if args.split else None)
    emb = emb.select(emb.ids["frame_id"].isin(frame_ids).to_numpy())
    if doc["embeddings"].get("selected_layers"):
        emb = select_layers(emb, tuple(doc["embeddings"]["selected_layers"]))
    t0 = time.perf_counter()
    det = load_model(args.recipe_model)
    load_s = time.perf_counter() - t0
    score_frames(det, emb.ids.iloc[:8], emb.global_[:8], emb.local[:8])  # warm-up
    secs, _ = timed(lambda: score_frames(det, emb.ids, emb.global_, emb.local,
                                         chunk=args.batch_size), 2)
    fps = len(emb) / secs
    size = disk_size(Path(args.recipe_model))
    print(f"\nrecipe {doc['recipe']['name']} ({args.recipe_model}): {len(emb)} frames, "
          f"{fps:,.1f} frames/s ({fps / paper_fps:.2f}x the paper's batched exact), streams "
          f"{', '.join(doc['detector']['streams'])}, {1 + emb.local.shape[1]} scopes x "
          f"{doc['train']['n_frames'] + doc['train'].get('n_views', 0)} memory vectors "
          f"({doc['train'].get('n_views', 0)} of them zoomed views) x {emb.global_.shape[1]} "
          "dims; "
          f"load {load_s:.1f}s; model directory {size / 2**20:.1f} MiB; fit "
          f"{doc.get('fit_seconds', float('nan')):.1f}s")
    return {"recipe": doc["recipe"]["name"], "recipe_frames_per_s": fps,
            "recipe_model_dir_bytes": size, "recipe_fit_seconds": doc.get("fit_seconds")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("embeddings")
    ap.add_argument("--split", default="test")
    ap.add_argument("--frames", type=int, default=512, help="frames for the batched ways")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--sequential-frames", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--recipe-model", help="a cross-clip recipe's model directory: its Detector "
                                           "scores the same frames, each clip as a stream")
    ap.add_argument("--recipe-embeddings", help="its embeddings folder (default: EMB_DIR)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    doc = read_model_json(args.model)
    emb = load_embeddings(args.embeddings, splits=[args.split] if args.split else None)
    if doc["embeddings"].get("selected_layers"):
        from vitad_ray.data.embeddings import select_layers

        emb = select_layers(emb, tuple(doc["embeddings"]["selected_layers"]))
    n = min(args.frames, len(emb))
    g, loc = emb.global_[:n], emb.local[:n]
    print(f"model {args.model}: {doc['backbone']}, {len(doc['scopes'])} scopes, "
          f"{doc['train']['n_frames']} training vectors each, D={doc['embeddings']['dim']}; "
          f"{n} query frames, batch {args.batch_size}, {args.threads} threads")

    results = {}
    t0 = time.perf_counter()
    exact = ModelScorer(args.model, index="exact", hdbscan=False)
    results["load_exact_s"] = time.perf_counter() - t0
    chroma = ModelScorer(args.model, index="chroma", hdbscan=False)

    def batched(scorer, scopes_slice):
        def run():
            out = []
            for lo in range(0, n, args.batch_size):
                hi = min(n, lo + args.batch_size)
                out.append(scorer.score(g[lo:hi], loc[lo:hi], methods=("kmeans",))["kmeans"])
            return np.concatenate(out, axis=1)[scopes_slice]
        return run

    glob_i = exact.scopes.index(GLOBAL)
    patch = slice(1, None)
    # Global only: a scorer over the global scope alone.
    exact_g = ModelScorer(args.model, index="exact", scopes=[GLOBAL], hdbscan=False)
    chroma_g = ModelScorer(args.model, index="chroma", scopes=[GLOBAL], hdbscan=False)
    rows = []
    for label, scorer, sl, rep in (("global / batched exact", exact_g, slice(None), 3),
                                   ("global / batched Chroma", chroma_g, slice(None), 1),
                                   ("local+global / batched exact", exact, slice(None), 2),
                                   ("local+global / batched Chroma", chroma, slice(None), 1)):
        batched(scorer, sl)()  # warm-up
        secs, conf = timed(batched(scorer, sl), rep)
        results[label] = n / secs
        rows.append((label, n / secs, conf))
    ns = min(args.sequential_frames, n)
    secs, seq_conf = timed(lambda: sequential_chroma(chroma, g, loc, ns))
    results["local+global / sequential Chroma (paper)"] = ns / secs
    exact_conf = rows[2][2]
    chroma_conf = rows[3][2]

    print("\n| way | frames/s |\n|---|---|")
    for label, fps, _ in rows:
        print(f"| {label} | {fps:,.1f} |")
    print(f"| local+global / sequential Chroma (paper's way) | "
          f"{results['local+global / sequential Chroma (paper)']:,.2f} |")
    seq = results["local+global / sequential Chroma (paper)"]
    print(f"\nbatched exact / sequential: {results['local+global / batched exact'] / seq:,.0f}x; "
          f"batched Chroma / sequential: {results['local+global / batched Chroma'] / seq:,.0f}x")
    agree_seq = np.abs(seq_conf - chroma_conf[:, :ns]).max()
    agree_exact = np.abs(exact_conf - chroma_conf).max()
    same = np.isclose(exact_conf, chroma_conf, atol=1e-5).mean()
    print(f"max |conf| difference: sequential vs batched Chroma {agree_seq:.2e}; "
          f"exact vs Chroma {agree_exact:.2e} ({same:.4%} of scope scores within 1e-5)")
    share_1 = float((exact_conf[patch] >= 1).mean())
    print(f"share of patch confidences at the cap of 1: {share_1:.3f}; "
          f"global: {float((exact_conf[glob_i] >= 1).mean()):.3f}")

    markers = [json.loads(p.read_text()) for p in (Path(args.model) / "scopes").glob("*.json")]
    per_scope = np.array([m["seconds"] for m in markers])
    print(f"\nfit of {len(markers)} scopes (model.json): {doc.get('fit_seconds', float('nan')):.1f}s "
          f"wall; per scope {per_scope.mean():.2f}s mean, {per_scope.max():.2f}s max (one core each)")
    size = disk_size(Path(args.model))
    chroma_size = disk_size(Path(args.model) / "chroma") if (Path(args.model) / "chroma").exists() else 0
    hd_size = disk_size(Path(args.model) / "hdbscan")
    raw = doc["train"]["n_frames"] * len(doc["scopes"]) * doc["embeddings"]["dim"] * 4
    print(f"model directory: {size / 2**20:.1f} MiB (Chroma {chroma_size / 2**20:.1f} MiB, "
          f"HDBSCAN state {hd_size / 2**20:.1f} MiB; raw float32 training vectors "
          f"{raw / 2**20:.1f} MiB)")
    if args.recipe_model:
        results.update(recipe_throughput(args, emb.ids["frame_id"].iloc[:n].tolist(),
                                         results["local+global / batched exact"]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"peak RSS of this scoring process: {peak:.0f} MiB; exact index load "
          f"{results['load_exact_s']:.1f}s")
    results.update({"fit_seconds": doc.get("fit_seconds"), "model_dir_bytes": size,
                    "peak_rss_mib": peak, "share_patch_conf_at_1": share_1})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
