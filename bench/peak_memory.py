"""Run a command and report the peak memory of it and every Ray process on this machine.

    python bench/peak_memory.py -- vitad fit runs/ped2/embeddings/dinov2-s14 --out /tmp/m

Samples twice a second, from /proc, the resident memory (RSS) summed over the command's process
tree and all Ray processes (raylet, GCS, workers), and prints the peak sum, the peak of the
largest single process and the wall time. Shared pages (the object store, mapped by several
workers) count once per process, so the sum is an upper bound.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def _processes() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, command line, RSS bytes)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        rss = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        out[int(name)] = (int(fields["PPid"]), cmd, rss)
    return out


def _ours(procs: dict, root: int) -> list[int]:
    tree, frontier = {root}, [root]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        pid = frontier.pop()
        for child in children.get(pid, []):
            if child not in tree:
                tree.add(child)
                frontier.append(child)
    ray = {pid for pid, (_, cmd, _) in procs.items()
           if cmd.startswith("ray::") or "raylet" in cmd or "gcs_server" in cmd
           or "ray/_private" in cmd or "ray/dashboard" in cmd}
    return list(tree | ray)


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(__doc__)
        return 2
    start = time.perf_counter()
    child = subprocess.Popen(argv)
    peak_total = peak_single = 0
    while child.poll() is None:
        procs = _processes()
        rss = [procs[p][2] for p in _ours(procs, child.pid) if p in procs]
        peak_total = max(peak_total, sum(rss))
        peak_single = max([peak_single] + rss)
        time.sleep(0.5)
    wall = time.perf_counter() - start
    print(f"[peak_memory] exit {child.returncode}; wall {wall:.1f}s; peak RSS of the command and "
          f"its Ray processes {peak_total / 2**30:.2f} GiB (largest single process "
          f"{peak_single / 2**30:.2f} GiB)", flush=True)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
