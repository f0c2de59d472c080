"""A CLI process's signals and its way out: SIGTERM raised as `Terminated` (Ctrl-C's way out, so every `finally`
runs), and under torchrun the end of a rank's process through `os._exit` once its work is written (issue 21
defect 9: a background thread racing the interpreter's teardown aborted a finished rank with SIGABRT)."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, NoReturn


class Terminated(KeyboardInterrupt):
    """SIGTERM (a plain kill, Slurm, torchrun stopping the other ranks), raised in the main thread.

    A KeyboardInterrupt, so that it takes Ctrl-C's way out: every `finally` and
    context manager runs (locks removed, the report and OUT.incomplete written).
    """


def _raise_terminated(signum, frame) -> None:
    raise Terminated("stopped by SIGTERM")


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM raises Terminated while the block runs (in the main thread only: Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def under_torchrun(env: dict[str, str] | None = None) -> bool:
    """Whether this process is one of several ranks torchrun started (WORLD_SIZE above 1)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def exit_status(code: Any) -> int:
    """The status `sys.exit(code)` ends a process with: None is 0, an int itself, anything else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def hard_exit(code: int) -> NoReturn:
    """End the process with `code` now: exit handlers run and streams flushed, then `os._exit`."""
    try:
        atexit._run_exitfuncs()  # what a normal exit runs first (log handlers, file locks, tqdm's monitor)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed or gone: nothing left to write there
                pass
        # No interpreter teardown and no C++ static destructors: a thread a library left running (a gloo group
        # something still holds) can no longer race them into std::terminate after the work is written.
        os._exit(code)


def run_rank_process(run: Callable[[], Any]) -> NoReturn:
    """A torchrun rank's process from start to end: `run()`, then `hard_exit` with the status it gave (a
    SystemExit's, 1 after an uncaught exception's traceback, 130 after Ctrl-C's)."""
    try:
        import tqdm

        tqdm.tqdm.monitor_interval = 0  # no monitor thread (bars of ours and of transformers): one thread fewer
    except ImportError:
        pass
    try:
        code = exit_status(run())
    except SystemExit as exc:
        code = exit_status(exc.code)
    except BaseException as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code = 128 + signal.SIGINT if isinstance(exc, KeyboardInterrupt) else 1
    hard_exit(code)
