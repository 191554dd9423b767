"""A fit killed midway (SIGKILL to the driver and its local Ray cluster) resumes: the re-run fits
only the unfinished scopes and the model equals a clean run's. Both runs start their local
cluster as `vitad` does for a user, with Ray's token auth on."""

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

from vitad_ray.storage.store import scope_names

from ...model_equality import assert_same_model

pytestmark = pytest.mark.integration
VITAD = str(Path(sys.executable).with_name("vitad"))


def _env(ray_tmp: str, home: Path) -> dict:
    """`vitad fit` as a user runs it: its local cluster keeps Ray's token auth (the session's
    clusters run without), with the token Ray makes in a home of the test's own."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_TMPDIR=ray_tmp, HOME=str(home))
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    return env


def _fit_args(emb: Path, out: Path, shards: int) -> list[str]:
    return [VITAD, "fit", str(emb), "--out", str(out), "--recipe", "paper", "--shards",
            str(shards), "--num-cpus", "2"]


def _kill_all(ray_tmp: str) -> None:
    """Ends every process of the clusters started under this test's own RAY_TMPDIR."""
    subprocess.run(["pkill", "-KILL", "-f", ray_tmp], check=False)  # none left: exit 1
    time.sleep(1)


def test_killed_fit_resumes_without_redoing_scopes(embedded, model, tmp_path):
    """The session model's fit (2 shards, HDBSCAN too), killed and resumed."""
    out = tmp_path / "model"
    args = _fit_args(embedded["out"] / "tiny-dinov2", out, model["cfg"].n_shards)
    ray_tmp = tempfile.mkdtemp(prefix="vfault-")
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.Popen(args, env=_env(ray_tmp, home), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "scopes").glob("*.json"))) < 40:
        assert proc.poll() is None, "the fit ended before it could be interrupted"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _kill_all(ray_tmp)  # the local cluster it started, workers and writer actors included
    done_before = len(list((out / "scopes").glob("*.json")))
    assert 40 <= done_before < 257
    assert not (out / "model.json").exists()

    # --verbose: Ray's own notes on the console, the token-auth one among them.
    resumed = subprocess.run([*args, "--verbose"], env=_env(ray_tmp, home), capture_output=True,
                             text=True, timeout=600, check=False)
    _kill_all(ray_tmp)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Both clusters ran with token auth: Ray made the token at the first start and kept it.
    assert len((home / ".ray" / "auth_token").read_text().strip()) >= 32
    assert "Token authentication is enabled" in resumed.stderr
    assert f"fitted {257 - done_before} scopes ({done_before} already done)" in resumed.stdout
    # The same as a fit that was never interrupted.
    assert_same_model(out, model["dir"], scope_names(256))
    markers = [json.loads(p.read_text()) for p in (out / "scopes").glob("*.json")]
    assert len(markers) == 257
    shutil.rmtree(ray_tmp, ignore_errors=True)
