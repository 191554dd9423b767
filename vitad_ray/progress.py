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
