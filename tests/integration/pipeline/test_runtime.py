"""The local cluster `vitad` starts: its own even where a `ray start` cluster runs, answering
nothing without a token beyond the ports Ray's core needs (no open metrics endpoint), a failed
start retried and cleaned up; and clear words for an address that cannot be joined."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ...ports import free_port

BIN = Path(sys.executable).parent

LOCAL_START = """
import socket, sys
from vitad_ray.pipeline.runtime import init_ray
import ray
init_ray(num_cpus=1)
node = ray._private.worker.global_worker.node
port = node.metrics_export_port
listening = False
if 0 < port < 65536:
    with socket.socket() as s:
        s.settimeout(2)
        listening = s.connect_ex((node.node_ip_address, port)) == 0
assert ray.get(ray.remote(lambda: 7).remote()) == 7
print("metrics listening:", listening)
print("gcs port:", ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
ray.shutdown()
"""

FAILED_START = """
import psutil
from vitad_ray.pipeline.runtime import start_local
try:
    # A plasma directory the raylet cannot use: the raylet dies after GCS and agents started.
    start_local(1, attempts=1, _plasma_directory="/proc/1")
except RuntimeError as exc:
    print("error:", exc)
print("left:", [p.name() for p in psutil.Process().children(recursive=True)])
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", **extra)
    return env


@pytest.fixture
def ray_start_head(tmp_path):
    """A cluster left running by `ray start --head` in Ray's default temp dir, which records it
    as the machine's current cluster (where a bare ``ray.init()`` connects)."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus", "1",
         "--include-dashboard", "false", "--disable-usage-stats"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            done = subprocess.run([str(BIN / "ray"), "status", "--address", f"127.0.0.1:{port}"],
                                  env=_env(), capture_output=True, timeout=60, check=False)
            if done.returncode == 0:
                break
            assert proc.poll() is None, "ray start exited"
            time.sleep(2)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its GCS, raylet and agents share its group
        proc.wait(timeout=30)


@pytest.mark.integration
def test_a_local_cluster_is_its_own_and_serves_no_metrics_endpoint(ray_start_head, tmp_path):
    done = subprocess.run([sys.executable, "-c", LOCAL_START], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert "metrics listening: False" in done.stdout
    gcs_port = int(done.stdout.split("gcs port:")[1].split()[0])
    assert gcs_port != ray_start_head  # not the `ray start` cluster


@pytest.mark.integration
def test_a_failed_local_start_says_so_and_leaves_no_process(tmp_path):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", FAILED_START], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert "did not start (1 try)" in done.stdout, done.stdout
    assert "left: []" in done.stdout, done.stdout  # GCS, agents and workers were killed
    print(f"a failed start: {time.monotonic() - started:.0f} s")


def test_an_address_where_nothing_listens_fails_at_once():
    from vitad_ray.pipeline.runtime import join

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="nothing answers at 127.0.0.1"):
        join(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 5


def test_the_cli_reports_an_unreachable_cluster_in_one_line(tmp_path):
    from vitad_ray.data.synthetic import SceneConfig, generate_scene

    paths = generate_scene(tmp_path / "scene", SceneConfig(train_clips=1, test_clips=0,
                                                           frames_per_clip=2))
    done = subprocess.run([str(BIN / "vitad"), "embed", "--videos", str(paths["train_videos"]),
                           "--backbone", "tiny-dinov2", "--out", str(tmp_path / "emb"),
                           "--address", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("vitad embed: error:")]
    assert len(errors) == 1 and "nothing answers at 127.0.0.1" in errors[0], done.stderr
