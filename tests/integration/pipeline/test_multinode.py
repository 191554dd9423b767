"""Two raylets on 127.0.0.1 (cluster/local, with Ray's token auth on as start.sh runs it by
default), jobs submitted through the Job API: a fit on both nodes equal to the one-node run and an
endpoint deployed from it; then (fault test a) an embedding job that loses the worker node
midway. One cluster serves both tests, in this order: the second kills its worker node."""

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

from vitad_ray.data.embeddings import load_embeddings
from vitad_ray.data.synthetic import SceneConfig, generate_scene

from ...model_equality import assert_same_model
from ...ports import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
SIZE = 672  # the node-loss embedding's input size


def _env(home: Path) -> dict:
    """start.sh's cluster runs Ray's token auth, as it does for a user; its clients carry the
    token Ray made in ``home``."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    env["HOME"] = str(home)
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    home = tmp_path_factory.mktemp("home")  # of the cluster and its clients: Ray's token is there
    # Health checks every second instead of Ray's 3 s: the node the second test kills is declared
    # dead (and its work redone elsewhere) about 7 s sooner.
    env = dict(_env(home), RAY_BIN=str(BIN / "ray"), RAY_health_check_period_ms="1000")
    env.pop("RAY_AUTH_MODE")  # start.sh's default
    subprocess.run(["bash", str(REPO / "cluster/local/start.sh"), "1", str(state)], env=env,
                   check=True, capture_output=True, timeout=180)
    token = (home / ".ray" / "auth_token").read_text().strip()
    try:
        yield {"address": (state / "address").read_text().strip(),
               "dashboard": (state / "dashboard").read_text().strip(), "state": state,
               "env": _env(home), "auth": {"Authorization": f"Bearer {token}"}}
    finally:
        subprocess.run(["bash", str(REPO / "cluster/local/stop.sh"), str(state)], env=env,
                       timeout=120, check=False)


def _submit(cluster: dict, step: str, args: list[str]) -> str:
    """`vitad submit` as a user runs it: a separate process, real Job API, logs streamed back."""
    out = subprocess.run([str(BIN / "vitad"), "submit", step, "--dashboard", cluster["dashboard"],
                          "--working-dir", str(REPO), "--", *args], env=cluster["env"], cwd=REPO,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "SUCCEEDED" in out.stdout
    return out.stdout


def test_a_client_without_the_token_is_told_how_to_give_it(two_nodes, scene, tmp_path):
    """Joining the token cluster as a user would without RAY_AUTH_MODE=token: one line that
    names the address and the settings to give, exit code 2."""
    env = {k: v for k, v in two_nodes["env"].items() if k != "RAY_AUTH_MODE"}
    env["HOME"] = str(tmp_path)  # no token file either
    done = subprocess.run([str(BIN / "vitad"), "embed", "--manifest", str(scene["manifest"]),
                           "--backbone", "tiny-dinov2", "--out", str(tmp_path / "emb"),
                           "--address", two_nodes["address"]],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("vitad embed: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert f"could not join the Ray cluster at {two_nodes['address']}" in errors[0]
    assert "set RAY_AUTH_MODE=token" in errors[0]
    assert not (tmp_path / "emb").exists()


def test_fit_and_serve_jobs_run_on_both_nodes_and_match_a_one_node_run(two_nodes, scene, embedded,
                                                                       model, tmp_path):
    """The session's tiny embeddings fitted again as a job on two nodes, against the session
    cluster's model; then the serve-deploy job puts that model behind the endpoint."""
    alive = {n["node_id"] for n in _nodes(two_nodes)}
    assert len(alive) == 2
    # start.sh's cluster runs Ray's token auth: the dashboard refuses a caller without it.
    refused = httpx.get(f"{two_nodes['dashboard']}/api/v0/nodes", timeout=30)
    assert refused.status_code == 401, refused.text
    # The fit with the session model's settings (2 shards, HDBSCAN too) equals the one-node fit.
    multi = tmp_path / "model-2nodes"
    logs = _submit(two_nodes, "fit",
                   [str(embedded["out"] / "tiny-dinov2"), "--out", str(multi), "--recipe",
                    "paper", "--shards", str(model["cfg"].n_shards)])
    assert "on 2 node(s)" in logs
    nodes = {json.loads(p.read_text())["node_id"] for p in (multi / "scopes").glob("*.json")}
    assert nodes == alive
    assert_same_model(multi, model["dir"], ("global", "patch-000", "patch-255"))

    # The serve-deploy job puts the endpoint on the cluster; it outlives the job.
    port = free_port()
    _submit(two_nodes, "serve-deploy",
            [str(multi), "--port", str(port), "--embed-batch", "4"])
    frame = next((scene["root"] / "test").rglob("*.png")).read_bytes()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        assert client.get("/v1/health").json()["status"] == "ready"
        r = client.post("/v1/detect", files=[("images", ("f.png", frame, "image/png"))])
        assert r.status_code == 200, r.text
        answer = r.json()["results"][0]
        assert 0 <= answer["global"]["confidence"] <= 1
        assert len(answer["local"]["grid"]) == 16
    _serve_shutdown(two_nodes)


def _serve_shutdown(cluster: dict) -> None:
    """Removes the endpoint and its replicas (1.75 of the cluster's 2 CPUs) from the cluster,
    through the dashboard's Serve REST API; no effect when Serve is not running."""
    r = httpx.delete(f"{cluster['dashboard']}/api/serve/applications/", headers=cluster["auth"],
                     timeout=120)
    assert r.status_code == 200, r.text


def _rows(out: Path) -> list[str]:
    parts = sorted(out.glob("part-*.parquet"))
    return [fid for p in parts for fid in pq.read_table(p, columns=["frame_id"])
            .column("frame_id").to_pylist()] if parts else []


def _worker_raylet(state: Path) -> int:
    """The pid of worker 1's raylet: start.sh gives it node-manager port head port + 101."""
    port = int((state / "port").read_text())
    out = subprocess.run(["pgrep", "-f", f"raylet.*node_manager_port={port + 101}"],
                         capture_output=True, text=True, check=False).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


def test_embed_job_loses_its_worker_node_and_loses_or_duplicates_nothing(two_nodes, tmp_path):
    """`vitad submit embed` on two nodes; the worker node is killed while frames are still
    coming. Every frame is written exactly once, and its vectors are the backbone's."""
    _serve_shutdown(two_nodes)  # idempotent; the test above may have stopped early
    alive = {n["node_id"] for n in _nodes(two_nodes)}
    scene = generate_scene(tmp_path / "scene", SceneConfig(train_clips=6, test_clips=1,
                                                           frames_per_clip=24, seed=4))
    out = tmp_path / "emb"
    # 672-pixel inputs (2,304 patches): the first 24-frame chunk is written while five more are
    # still to come, so the node dies mid-stream. The job's driver runs on the head node.
    submit = subprocess.Popen(
        [str(BIN / "vitad"), "submit", "embed", "--dashboard", two_nodes["dashboard"],
         "--working-dir", str(REPO), "--", "--videos", str(scene["train_videos"]), "--split",
         "train", "--fps", "0", "--backbone", "tiny-dinov2", "--image-size", str(SIZE),
         "--zoom-views", "none", "--batch-size", "4", "--out", str(out)],
        env=two_nodes["env"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    emb_dir = out / "tiny-dinov2"
    deadline = time.time() + 300
    while not _rows(emb_dir) and time.time() < deadline and submit.poll() is None:
        time.sleep(0.2)
    written_before = len(_rows(emb_dir))
    os.kill(_worker_raylet(two_nodes["state"]), signal.SIGKILL)
    logs, _ = submit.communicate(timeout=600)
    assert submit.returncode == 0 and "SUCCEEDED" in logs, logs[-3000:]
    assert 0 < written_before < 144, "the node must die while frames are still coming"
    assert "144 frames embedded" in logs
    ids = _rows(emb_dir)
    assert len(ids) == len(set(ids)) == 144  # every frame, exactly once
    expected = {f"walk{c:02d}/{i}" for c in range(6) for i in range(24)}
    assert set(ids) == expected
    run = json.loads((out / "embed_run.json").read_text())
    assert run["written"] == 144 and run["errors"] == 0
    for key in ("decode_nodes", "nodes"):
        assert set(run[key]) <= alive, key
    # The first and last frame of every clip (the clips were decoded and embedded on both
    # nodes, before and after the loss) are the plain backbone's vectors in this process.
    _assert_vectors_are_the_backbones(scene["train_videos"], emb_dir, frames=(0, 23))


def _assert_vectors_are_the_backbones(videos: Path, emb_dir: Path, frames: tuple[int, ...]):
    from vitad_ray.data.frames import items_from_videos
    from vitad_ray.features.backbones import create_backbone
    from vitad_ray.pipeline.embed import decode_batch

    wanted = {}
    for item in items_from_videos([videos], "train", label=0, fps=0):
        for chunk in decode_batch({k: np.asarray([v]) for k, v in item.items()}, (SIZE,)):
            for fid, index, pixels in zip(chunk["frame_id"], chunk["frame_index"],
                                          chunk[f"pixels_{SIZE}"]):
                if index in frames:
                    wanted[fid] = pixels
    assert len(wanted) == 6 * len(frames)
    global_, local = create_backbone("tiny-dinov2", image_size=SIZE).embed(
        np.stack(list(wanted.values())))
    emb = load_embeddings(emb_dir)
    at = {fid: i for i, fid in enumerate(emb.ids["frame_id"])}
    rows = [at[f] for f in wanted]
    np.testing.assert_allclose(emb.global_[rows], global_, atol=1e-5)
    np.testing.assert_allclose(emb.local[rows], local, atol=1e-5)


def _nodes(cluster: dict) -> list[dict]:
    """Alive nodes of the cluster, from the dashboard's state API."""
    r = httpx.get(f"{cluster['dashboard']}/api/v0/nodes", params={"limit": 100},
                  headers=cluster["auth"], timeout=30)
    r.raise_for_status()
    return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]
