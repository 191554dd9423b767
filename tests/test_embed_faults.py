"""Fault tests (a) and (c): a worker node lost during embedding, and a Chroma store whose writer
was killed mid-write."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from vitad_ray.synthetic import SceneConfig, generate_scene

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               HF_HUB_OFFLINE="1", RAY_BIN=str(BIN / "ray"))
    env.pop("RAY_ADDRESS", None)
    return env


def _rows(out: Path) -> list[str]:
    parts = sorted(out.glob("part-*.parquet"))
    return [fid for p in parts for fid in pq.read_table(p, columns=["frame_id"])
            .column("frame_id").to_pylist()] if parts else []


def _worker_raylet(state: Path) -> int:
    """The pid of worker 1's raylet: start.sh gives it node-manager port head port + 101."""
    port = int((state / "port").read_text())
    out = subprocess.run(["pgrep", "-f", f"raylet.*node_manager_port={port + 101}"],
                         capture_output=True, text=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


def test_worker_node_killed_during_embedding_loses_and_duplicates_nothing(tmp_path):
    state = tmp_path / "cluster"
    # Health checks every second instead of Ray's 3 s: the lost node is declared dead (and its
    # work redone elsewhere) about 7 s sooner.
    subprocess.run(["bash", str(REPO / "cluster/local/start.sh"), "1", str(state)],
                   env=dict(_env(), RAY_health_check_period_ms="1000"), check=True,
                   capture_output=True, timeout=180)
    try:
        scene = generate_scene(tmp_path / "scene", SceneConfig(train_clips=6, test_clips=1,
                                                               frames_per_clip=24, seed=4))
        out = tmp_path / "emb"
        # 672-pixel inputs (2,304 patches): the first 24-frame chunk is written while five more
        # are still to come, so the node dies mid-stream.
        embed = subprocess.Popen(
            [str(BIN / "vitad"), "embed", "--videos", str(scene["train_videos"]), "--split",
             "train", "--fps", "0", "--backbone", "tiny-dinov2", "--image-size", "672",
             "--batch-size", "4", "--out", str(out),
             "--address", (state / "address").read_text().strip()],
            env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        emb_dir = out / "tiny-dinov2"
        deadline = time.time() + 300
        while not _rows(emb_dir) and time.time() < deadline and embed.poll() is None:
            time.sleep(0.2)
        written_before = len(_rows(emb_dir))
        os.kill(_worker_raylet(state), signal.SIGKILL)
        logs, _ = embed.communicate(timeout=600)
        assert embed.returncode == 0, logs[-3000:]
        assert 0 < written_before < 144, "the node must die while frames are still coming"
        ids = _rows(emb_dir)
        assert len(ids) == len(set(ids)) == 144  # every frame, exactly once
        expected = {f"walk{c:02d}/{i}" for c in range(6) for i in range(24)}
        assert set(ids) == expected
        run = json.loads((out / "embed_run.json").read_text())
        assert run["written"] == 144 and run["errors"] == 0
    finally:
        subprocess.run(["bash", str(REPO / "cluster/local/stop.sh"), str(state)], env=_env(),
                       timeout=120)


WRITER = """
import sys, numpy as np
from vitad_ray.store import ScopeStore
store = ScopeStore(sys.argv[1])
rng = np.random.default_rng(0)
n, d = int(sys.argv[2]), 64
for scope in ("global", "patch-000"):
    print("start", scope, flush=True)
    vecs = rng.normal(size=(n, d)).astype(np.float32)
    store.write_scope(f"tiny.{scope}", [f"c/{i}" for i in range(n)], vecs,
                      np.zeros(n, np.int32), np.ones(n, np.float32))
    print("done", scope, flush=True)
"""


def test_store_reopened_after_a_writer_crash_is_readable_and_reports_what_is_missing(tmp_path):
    from vitad_ray.store import ScopeStore, verify_store

    location, n = str(tmp_path / "store"), 30000
    proc = subprocess.Popen([sys.executable, "-c", WRITER, location, str(n)], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if line.startswith("start patch-000"):
            time.sleep(1.0)  # in the middle of the second scope's batches
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert lines[:2] == ["start global", "done global"]

    store = ScopeStore(location)  # reopens: no exception, the finished scope reads back whole
    ids, vecs, cluster, dens = store.read_scope("tiny.global")
    assert len(ids) == n and vecs.shape == (n, 64)
    np.testing.assert_array_equal(vecs, np.random.default_rng(0).normal(size=(n, 64))
                                  .astype(np.float32))
    report = verify_store(store, {"tiny.global": n, "tiny.patch-000": n})
    store.close()
    assert report["tiny.global"] == {"expected": n, "found": n, "complete": True}
    partial = report["tiny.patch-000"]
    assert not partial["complete"] and partial["found"] < n  # reported short, never silently
