"""Two raylets on 127.0.0.1 (cluster/local), jobs submitted through the Job API, work on both
nodes, and the same model as a one-node run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from vitad_ray.embeddings import load_embeddings

from .model_equality import assert_same_model
from .ports import free_port

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
    env = dict(_env(), RAY_BIN=str(BIN / "ray"))
    subprocess.run(["bash", str(REPO / "cluster/local/start.sh"), "1", str(state)], env=env,
                   check=True, capture_output=True, timeout=180)
    try:
        yield {"address": (state / "address").read_text().strip(),
               "dashboard": (state / "dashboard").read_text().strip()}
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


def test_jobs_run_on_both_nodes_and_match_a_one_node_run(two_nodes, small_reference, tmp_path):
    ref = small_reference
    emb = tmp_path / "emb"
    logs = _submit(two_nodes["dashboard"], "embed",
                   ["--videos", str(ref["scene"]["train_videos"]), "--split", "train", "--fps",
                    "0", "--backbone", "tiny-dinov2", "--batch-size", "4", "--out", str(emb)])
    assert "64 frames embedded" in logs
    alive = {n["NodeID"] for n in _nodes(two_nodes["address"])}
    run = json.loads((emb / "embed_run.json").read_text())
    # Ray Data bundles a job this small into one decode task and gives its few batches to the
    # embedder actor that is ready first, so the recorded nodes are checked as real cluster
    # nodes covering every frame; the fit below must use both nodes.
    for key in ("decode_nodes", "nodes"):
        assert set(run[key]) <= alive and sum(run[key].values()) == 64
    # The same frames embedded on the one-node session cluster give the same vectors.
    a, b = load_embeddings(emb / "tiny-dinov2"), load_embeddings(ref["emb"])
    order_a, order_b = np.argsort(a.ids["frame_id"].to_numpy()), \
        np.argsort(b.ids["frame_id"].to_numpy())
    np.testing.assert_array_equal(a.ids["frame_id"].to_numpy()[order_a],
                                  b.ids["frame_id"].to_numpy()[order_b])
    np.testing.assert_allclose(a.local[order_a], b.local[order_b], atol=1e-5)
    np.testing.assert_allclose(a.global_[order_a], b.global_[order_b], atol=1e-5)
    # The fit of those embeddings on two nodes equals the one-node fit.
    multi = tmp_path / "model-2nodes"
    logs = _submit(two_nodes["dashboard"], "fit",
                   [str(ref["emb"]), "--out", str(multi), "--no-hdbscan"])
    assert "on 2 node(s)" in logs
    nodes = {json.loads(p.read_text())["node_id"] for p in (multi / "scopes").glob("*.json")}
    assert nodes == alive
    assert_same_model(multi, ref["model"], ("global", "patch-000", "patch-255"))

    # The serve-deploy job puts the endpoint on the cluster; it outlives the job.
    port = free_port()
    _submit(two_nodes["dashboard"], "serve-deploy",
            [str(multi), "--port", str(port), "--embed-batch", "4"])
    frame = next((ref["root"] / "scene" / "test").rglob("*.png")).read_bytes()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        assert client.get("/v1/health").json()["status"] == "ok"
        r = client.post("/v1/detect", files=[("images", ("f.png", frame, "image/png"))])
        assert r.status_code == 200, r.text
        answer = r.json()["results"][0]
        assert 0 <= answer["global"]["confidence"] <= 1
        assert len(answer["local"]["grid"]) == 16


def _nodes(address: str) -> list[dict]:
    """Alive nodes of the cluster, asked from a separate driver process."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps([n for n in ray.nodes() if n['Alive']], default=str))" % address)
    out = subprocess.run([sys.executable, "-c", code], env=_env(), check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])
