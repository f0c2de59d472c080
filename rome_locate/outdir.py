"""The output folder of `edit`, `eval` and the demo, checked before the model loads."""

from __future__ import annotations

from pathlib import Path

from .files import check_output_dir


def check_out_dir(out: str | Path, flag: str = "--out") -> Path:
    """Fail now, before the model loads, when `out` cannot be this run's output folder: not a writable folder."""
    out = check_output_dir(out, flag)
    try:
        out.mkdir(parents=True, exist_ok=True)  # a place the permission bits allow may still refuse (/sys, quotas)
    except OSError as exc:
        raise PermissionError(f"{flag} {out}: cannot create it ({exc.strerror}); choose another path") from None
    return out
