"""torchrun sharding: 2 gloo ranks write what one process writes (locate, edit); a failed rank's effect."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from rome_locate import cli, distributed
from rome_locate.fact_models import counterfact_path, fact_model_dir, facts_path

MODEL = str(fact_model_dir("gpt2"))
HPARAMS = os.path.join(os.path.dirname(__file__), "..", "hparams", "ROME", "fact-gpt2.yaml")


def _locate_argv(out) -> list[str]:
    return ["locate", "--model", MODEL, "--device", "cpu", "--facts", str(facts_path("gpt2")), "--limit", "5",
            "--samples", "2", "--quiet", "--out", str(out)]


def _edit_argv(out) -> list[str]:
    return ["edit", "--model", MODEL, "--device", "cpu", "--facts", str(counterfact_path("gpt2")), "--limit", "3",
            "--hparams", HPARAMS, "--quiet", "--out", str(out)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fail(*args, **kwargs):
    # A ValueError is bad input (exit 2, one line); a RuntimeError would be a bug, with its traceback, stopping the spawn.
    raise ValueError("injected failure")


def _read(path: str) -> str | None:
    return open(path).read() if os.path.exists(path) else None


def _timeless(obj):
    """`obj` without its wall-clock times (the one thing two runs of the same edits may differ in)."""
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items() if k not in ("seconds", "wall_time_s")}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


def _same_records(a: str, b: str) -> None:
    """The same JSON lines in the same order; numbers equal up to float rounding (facts traced in one forward
    share matrix products, so a fact's last float bits depend on the facts batched with it)."""
    def check(x, y, where):
        if isinstance(x, float) or isinstance(y, float):
            assert x == pytest.approx(y, abs=1e-6, rel=0), where
        elif isinstance(x, dict):
            assert list(x) == list(y), where
            for k in x:
                check(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                check(u, v, f"{where}[{i}]")
        else:
            assert x == y, where

    lines_a, lines_b = a.splitlines(), b.splitlines()
    assert len(lines_a) == len(lines_b)
    for n, (x, y) in enumerate(zip(lines_a, lines_b)):
        check(json.loads(x), json.loads(y), f"line {n + 1}")


def _gloo_threads() -> int | None:
    """Threads of gloo process groups alive in this process (None where /proc does not list them)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return None
    names = []
    for tid in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, tid, "comm")) as fh:
                names.append(fh.read().strip())
        except OSError:  # a thread that ended meanwhile
            continue
    return sum(n.startswith(("gloo", "pt_gloo")) for n in names)


def _rank_main(rank: int, world: int, jobs: list, results_dir: str) -> None:
    """One torchrun-like rank: torchrun's environment variables, then the CLI once per job.

    A job is (argv, port, rank to fail or None, what fails there: "trace" or "load", files rank 0 reads after it).
    """
    import rome_locate.locate as locate_mod

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    results = []
    real = {"trace": (locate_mod, "trace_each_by_method", locate_mod.trace_each_by_method), "load": (cli, "load_model", cli.load_model)}
    for argv, port, fail_rank, what, watch in jobs:
        os.environ["MASTER_PORT"] = str(port)
        for name, (module, attr, fn) in real.items():
            setattr(module, attr, _fail if (fail_rank == rank and what == name) else fn)
        code = cli.main(argv)
        results.append({"code": code, "files": {str(w): _read(str(w)) for w in watch} if rank == 0 else {},
                        "gloo_threads": _gloo_threads()})
    for module, attr, fn in real.values():
        setattr(module, attr, fn)
    with open(os.path.join(results_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)


def _run_ranks(jobs: list, tmp_path, world: int = 2) -> list[list[dict]]:
    """Run the jobs (argv, rank to fail or None, what fails, files to read after it) on `world` gloo ranks, one
    after the other; per rank and job, the exit code (and on rank 0 the files' contents right after the job)."""
    jobs = [(argv, _free_port(), fail, what, [str(w) for w in watch]) for argv, fail, what, watch in jobs]
    mp.start_processes(_rank_main, args=(world, jobs, str(tmp_path)), nprocs=world, join=True, start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def test_block_covers_every_position_once_in_order():
    for n in (0, 1, 5, 7, 1209):
        for world in (1, 2, 3, 8):
            blocks = [distributed.block(n, r, world) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1


def test_rank_from_env(tmp_path):
    assert distributed.rank_from_env("cpu", {}) is None
    assert distributed.rank_from_env("cpu", {"WORLD_SIZE": "1", "RANK": "0"}) is None
    r = distributed.rank_from_env("cpu", {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (r.rank, r.world, r.local_rank, r.backend, r.device) == (3, 4, 1, "gloo", "cpu")
    r = distributed.rank_from_env("cuda", {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert (r.backend, r.device) == ("nccl", "cuda:1")
    with pytest.raises(ValueError, match="RANK"):
        distributed.rank_from_env("cpu", {"WORLD_SIZE": "2"})
    assert distributed.shard_path(tmp_path / "a.jsonl", 1, 2, False) == tmp_path / "a.jsonl.rank1-of-2"
    assert distributed.shard_path(tmp_path / "d", 0, 2, True) == tmp_path / "d" / "shards" / "rank0-of-2"


def test_single_process_part_is_the_whole(tmp_path):
    part = distributed.part(["a", "b", "c"], tmp_path / "x.jsonl")
    assert part.facts == ["a", "b", "c"] and part.out == tmp_path / "x.jsonl" and part.rank is None
    assert not part.finished and part.gather([1, 2], distributed.merge_lines) == [1, 2]
    assert distributed.part(["a"], tmp_path / "h.yaml", shards_only=True).out is None
    assert not list(tmp_path.iterdir())  # a single process writes no shard and no marker


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process, then every multi-rank job in one spawn of 2 gloo ranks (starting ranks is the slow part)."""
    tmp = tmp_path_factory.mktemp("dist")
    one, two = tmp / "one", tmp / "two"
    assert cli.main(_locate_argv(one / "locate.jsonl")) == 0
    assert cli.main(_edit_argv(one / "edit")) == 0
    out, other = tmp / "run" / "locate.jsonl", tmp / "other" / "locate.jsonl"
    watch = [out, distributed.incomplete_marker(out), out.parent / "locate.jsonl.rank0-of-2"]
    watch_other = [other, distributed.incomplete_marker(other), other.parent / "locate.jsonl.rank0-of-2"]
    jobs = {
        "locate": (_locate_argv(two / "locate.jsonl"), None, None, []),
        "edit": (_edit_argv(two / "edit"), None, None, []),
        # The edit again, with loading the model failing on rank 0: a finished shard is not redone.
        "edit again": (_edit_argv(two / "edit"), 0, "load", []),
        "rank 0 fails": (_locate_argv(other), 0, "trace", watch_other),
        "rank 1 fails": (_locate_argv(out), 1, "trace", watch),
        "rerun": (_locate_argv(out), None, None, watch),
    }
    ranks = _run_ranks(list(jobs.values()), tmp)
    return {"one": one, "two": two, "watch": watch, "watch_other": watch_other,
            "jobs": {name: [r[i] for r in ranks] for i, name in enumerate(jobs)}}


def test_two_gloo_ranks_write_what_one_process_writes(runs):
    one, two, jobs = runs["one"], runs["two"], runs["jobs"]
    assert [j["code"] for j in jobs["locate"] + jobs["edit"]] == [0, 0, 0, 0]
    # Same records, same order, same layers; the same numbers up to float rounding.
    _same_records((two / "locate.jsonl").read_text(), (one / "locate.jsonl").read_text())
    assert _timeless(json.loads((two / "edit" / "results.json").read_text())) == \
        _timeless(json.loads((one / "edit" / "results.json").read_text()))
    assert len((two / "locate.jsonl").read_text().splitlines()) == 5
    # Each rank kept its own shard; a complete merge leaves no incomplete marker.
    assert len((two / "locate.jsonl.rank0-of-2").read_text().splitlines()) == 2
    assert len((two / "locate.jsonl.rank1-of-2").read_text().splitlines()) == 3
    assert (two / "edit" / "shards" / "rank1-of-2" / "results.json").is_file()
    assert not distributed.incomplete_marker(two / "locate.jsonl").exists()
    assert not distributed.incomplete_marker(two / "edit").exists()
    # A rerun of a finished edit reads the shards back without loading the model (which would fail here).
    assert [j["code"] for j in jobs["edit again"]] == [0, 0]


def test_no_process_group_outlives_its_command(runs):
    # Issue 21 defect 9: a group left alive after destroy_process_group (transformers' from_pretrained imports
    # torch.distributed.nn, whose defaults hold the group it finds) kept its gloo threads running into the
    # interpreter's exit, which then aborted now and again (`terminate called without an active exception`).
    counts = [j["gloo_threads"] for jobs in runs["jobs"].values() for j in jobs]
    assert counts == [0] * len(counts) or set(counts) == {None}, counts


def test_a_failed_rank_marks_the_merge_incomplete_and_a_rerun_completes_it(runs):
    jobs = runs["jobs"]
    out, marker, shard0 = (str(w) for w in runs["watch"])
    # Rank 0 failed: rank 1 finished its shard and exits cleanly; nothing is merged and the marker names rank 0.
    lost0, lost1 = jobs["rank 0 fails"]
    assert lost0["code"] == 2 and lost1["code"] == 0
    files = [lost0["files"][str(w)] for w in runs["watch_other"]]
    assert files[0] is None and files[2] == ""
    assert list(json.loads(files[1])["failed_ranks"]) == ["0"]
    # Rank 1 failed, and rank 0 says so too: the merged output is not whole.
    failed0, failed1 = jobs["rank 1 fails"]
    assert failed0["code"] == 2 and failed1["code"] == 2
    state = failed0["files"]
    m = json.loads(state[marker])
    assert m["complete"] is False and list(m["failed_ranks"]) == ["1"]
    assert "injected failure" in m["failed_ranks"]["1"]
    assert m["missing_positions"]["1"] == [2, 5]
    # --out holds rank 0's finished facts, in order; rank 0's shard is intact.
    assert state[out] == state[shard0] and len(state[out].splitlines()) == 2
    # The rerun resumes: rank 0's shard is not redone, --out holds every fact and the marker is gone.
    rerun0, rerun1 = jobs["rerun"]
    assert rerun0["code"] == 0 and rerun1["code"] == 0
    assert rerun0["files"][shard0] == state[shard0]
    assert rerun0["files"][marker] is None
    assert len(rerun0["files"][out].splitlines()) == 5
    assert rerun0["files"][out] == (runs["two"] / "locate.jsonl").read_text()  # = what one process writes


def test_part_refuses_foreign_files_and_knows_its_finished_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "_JOB", distributed._Job(distributed.Rank(1, 2, 1, "gloo", "cpu", 2), None))
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(ValueError, match="did not write"):
        distributed.part(["a", "b"], notes)
    assert notes.read_text() == "my notes\n"
    ours = tmp_path / "ours.jsonl"
    ours.write_text('{"fact_id": "0", "prompt": "p", "scores": [], "low_score": 0.0, "layer": 0}\n')
    part = distributed.part(["a", "b", "c"], ours)
    assert part.facts == ["b", "c"] and part.out == tmp_path / "ours.jsonl.rank1-of-2"
    # A shard counts as finished only for the very facts it was finished with (not after --limit changed).
    part._done.write_text(json.dumps({"facts": distributed._facts_digest(["b", "c"]), "command": part.key}))
    assert part.finished
    assert not distributed.part(["a", "b", "c", "d"], ours).finished
    # ... and only for the very command that finished it: other settings or changed inputs compute it afresh.
    part._done.write_text(json.dumps({"facts": distributed._facts_digest(["b", "c"]),
                                      "command": distributed.command_key(["edit", "--samples", "3"])}))
    assert not part.finished


def test_command_key_changes_with_the_arguments_and_with_the_files_they_name(tmp_path):
    hp = tmp_path / "h.yaml"
    hp.write_text("layers: [1]\n")
    key = distributed.command_key(["edit", "--hparams", str(hp)])
    assert key == distributed.command_key(["edit", "--hparams", str(hp)])
    assert key != distributed.command_key(["edit", "--hparams", str(hp), "--layers", "traced"])
    out = tmp_path / "out"
    out.mkdir()
    with_out = distributed.command_key(["edit", "--out", str(out)])
    (out / "results.json").write_text("{}")  # what the command itself wrote does not change its key
    assert distributed.command_key(["edit", "--out", str(out)]) == with_out
    hp.write_text("layers: [2]\n# longer\n")
    assert key != distributed.command_key(["edit", "--hparams", str(hp)])


def test_device_maps_of_ranks_on_one_node_use_disjoint_gpus():
    env = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    r0 = distributed.rank_from_env("cuda", {**env, "RANK": "2", "LOCAL_RANK": "0"})
    r1 = distributed.rank_from_env("cuda", {**env, "RANK": "3", "LOCAL_RANK": "1"})
    assert distributed.rank_gpus(r0, n_gpus=8) == [0, 1, 2, 3] and distributed.rank_gpus(r1, n_gpus=8) == [4, 5, 6, 7]
    mm = distributed.rank_max_memory(r1, {5: "60GiB", "cpu": "200GiB", 0: "1GiB"}, n_gpus=8, gpu_bytes=lambda i: 100)
    assert mm == {4: 100, 5: "60GiB", 6: 100, 7: 100, "cpu": "200GiB"}
    with pytest.raises(ValueError, match="at most 1 ranks"):
        distributed.rank_gpus(r0, n_gpus=1)


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "rome_locate", "locate", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0 and "--device-map" in out.stdout
