"""The local cluster `vitad` starts: its own, and answering nothing without a token beyond the
ports Ray's core needs (no open metrics endpoint)."""

import os
import subprocess
import sys

import pytest

CODE = """
import socket
from vitad_ray.runtime import init_ray
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
ray.shutdown()
"""


@pytest.mark.integration
def test_a_local_cluster_serves_no_metrics_endpoint(tmp_path):
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "metrics listening: False" in done.stdout
