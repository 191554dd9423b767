"""`vitad serve` as an operator runs it: a process of its own on a local cluster of its own.
/v1/health says "starting" until every backend can score and "ready" only when a frame is
answered; SIGTERM (a service manager's stop) shuts Serve down and leaves no Ray process."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from ...ports import free_port

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def test_health_says_ready_only_when_it_scores_and_sigterm_leaves_nothing(model, scene):
    frame = next((scene["root"] / "test").rglob("*.png")).read_bytes()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VITAD_SERVE_TOKEN")}
    env["RAY_AUTH_MODE"] = "disabled"
    proc = subprocess.Popen([str(BIN / "vitad"), "serve", str(model["dir"]), "--port", str(port),
                             "--num-cpus", "2", "--embed-batch", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    seen: list[tuple[int, str]] = []
    try:
        deadline = time.monotonic() + 240
        with httpx.Client(base_url=url, timeout=10) as client:
            while time.monotonic() < deadline:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    health = client.get("/v1/health")
                except httpx.TransportError:  # the proxy is not listening yet
                    time.sleep(0.2)
                    continue
                status = health.json().get("status", "") if health.headers.get(
                    "content-type", "").startswith("application/json") else ""
                if not seen or seen[-1] != (health.status_code, status):
                    seen.append((health.status_code, status))
                if health.status_code == 200:
                    assert status == "ready"
                    # Ready means a frame is scored now, not after a replica finishes loading.
                    answer = client.post("/v1/detect", timeout=30, files=[
                        ("images", ("f.png", frame, "image/png"))])
                    assert answer.status_code == 200, answer.text
                    break
                # Before: Serve's proxy has no route yet (404), or the ingress waits for its
                # backends (503 "starting").
                assert health.status_code == 404 or (health.status_code, status) == (
                    503, "starting"), health.text
                time.sleep(0.2)
            else:
                pytest.fail(f"not ready in 240 s; health answers: {seen}")
        print(f"\nhealth answers in order: {seen}")
        cluster = psutil.Process(proc.pid).children(recursive=True)
        assert any(p.name() == "raylet" for p in cluster)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-2000:]
        assert "stopping" in out
        _, alive = psutil.wait_procs(cluster, timeout=30)
        assert not alive, [(p.pid, p.name()) for p in alive]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/v1/health", timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
