"""Fault test (c): a Chroma store whose writer was killed mid-write. (Fault test a, a worker node
lost during embedding, runs on the multi-node test's cluster: tests/test_multinode.py.)"""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.integration


WRITER = """
import sys, numpy as np
from vitad_ray.storage.store import ScopeStore
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
    from vitad_ray.storage.store import ScopeStore, verify_store

    # 12,000 vectors: three of Chroma's 5,461-record batches per scope, about 4 s to write here.
    location, n = str(tmp_path / "store"), 12000
    proc = subprocess.Popen([sys.executable, "-c", WRITER, location, str(n)],
                            stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if line.startswith("start patch-000"):
            time.sleep(1.5)  # in the middle of the second scope's batches
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert lines[:2] == ["start global", "done global"]

    store = ScopeStore(location)  # reopens: no exception, the finished scope reads back whole
    ids, vecs, _, _ = store.read_scope("tiny.global")
    assert len(ids) == n and vecs.shape == (n, 64)
    np.testing.assert_array_equal(vecs, np.random.default_rng(0).normal(size=(n, 64))
                                  .astype(np.float32))
    report = verify_store(store, {"tiny.global": n, "tiny.patch-000": n})
    store.close()
    assert report["tiny.global"] == {"expected": n, "found": n, "complete": True}
    partial = report["tiny.patch-000"]
    assert not partial["complete"] and partial["found"] < n  # reported short, never silently
