"""Outputs of edit/eval/demo/hparams/locate --plots (issue 21): checked before the model loads, never written over
when rome-locate did not write them, one run at a time, and a run stopped by SIGTERM leaves no lock behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rome_locate import cli, files
from rome_locate.fact_models import counterfact_path, fact_model_dir, facts_path

M = str(fact_model_dir("gpt2"))
CF = str(counterfact_path("gpt2"))
KNOWN = str(facts_path("gpt2"))
HPARAMS = str(Path(__file__).resolve().parent.parent / "hparams" / "ROME" / "fact-gpt2.yaml")
HOST = socket.gethostname()
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _run(argv, capsys):
    """(exit code, the error lines of stderr, stdout)."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, [line for line in err.splitlines() if line.startswith("rome-locate") and "error" in line], out


def _pipeline(command, out, limit=2):
    quiet = ["--quiet"] if command == "edit" else ["--no-progress", "--max-new-tokens", "2"]
    return [command, "--model", M, "--device", "cpu", "--facts", CF, "--limit", str(limit), "--hparams", HPARAMS,
            "--out", str(out), *quiet]


def _locate(out, limit=2, samples=2):
    return ["locate", "--model", M, "--facts", KNOWN, "--out", str(out), "--device", "cpu", "--samples",
            str(samples), "--limit", str(limit), "--quiet"]


def _live_lock(lock: Path) -> str:
    """Plant the lock of a run that is still going (this very process) and return its text."""
    text = f"pid {os.getpid()} on {HOST}\n"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(text)
    return text


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model is loaded: the outputs must be checked first."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(cli, "load_model", load)


def _wait_for(condition, procs, timeout=300.0) -> None:
    """Wait until `condition()` holds; fail (naming what the processes printed) if one of them ends first."""
    end = time.monotonic() + timeout
    while not condition():
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"the run ended before it was stopped (exit {p.returncode}): {p.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            pytest.fail("timed out waiting for the run")
        time.sleep(0.05)


# ---- 8: stale locks and SIGTERM ----------------------------------------------------------------------------


def test_output_lock_takes_over_only_the_lock_of_a_process_gone_on_this_host(tmp_path):
    out = tmp_path / "a.jsonl"
    lock = tmp_path / "a.jsonl.lock"
    lock.write_text(f"pid {_dead_pid()} on {HOST}\n")
    with files.output_lock(out, "--out") as held:
        assert held == lock and files.lock_holder(lock) == (os.getpid(), HOST)
        with pytest.raises(FileExistsError, match="still running"):
            with files.output_lock(out, "--out"):
                pass
    assert not lock.exists()
    for text, words in ((f"pid {_dead_pid()} on elsewhere-node\n", "on host elsewhere-node"),
                        ("", "is being written by another rome-locate run")):
        lock.write_text(text)
        with pytest.raises(FileExistsError, match=words) as caught:
            with files.output_lock(out, "--out"):
                pass
        assert f"delete {lock}" in str(caught.value) and lock.read_text() == text
    assert not (tmp_path / "a.jsonl.lock.takeover").exists()


def test_locate_takes_over_a_lock_whose_process_is_gone(tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    lock = tmp_path / "a.jsonl.lock"
    lock.write_text(f"pid {_dead_pid()} on {HOST}\n")
    code, errors, _ = _run(_locate(out), capsys)
    assert code == 0 and not errors and not lock.exists()
    assert len(out.read_text().splitlines()) == 2


def test_sigterm_under_torchrun_removes_the_shard_locks_and_marks_out_interrupted(tmp_path):
    out = tmp_path / "locate.jsonl"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        ranks.append(subprocess.Popen([sys.executable, "-m", "rome_locate", *_locate(out, limit=600, samples=10)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    locks = [tmp_path / f"locate.jsonl.rank{r}-of-2.lock" for r in range(2)]
    try:
        _wait_for(lambda: all(lock.exists() for lock in locks), ranks)
        for p in ranks:
            p.send_signal(signal.SIGTERM)
        errs = [p.communicate(timeout=300)[1] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert [p.returncode for p in ranks] == [128 + signal.SIGTERM] * 2, [e[-3000:] for e in errs]
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob("*.takeover"))
    marker = json.loads((tmp_path / "locate.jsonl.incomplete").read_text())
    assert marker["status"] == "interrupted" and marker["complete"] is False
    assert sorted(marker["failed_ranks"]) == ["0", "1"] and "SIGTERM" in marker["failed_ranks"]["0"]


# ---- 13: an unwritable --out, up front ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["edit", "eval"])
def test_unwritable_out_is_one_line_before_the_model_loads(tmp_path, capsys, no_model, command):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for out, words in ((a_file, "is a file, not a directory"), (a_file / "run", "is a file, not a directory"),
                       ("/sys/rome-locate-test", "cannot create it")):
        code, errors, _ = _run(_pipeline(command, out), capsys)
        assert code == 2 and len(errors) == 1, errors
        assert errors[0].startswith(f"rome-locate {command}: error: --out") and words in errors[0]
    assert a_file.read_text() == "x"


# ---- 1: report files rome-locate did not write ---------------------------------------------------------------


@pytest.mark.parametrize("name, text", [("results.json", '{"my": "numbers"}\n'), ("report.md", "# My report\n"),
                                        ("report.html", "<html>my page</html>\n")])
def test_edit_and_eval_never_write_over_report_files_they_did_not_write(tmp_path, capsys, no_model, name, text):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text(text)
    for command in ("edit", "eval"):
        code, errors, _ = _run(_pipeline(command, out), capsys)
        assert code == 2 and len(errors) == 1, errors
        assert str(out / name) in errors[0] and "not written by rome-locate" in errors[0]
    assert (out / name).read_text() == text and sorted(os.listdir(out)) == [name]


def test_a_rerun_writes_over_its_own_reports_and_leaves_no_lock(tmp_path, capsys):
    from rome_locate.report import REPORT_MARKER

    out = tmp_path / "out"
    argv = _pipeline("edit", out)
    assert cli.main(argv) == 0
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert md.splitlines()[0] == REPORT_MARKER and page.splitlines()[:2] == ["<!DOCTYPE html>", REPORT_MARKER]
    (out / "report.md").write_text(md + "\nan older run's text\n")
    assert cli.main(argv) == 0  # the same command again: its own files are rewritten
    assert "an older run's text" not in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["complete"] is True
    assert not (out / "rome-locate.lock").exists()


def test_reports_of_an_earlier_rome_locate_count_as_its_own_only_beside_its_results(tmp_path):
    from rome_locate.outdir import check_report_files

    out = tmp_path / "old"
    out.mkdir()
    (out / "report.md").write_text("# rome-locate evaluation\n\n## Settings\n")  # written before the marker
    with pytest.raises(FileExistsError, match="report.md"):
        check_report_files(out)
    (out / "results.json").write_text(json.dumps({"settings": {}, "complete": True, "error": None, "summary": {},
                                                  "records": []}))
    assert check_report_files(out) == out


# ---- 3: one run at a time on an edit/eval folder and on hparams -o -------------------------------------------


def test_edit_eval_and_hparams_refuse_an_output_another_run_holds(tmp_path, capsys, no_model):
    out = tmp_path / "out"
    lock = out / "rome-locate.lock"
    text = _live_lock(lock)
    for command in ("edit", "eval"):
        code, errors, _ = _run(_pipeline(command, out), capsys)
        assert code == 2 and len(errors) == 1, errors
        assert "is being written by another rome-locate run" in errors[0] and str(lock) in errors[0]
        assert "still running" in errors[0]
    assert lock.read_text() == text and sorted(os.listdir(out)) == ["rome-locate.lock"]
    yaml_out = tmp_path / "h.yaml"
    yaml_lock = tmp_path / "h.yaml.lock"
    text = _live_lock(yaml_lock)
    code, errors, _ = _run(["hparams", "--model", M, "--facts", KNOWN, "-o", str(yaml_out), "--device", "cpu",
                            "--no-validate", "--layer", "1", "--quiet"], capsys)
    assert code == 2 and len(errors) == 1 and str(yaml_lock) in errors[0] and "-o" in errors[0], errors
    assert yaml_lock.read_text() == text and not yaml_out.exists()


def test_hparams_holds_its_lock_while_it_runs_and_removes_it(tmp_path, capsys, monkeypatch):
    from rome_locate import configure

    yaml_out = tmp_path / "h.yaml"
    seen = []
    real = configure.write_traced

    def write_traced(job, *args, **kwargs):
        seen.append(files.lock_holder(tmp_path / "h.yaml.lock"))
        return real(job, *args, **kwargs)

    monkeypatch.setattr(configure, "write_traced", write_traced)
    argv = ["hparams", "--model", M, "--facts", KNOWN, "-o", str(yaml_out), "--device", "cpu", "--no-validate",
            "--layer", "1", "--quiet"]
    assert _run(argv, capsys)[0] == 0
    assert seen == [(os.getpid(), HOST)] and yaml_out.is_file() and not (tmp_path / "h.yaml.lock").exists()


def test_a_second_edit_fails_at_once_and_sigterm_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "out"
    argv = _pipeline("edit", out, limit=12)
    run = subprocess.Popen([sys.executable, "-m", "rome_locate", *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for(lambda: (out / "results.json").exists(), [run])  # a fact is finished: mid-run
        code, errors, _ = _run(argv, capsys)
        assert code == 2 and len(errors) == 1 and str(out / "rome-locate.lock") in errors[0], errors
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=300)
    finally:
        run.kill()
    lines = [line for line in err.splitlines() if line.startswith("rome-locate")]
    assert run.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("rome-locate edit: error: stopped by SIGTERM")
    assert not (out / "rome-locate.lock").exists()
    stopped = json.loads((out / "results.json").read_text())
    assert stopped["complete"] is False and "SIGTERM" in stopped["error"] and len(stopped["records"]) < 12
    assert cli.main(argv) == 0  # the same command again
    assert len(json.loads((out / "results.json").read_text())["records"]) == 12


# ---- 2: the demo's folder -------------------------------------------------------------------------------------


def _demo(out):
    from rome_locate.demo import run_demo

    return run_demo(out, n_facts=1, progress=False, quiet=True, model_and_tok=(None, None))


class _Stop(Exception):
    pass


@pytest.fixture
def demo_stops_at_locate(monkeypatch):
    """The demo's locate: records whether locate.jsonl was still there, then stops the demo."""
    from rome_locate import locate as locate_mod

    seen = []

    def locate(model, tok, facts, settings, out=None, **kwargs):
        seen.append(Path(out).exists())
        raise _Stop()

    monkeypatch.setattr(locate_mod, "locate", locate)
    return seen


def test_demo_removes_only_its_own_trace_and_respects_locks(tmp_path, demo_stops_at_locate):
    out = tmp_path / "demo"
    out.mkdir()
    mine = out / "locate.jsonl"
    mine.write_text("my own notes\n")
    with pytest.raises(ValueError, match="not a locate output"):
        _demo(out)
    assert mine.read_text() == "my own notes\n"
    ours = '{"fact_id": "0", "prompt": "p", "scores": [], "low_score": 0.0, "layer": 0}\n'
    mine.write_text(ours)
    text = _live_lock(out / "locate.jsonl.lock")  # a `locate --out demo/locate.jsonl` under way
    with pytest.raises(FileExistsError, match="being written by another rome-locate run"):
        _demo(out)
    assert mine.read_text() == ours and (out / "locate.jsonl.lock").read_text() == text
    (out / "locate.jsonl.lock").unlink()
    _live_lock(out / "rome-locate.lock")  # another demo in this folder
    with pytest.raises(FileExistsError, match="rome-locate.lock"):
        _demo(out)
    (out / "rome-locate.lock").unlink()
    assert demo_stops_at_locate == []
    with pytest.raises(_Stop):
        _demo(out)
    assert demo_stops_at_locate == [False] and not (out / "rome-locate.lock").exists()  # its own trace: removed


def test_demo_never_writes_over_a_report_it_did_not_write(tmp_path, demo_stops_at_locate):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("# Notes\n")
    with pytest.raises(FileExistsError, match="report.md"):
        _demo(out)
    assert (out / "report.md").read_text() == "# Notes\n" and demo_stops_at_locate == []


# ---- 14: locate --plots reused with other settings ------------------------------------------------------------


def test_plots_drawn_with_other_settings_or_another_model_are_redrawn(tiny_tokenizer, tmp_path, capsys):
    from conftest import build_tiny_model
    from rome_locate.facts import Fact
    from rome_locate.locate import locate
    from rome_locate.plots import PLOTS_RECORD
    from rome_locate.trace import TraceSettings

    facts = [Fact(prompt="Miles Davis plays the", subject="Miles Davis", target="trumpet", id="0"),
             Fact(prompt="Alma Berridge speaks the language of", subject="Alma Berridge", target="French", id="1")]
    model, tok = build_tiny_model("gpt2", len(tiny_tokenizer)), tiny_tokenizer
    plots = tmp_path / "plots"
    heatmaps = [plots / "trace_0_mlp.png", plots / "trace_1_mlp.png"]

    def run(model, samples):
        for png in heatmaps:
            if png.exists():
                png.write_bytes(b"drawn by the run before")
        locate(model, tok, facts, TraceSettings(samples=samples), plots_dir=plots, progress=False)
        return [png.read_bytes()[:4] == b"\x89PNG" for png in heatmaps]  # True: drawn by this run

    assert run(model, 2) == [True, True]
    assert run(model, 2) == [False, False]  # the same settings and model: kept
    assert run(model, 3) == [True, True]  # other settings: every heatmap redrawn
    record = json.loads((plots / PLOTS_RECORD).read_text())["heatmaps"]["mlp"]
    assert record["settings"]["samples"] == 3 and sorted(record["drawn"]) == ["trace_0_mlp", "trace_1_mlp"]
    assert run(build_tiny_model("gpt2", len(tiny_tokenizer), seed=1), 3) == [True, True]  # another model
    # A record file rome-locate did not write is refused before any tracing, and left as it was.
    (plots / PLOTS_RECORD).write_text("{}\n")
    model_dir = tmp_path / "m"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    code, errors, _ = _run(["locate", "--model", str(model_dir), "--facts", KNOWN, "--limit", "1", "--device", "cpu",
                            "--plots", str(plots), "--quiet"], capsys)
    assert code == 2 and len(errors) == 1 and PLOTS_RECORD in errors[0] and "--plots" in errors[0], errors
    assert (plots / PLOTS_RECORD).read_text() == "{}\n"
