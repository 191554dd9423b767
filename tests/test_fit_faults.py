"""A fit killed midway (SIGKILL to the driver and its local Ray cluster) resumes: the re-run fits
only the unfinished scopes and the model equals a clean run's."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vitad_ray.store import scope_names

from .model_equality import assert_same_model

pytestmark = pytest.mark.integration
VITAD = str(Path(sys.executable).with_name("vitad"))


def _env(ray_tmp: str) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    return env


def _fit(emb: Path, out: Path, ray_tmp: str) -> subprocess.CompletedProcess:
    return subprocess.run([VITAD, "fit", str(emb), "--out", str(out), "--no-hdbscan",
                           "--num-cpus", "2"], env=_env(ray_tmp), capture_output=True, text=True,
                          timeout=600)


def _kill_all(ray_tmp: str) -> None:
    """Ends every process of the clusters started under this test's own RAY_TMPDIR."""
    subprocess.run(["pkill", "-KILL", "-f", ray_tmp])
    time.sleep(1)


def test_killed_fit_resumes_without_redoing_scopes(small_reference, tmp_path):
    embeddings = small_reference["emb"]
    ray_tmp = tempfile.mkdtemp(prefix="vfault-")
    model = tmp_path / "model"
    proc = subprocess.Popen([VITAD, "fit", str(embeddings), "--out", str(model), "--no-hdbscan",
                             "--num-cpus", "2"], env=_env(ray_tmp), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((model / "scopes").glob("*.json"))) < 40:
        assert proc.poll() is None, "the fit ended before it could be interrupted"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _kill_all(ray_tmp)  # the local cluster it started, workers and writer actors included
    done_before = len(list((model / "scopes").glob("*.json")))
    assert 40 <= done_before < 257
    assert not (model / "model.json").exists()

    resumed = _fit(embeddings, model, ray_tmp)
    _kill_all(ray_tmp)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"fitted {257 - done_before} scopes ({done_before} already done)" in resumed.stdout
    # The same as a fit that was never interrupted.
    assert_same_model(model, small_reference["model"], scope_names(256))
    markers = [json.loads(p.read_text()) for p in (model / "scopes").glob("*.json")]
    assert len(markers) == 257
    shutil.rmtree(ray_tmp, ignore_errors=True)
