"""Writing a file so that a reader (or a resumed run after a crash) sees the old file or the new
one, never half of one: the data goes to a hidden file beside it, which then replaces it."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields the temporary path to write; on success it replaces ``path``, on failure it is
    removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, doc, **dumps) -> None:
    write_text(path, json.dumps(doc, **dumps))
