"""A torchrun rank's process ends through os._exit once its output is flushed (issue 21 defect 9)."""

from __future__ import annotations

import atexit
import io
import sys

import pytest
import tqdm

from rome_locate import cli, process


class _Exited(BaseException):
    """What the stand-in for os._exit raises: the test goes on where the process would have ended."""

    def __init__(self, code: int, unflushed: dict[str, int]):
        super().__init__(code)
        self.code, self.unflushed = code, unflushed


class _Stream(io.StringIO):
    """A stdout/stderr that knows how much of what was written to it was flushed."""

    def __init__(self):
        super().__init__()
        self.flushed = 0

    def flush(self):
        super().flush()
        self.flushed = len(self.getvalue())


@pytest.fixture
def rank_process(monkeypatch):
    """torchrun's environment for rank 0 of 2, os._exit and the exit handlers replaced by recorders; stdout and
    stderr are recording streams once the test calls the function this gives (pytest resets them after setup)."""
    out, err, calls = _Stream(), _Stream(), []

    def start():
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        return out, err, calls

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 10)  # restored after the test

    def fake_exit(code):
        unflushed = {"stdout": len(out.getvalue()) - out.flushed, "stderr": len(err.getvalue()) - err.flushed}
        raise _Exited(code, unflushed)

    monkeypatch.setattr(process.os, "_exit", fake_exit)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: calls.append("atexit"))  # not pytest's own
    return start


def test_the_torchrun_entrance_ends_through_the_hard_exit_with_its_status(rank_process, monkeypatch):
    out, err, calls = rank_process()
    # fact-model does not shard: under torchrun it is bad input (status 2), reported before the end.
    monkeypatch.setattr(sys, "argv", ["rome-locate", "fact-model", "gpt2", "--path"])
    with pytest.raises(_Exited) as exited:
        cli.main()
    assert exited.value.code == 2 and "does not shard" in err.getvalue()
    assert exited.value.unflushed == {"stdout": 0, "stderr": 0}  # everything written was flushed first
    assert calls == ["atexit"]  # the exit handlers a normal exit runs (locks, logging) ran too
    assert tqdm.tqdm.monitor_interval == 0  # no tqdm monitor thread in a rank


def test_the_torchrun_entrance_keeps_a_system_exit_status(rank_process, monkeypatch):
    out, _, _ = rank_process()
    monkeypatch.setattr(sys, "argv", ["rome-locate", "--help"])
    with pytest.raises(_Exited) as exited:
        cli.main()
    assert exited.value.code == 0 and "rome-locate" in out.getvalue()
    assert exited.value.unflushed["stdout"] == 0


def test_a_bug_in_a_rank_ends_with_status_1_after_its_traceback(rank_process):
    _, err, _ = rank_process()

    def bug():
        raise RuntimeError("a bug")

    with pytest.raises(_Exited) as exited:
        process.run_rank_process(bug)
    assert exited.value.code == 1 and "RuntimeError: a bug" in err.getvalue()
    assert exited.value.unflushed["stderr"] == 0
    with pytest.raises(_Exited) as exited:
        process.run_rank_process(lambda: sys.exit("stopped"))
    assert exited.value.code == 1 and "stopped" in err.getvalue()


def test_main_with_arguments_returns_even_under_torchrun(rank_process):
    rank_process()
    # In-process callers (the tests' spawned ranks, Python users) pass argv and get the status back.
    assert cli.main(["fact-model", "gpt2", "--path"]) == 2


def test_under_torchrun_reads_world_size():
    assert process.under_torchrun({"WORLD_SIZE": "2"})
    assert not process.under_torchrun({}) and not process.under_torchrun({"WORLD_SIZE": "1"})
    assert not process.under_torchrun({"WORLD_SIZE": "x"})
    assert process.exit_status(None) == 0 and process.exit_status(3) == 3
