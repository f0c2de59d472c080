"""The output folder of `edit`, `eval` and the demo: checked before the model loads, written by one run at a time
(OUT/rome-locate.lock), and its results.json, report.md and report.html written over only when rome-locate wrote
them."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path

from .files import check_lock, check_output_dir, output_lock
from .report import REPORT_MARKER

LOCK_NAME = "rome-locate.lock"
LOCATE_FILE = "locate.jsonl"
RESULTS_FILE = "results.json"
REPORT_FILES = ("report.md", "report.html")
_RESULTS_KEYS = {"settings", "complete", "summary", "records"}  # what report.write_results_json writes
# How the reports began before they carried REPORT_MARKER; trusted only beside a results.json of ours, so that an
# OUT written by an earlier rome-locate can still be rerun into.
_UNMARKED = {"report.md": "# rome-locate evaluation\n",
             "report.html": "<!DOCTYPE html><html><head><meta charset='utf-8'><title>rome-locate evaluation</title>"}


def lock_path(out: str | Path) -> Path:
    """The lock file of the output folder `out`: `OUT/rome-locate.lock`."""
    return Path(out) / LOCK_NAME


def out_lock(out: str | Path, flag: str = "--out") -> AbstractContextManager[Path]:
    """Hold the folder's lock for a whole run: a second run on it fails at once (files.output_lock)."""
    return output_lock(out, flag, lock=lock_path(out))


def _results_ours(path: Path) -> bool:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and _RESULTS_KEYS <= set(obj)


def _report_ours(path: Path, unmarked_ok: bool) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            head = fh.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    if REPORT_MARKER in head.splitlines()[:2]:
        return True
    return unmarked_ok and head.startswith(_UNMARKED[path.name])


def _foreign(out: Path, path: Path, flag: str, why: str) -> FileExistsError:
    return FileExistsError(f"{flag} {out}: {path} exists and was not written by rome-locate ({why}); rome-locate "
                           f"never writes over a file it did not write: pass another {flag} or move that file away")


def check_report_files(out: str | Path, flag: str = "--out") -> Path:
    """Fail when `out` holds a results.json, report.md or report.html that rome-locate did not write. Reads only."""
    out = Path(out)
    results = out / RESULTS_FILE
    ours = results.is_file() and _results_ours(results)
    if results.exists() and not ours:
        raise _foreign(out, results, flag, f"not a JSON object with the keys {sorted(_RESULTS_KEYS)}")
    for name in REPORT_FILES:
        path = out / name
        if path.exists() and not (path.is_file() and _report_ours(path, unmarked_ok=ours)):
            raise _foreign(out, path, flag, "it lacks the '<!-- written by rome-locate' line its reports carry")
    return out


def check_out_dir(out: str | Path, flag: str = "--out", lock: bool = True) -> Path:
    """Fail now, before the model loads, when `out` cannot be this run's output folder: not a writable folder,
    being written by another run (unless not `lock`: a torchrun rank whose rank 0 takes it), or holding a report
    file or locate.jsonl that rome-locate did not write."""
    from .locate import check_out

    out = check_output_dir(out, flag)
    try:
        out.mkdir(parents=True, exist_ok=True)  # a place the permission bits allow may still refuse (/sys, quotas)
    except OSError as exc:
        raise PermissionError(f"{flag} {out}: cannot create it ({exc.strerror}); choose another path") from None
    if lock:
        check_lock(out, flag, lock=lock_path(out))
    check_report_files(out, flag)
    if (out / LOCATE_FILE).exists():
        check_out(out / LOCATE_FILE)  # a locate output, no `locate` run writing it
    return out


def remove_own_trace(out: str | Path, flag: str = "--out") -> None:
    """Remove OUT/locate.jsonl for a fresh trace, only when rome-locate wrote it and no run is writing it."""
    from .locate import check_out

    located = Path(out) / LOCATE_FILE
    if not located.exists():
        return
    check_out(located)
    with output_lock(located, flag):
        located.unlink()
