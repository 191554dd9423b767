"""Two raylets on 127.0.0.1 (cluster/local): jobs submitted through the Job API, work on both
nodes, and the same model as a one-node run; then (fault test a) the worker node lost during an
embedding. One cluster serves both tests, in this order: the second kills its worker node."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from vitad_ray.embeddings import load_embeddings
from vitad_ray.synthetic import SceneConfig, generate_scene

from .model_equality import assert_same_model
from .ports import free_port
from .tiny_scene import FRAMES, TRAIN_CLIPS

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    # Health checks every second instead of Ray's 3 s: the node the second test kills is declared
    # dead (and its work redone elsewhere) about 7 s sooner.
    env = dict(_env(), RAY_BIN=str(BIN / "ray"), RAY_health_check_period_ms="1000")
    subprocess.run(["bash", str(REPO / "cluster/local/start.sh"), "1", str(state)], env=env,
                   check=True, capture_output=True, timeout=180)
    try:
        yield {"address": (state / "address").read_text().strip(),
               "dashboard": (state / "dashboard").read_text().strip(), "state": state}
    finally:
        subprocess.run(["bash", str(REPO / "cluster/local/stop.sh"), str(state)], env=env,
                       timeout=120)


def _submit(dashboard: str, step: str, args: list[str]) -> str:
    """`vitad submit` as a user runs it: a separate process, real Job API, logs streamed back."""
    out = subprocess.run([str(BIN / "vitad"), "submit", step, "--dashboard", dashboard,
                          "--working-dir", str(REPO), "--", *args], env=_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "SUCCEEDED" in out.stdout
    return out.stdout


def test_jobs_run_on_both_nodes_and_match_a_one_node_run(two_nodes, scene, embedded, model,
                                                         tmp_path):
    """The session's tiny scene, embedded and fitted again as jobs on two nodes, against the
    session cluster's embeddings and model."""
    emb = tmp_path / "emb"
    logs = _submit(two_nodes["dashboard"], "embed",
                   ["--videos", str(scene["train_videos"]), "--split", "train", "--fps", "0",
                    "--backbone", "tiny-dinov2", "--batch-size", "4", "--out", str(emb)])
    n_train = TRAIN_CLIPS * FRAMES
    assert f"{n_train} frames embedded" in logs
    alive = {n["NodeID"] for n in _nodes(two_nodes["address"])}
    run = json.loads((emb / "embed_run.json").read_text())
    # Ray Data may give a job this small to the embedder actor that is ready first, so the
    # recorded nodes are checked as real cluster nodes covering every frame; the fit below must
    # use both nodes.
    for key in ("decode_nodes", "nodes"):
        assert set(run[key]) <= alive and sum(run[key].values()) == n_train
    # The same frames embedded on the one-node session cluster give the same vectors.
    reference = embedded["out"] / "tiny-dinov2"
    a, b = load_embeddings(emb / "tiny-dinov2"), load_embeddings(reference, splits=["train"])
    order_a, order_b = np.argsort(a.ids["frame_id"].to_numpy()), \
        np.argsort(b.ids["frame_id"].to_numpy())
    np.testing.assert_array_equal(a.ids["frame_id"].to_numpy()[order_a],
                                  b.ids["frame_id"].to_numpy()[order_b])
    np.testing.assert_allclose(a.local[order_a], b.local[order_b], atol=1e-5)
    np.testing.assert_allclose(a.global_[order_a], b.global_[order_b], atol=1e-5)
    # The fit of those embeddings on two nodes, with the session model's settings (2 shards,
    # HDBSCAN too), equals the one-node fit.
    multi = tmp_path / "model-2nodes"
    logs = _submit(two_nodes["dashboard"], "fit",
                   [str(reference), "--out", str(multi), "--shards", str(model["cfg"].n_shards)])
    assert "on 2 node(s)" in logs
    nodes = {json.loads(p.read_text())["node_id"] for p in (multi / "scopes").glob("*.json")}
    assert nodes == alive
    assert_same_model(multi, model["dir"], ("global", "patch-000", "patch-255"))

    # The serve-deploy job puts the endpoint on the cluster; it outlives the job.
    port = free_port()
    _submit(two_nodes["dashboard"], "serve-deploy",
            [str(multi), "--port", str(port), "--embed-batch", "4"])
    frame = next((scene["root"] / "test").rglob("*.png")).read_bytes()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        assert client.get("/v1/health").json()["status"] == "ok"
        r = client.post("/v1/detect", files=[("images", ("f.png", frame, "image/png"))])
        assert r.status_code == 200, r.text
        answer = r.json()["results"][0]
        assert 0 <= answer["global"]["confidence"] <= 1
        assert len(answer["local"]["grid"]) == 16
    _serve_shutdown(two_nodes["dashboard"])


def _serve_shutdown(dashboard: str) -> None:
    """Removes the endpoint and its replicas (1.75 of the cluster's 2 CPUs) from the cluster."""
    subprocess.run([str(BIN / "serve"), "shutdown", "--address", dashboard, "--yes"], env=_env(),
                   check=True, capture_output=True, timeout=120)


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


def test_worker_node_killed_during_embedding_loses_and_duplicates_nothing(two_nodes, tmp_path):
    _serve_shutdown(two_nodes["dashboard"])  # idempotent; the test above may have stopped early
    scene = generate_scene(tmp_path / "scene", SceneConfig(train_clips=6, test_clips=1,
                                                           frames_per_clip=24, seed=4))
    out = tmp_path / "emb"
    # 672-pixel inputs (2,304 patches): the first 24-frame chunk is written while five more are
    # still to come, so the node dies mid-stream.
    embed = subprocess.Popen(
        [str(BIN / "vitad"), "embed", "--videos", str(scene["train_videos"]), "--split",
         "train", "--fps", "0", "--backbone", "tiny-dinov2", "--image-size", "672",
         "--batch-size", "4", "--out", str(out), "--address", two_nodes["address"]],
        env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    emb_dir = out / "tiny-dinov2"
    deadline = time.time() + 300
    while not _rows(emb_dir) and time.time() < deadline and embed.poll() is None:
        time.sleep(0.2)
    written_before = len(_rows(emb_dir))
    os.kill(_worker_raylet(two_nodes["state"]), signal.SIGKILL)
    logs, _ = embed.communicate(timeout=600)
    assert embed.returncode == 0, logs[-3000:]
    assert 0 < written_before < 144, "the node must die while frames are still coming"
    ids = _rows(emb_dir)
    assert len(ids) == len(set(ids)) == 144  # every frame, exactly once
    expected = {f"walk{c:02d}/{i}" for c in range(6) for i in range(24)}
    assert set(ids) == expected
    run = json.loads((out / "embed_run.json").read_text())
    assert run["written"] == 144 and run["errors"] == 0


def _nodes(address: str) -> list[dict]:
    """Alive nodes of the cluster, asked from a separate driver process."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps([n for n in ray.nodes() if n['Alive']], default=str))" % address)
    out = subprocess.run([sys.executable, "-c", code], env=_env(), check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])
