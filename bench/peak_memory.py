"""Run a command and report the peak memory of it and every Ray process it starts.

    python bench/peak_memory.py -- vitad fit runs/ped2/embeddings/dinov2-s14 --out /tmp/m

Samples twice a second the resident memory (USS where readable, else RSS) summed over the
command's process tree and all processes of the Ray cluster it uses (raylet, GCS, workers),
and prints the peak sum, the peak of the largest single process and the wall time.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def _tree_and_ray(root: psutil.Process) -> list[psutil.Process]:
    procs = {}
    try:
        for p in [root] + root.children(recursive=True):
            procs[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if cmd.startswith("ray::") or "raylet" in cmd or "gcs_server" in cmd or \
                "ray/_private" in cmd or "ray/dashboard" in cmd:
            procs[p.pid] = p
    return list(procs.values())


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(__doc__)
        return 2
    start = time.perf_counter()
    child = subprocess.Popen(argv)
    root = psutil.Process(child.pid)
    peak_total = peak_single = 0
    while child.poll() is None:
        total = 0
        for p in _tree_and_ray(root):
            try:
                mem = p.memory_full_info().uss
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                try:
                    mem = p.memory_info().rss
                except psutil.Error:
                    continue
            total += mem
            peak_single = max(peak_single, mem)
        peak_total = max(peak_total, total)
        time.sleep(0.5)
    wall = time.perf_counter() - start
    print(f"[peak_memory] exit {child.returncode}; wall {wall:.1f}s; peak memory of the command "
          f"and its Ray processes {peak_total / 2**30:.2f} GiB (largest single process "
          f"{peak_single / 2**30:.2f} GiB)", flush=True)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
