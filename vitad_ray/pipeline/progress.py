"""Progress lines for long steps: count, rate and ETA on stderr, throttled."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, what: str, total: int | None = None, enabled: bool = True,
                 every_s: float = 2.0):
        self.what, self.total, self.enabled, self.every_s = what, total, enabled, every_s
        self.done = 0
        self.start = self._last = time.perf_counter()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.every_s:
            self._last = now
            self._print(note)

    def _print(self, note: str = "") -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and rate > 0 and self.done < self.total:
            eta = f", ETA {(self.total - self.done) / rate:.0f}s"
        extra = f", {note}" if note else ""
        print(f"[{self.what}] {self.done}{of} in {elapsed:.1f}s ({rate:.1f}/s{eta}{extra})",
              file=sys.stderr, flush=True)

    def close(self, note: str = "") -> None:
        if self.enabled:
            self._print(note)


class Waiting:
    """One line while a slow start runs (a Ray cluster, a model loading): on a terminal a
    spinner with the seconds so far, elsewhere the line once; then how long it took, or that it
    failed."""

    FRAMES = "|/-\\"

    def __init__(self, what: str, enabled: bool = True, stream=None):
        self.what, self.enabled = what, enabled
        self.stream = stream or sys.stderr
        self._stop = None

    def __enter__(self) -> "Waiting":
        import threading

        self.start = time.perf_counter()
        if not self.enabled:
            return self
        self._tty = self.stream.isatty()
        if self._tty:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._spin, daemon=True)
            self._thread.start()
        else:
            print(f"{self.what} ...", file=self.stream, flush=True)
        return self

    def _spin(self) -> None:
        i = 0
        while not self._stop.wait(0.2):
            elapsed = time.perf_counter() - self.start
            self.stream.write(f"\r{self.what} {self.FRAMES[i % 4]} {elapsed:.0f}s")
            self.stream.flush()
            i += 1

    def __exit__(self, kind, exc, tb) -> None:
        if not self.enabled:
            return
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
        outcome = "failed" if kind else "done"
        prefix = "\r" if self._tty else ""
        print(f"{prefix}{self.what}: {outcome} in {time.perf_counter() - self.start:.1f} s",
              file=self.stream, flush=True)
