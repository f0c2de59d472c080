"""Files: every output is written whole or not at all (temporary file beside it, then a rename)."""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed.

    The temporary name keeps `path`'s suffix, so writers that infer the format
    from it (matplotlib, numpy) behave as they would on `path` itself.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain name (not mkstemp's 0600 file) so the output gets the user's umask permissions.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically, flushed to disk."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write `obj` as JSON to `path` atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def safe_name(text: str, limit: int = 60) -> str:
    """`text` (e.g. a fact id) as a file-name part: runs of other characters become '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))[:limit] or "fact"
