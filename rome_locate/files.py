"""Files: every output is written whole or not at all (temporary file beside it, then a rename)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    """This process's umask, read without changing it where the system allows (Linux's /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def _temp_beside(path: Path) -> Iterator[tuple[int, Path]]:
    """(open descriptor, path) of a new temporary file beside `path`; on success it replaces `path`, on failure
    it is removed.

    mkstemp creates the file exclusively under an unpredictable name (O_CREAT | O_EXCL never follows a link),
    so a link planted in the output folder cannot redirect the write to another file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    tmp = Path(name)
    try:
        try:
            if hasattr(os, "fchmod"):
                # mkstemp's 0600 would make outputs private; give them the permissions a plain open would.
                os.fchmod(fd, 0o666 & ~_umask())
            yield fd, tmp
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield the path of a new, empty temporary file beside `path`; on success it replaces `path`, on failure it
    is removed.

    The temporary name keeps `path`'s suffix, so writers that infer the format
    from it (matplotlib, numpy) behave as they would on `path` itself.
    """
    with _temp_beside(Path(path)) as (_fd, tmp):
        yield tmp


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically, flushed to disk."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically, flushed to disk."""
    with _temp_beside(Path(path)) as (fd, _tmp):
        # Through the descriptor mkstemp opened: the name is never opened a second time.
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write `obj` as JSON to `path` atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def not_utf8(path: str | Path, exc: UnicodeDecodeError, data: bytes | None = None) -> str:
    """One line naming `path` for a decoding error; with the whole file's `data`, also the line of the bad byte."""
    byte = exc.object[exc.start:exc.start + 1].hex() or "??"
    where = ""
    if data is not None:
        line = data.count(b"\n", 0, exc.start) + 1
        where = f" on line {line}"
    return f"{path}: not UTF-8 text (byte 0x{byte}{where} cannot be decoded); save it as UTF-8"


def safe_name(text: str, limit: int = 60) -> str:
    """`text` (e.g. a fact id) as a file-name part, one name per text.

    A text that is already a safe name of at most `limit` characters is kept;
    otherwise runs of other characters become '_', the result is cut to
    `limit`, and "~" and 8 hex digits of the original's hash are appended, so
    two ids ("x/1" and "x_1") never share a file ("~" is never in a kept name).
    """
    text = str(text)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:limit]
    if name == text and not name.startswith("."):
        return name
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{name.lstrip('.') or 'fact'}~{digest}"


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """Fail now, before any work, when `path` cannot be written as a file; the message names `flag`."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a directory; give a file path")
    check_output_dir(path.parent, flag, of=path)
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{flag} {path}: cannot write this file (permission denied); choose another path")
    return path


def check_output_dir(path: str | Path, flag: str, of: Path | None = None) -> Path:
    """Fail now when `path` cannot be (created and) written as a directory; the message names `flag`."""
    path = Path(path)
    what = f"{flag} {of if of is not None else path}"
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise NotADirectoryError(f"{what}: {existing} is a file, not a directory; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: cannot write in {existing} (permission denied); choose another path")
    return path


LOCK_FORMAT = "pid {pid} on {host}\n"  # what a lock file holds: how a later run tells a stale lock


def lock_holder(lock: str | Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file, or None when it cannot be read (being written, or not ours)."""
    try:
        text = Path(lock).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    m = re.fullmatch(r"pid (\d+) on (\S+)\s*", text)
    return None if m is None else (int(m.group(1)), m.group(2))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # never a process rome-locate wrote: not ours to call dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def lock_is_stale(lock: str | Path) -> bool:
    """Whether `lock` was left by a process that is gone: written on this host, by a PID no longer alive.

    A lock from another host is never judged stale (its PID means nothing here),
    nor is one that cannot be read (it may be half-written by a starting run).
    """
    holder = lock_holder(lock)
    return holder is not None and holder[1] == socket.gethostname() and not _pid_alive(holder[0])


def _lock_busy(path: Path, lock: Path, flag: str) -> FileExistsError:
    holder, here = lock_holder(lock), socket.gethostname()
    if holder is None:
        held = ""
    elif holder[1] == here:
        held = f", held by pid {holder[0]} on this host, still running"
    else:
        held = f", held by pid {holder[0]} on host {holder[1]}; this is {here}, which cannot tell whether it still runs"
    return FileExistsError(f"{flag} {path} is being written by another rome-locate run (lock file {lock}{held}); "
                           f"if no other run is going, the lock is stale: delete {lock} and rerun")


def check_lock(path: str | Path, flag: str, lock: str | Path | None = None) -> None:
    """Fail now when `path` is being written by a live rome-locate run (its lock held); a stale lock passes,
    `output_lock` takes it over."""
    path = Path(path)
    lock = path.with_name(path.name + ".lock") if lock is None else Path(lock)
    if lock.exists() and not lock_is_stale(lock):
        raise _lock_busy(path, lock, flag)


def _take_over(lock: Path) -> bool:
    """Remove `lock` when it is stale; True when removed. A guard file makes one run at a time do it, so that
    two runs finding the same stale lock cannot remove the lock the first of them has just taken."""
    guard = lock.with_name(lock.name + ".takeover")
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except OSError:
        return False
    try:
        if not lock_is_stale(lock):
            return False
        lock.unlink(missing_ok=True)
        return True
    finally:
        guard.unlink(missing_ok=True)


def _create_lock(path: Path, lock: Path, flag: str) -> int:
    """The lock's file descriptor, created atomically; a stale lock is taken over (once)."""
    excl = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            return os.open(lock, excl, 0o644)
        except FileExistsError:
            if not _take_over(lock):
                raise
            return os.open(lock, excl, 0o644)
    except FileExistsError:
        raise _lock_busy(path, lock, flag) from None
    except OSError as exc:
        raise PermissionError(f"{flag} {path}: cannot write in {lock.parent} ({exc.strerror}); "
                              f"choose another path") from None


@contextmanager
def output_lock(path: str | Path, flag: str, lock: str | Path | None = None) -> Iterator[Path]:
    """Hold `path`.lock (or `lock`) while writing `path`: a second writer gets a clear error instead of
    interleaved records.

    The lock is created atomically (O_EXCL), so this is also the first real
    write in the output's directory; it is removed when the block ends. It
    holds the PID and host: a lock whose process is gone (same host, PID not
    alive: a run killed outright) is taken over; one from another host is not.
    """
    path = Path(path)
    lock = path.with_name(path.name + ".lock") if lock is None else Path(lock)
    check_output_dir(lock.parent, flag, of=path)
    fd = _create_lock(path, lock, flag)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(LOCK_FORMAT.format(pid=os.getpid(), host=socket.gethostname()))
        yield lock
    finally:
        lock.unlink(missing_ok=True)
