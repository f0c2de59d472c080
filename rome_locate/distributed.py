"""Data parallelism under torchrun: each rank works on its block of the facts, rank 0 merges what they wrote.

`torchrun --nproc-per-node N -m rome_locate locate|edit|eval|hparams ...` starts
N copies of the CLI. Each reads torchrun's RANK, WORLD_SIZE and LOCAL_RANK,
joins the process group (NCCL with device cuda:LOCAL_RANK when it runs on a GPU,
gloo on CPU), takes a contiguous block of the facts (positions kept: block r of
n facts is [n·r//N, n·(r+1)//N)), and writes its own shard beside --out
(`OUT.rank0-of-2` for a file, `OUT/shards/rank0-of-2/` for a directory), which
it resumes on its own when the command is run again. At the end every rank
sends its shard's records to rank 0 (over gloo, so that no shared file system
is needed), which writes --out exactly as one process would: the same records
in the original fact order.

While a run is under way, and after one where a rank failed, `OUT.incomplete`
(JSON) says so: which ranks failed with which error, and which fact positions
are missing from --out. A failed rank leaves the other shards untouched; rerun
the same command and only the unfinished work is done.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .files import write_json, write_text
from .records import Record

# Ranks wait at the merge for the slowest one, which on a large dataset is hours, not NCCL's default minutes.
TIMEOUT_ENV = "ROME_LOCATE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 7 * 24 * 3600
SHARDED_COMMANDS = ("locate", "edit", "eval", "hparams")
RERUN = "run the same command again to resume"


@dataclass(frozen=True)
class Rank(Record):
    """This process's place in a torchrun job."""

    rank: int
    world: int
    local_rank: int
    backend: str  # "nccl" | "gloo"
    device: str  # "cuda:LOCAL_RANK" or "cpu"
    local_world: int = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE)


def rank_from_env(device: str | None = None, env: dict[str, str] | None = None) -> Rank | None:
    """The Rank torchrun's environment describes, or None for a single process (WORLD_SIZE unset or 1).

    On a machine with CUDA the rank runs on cuda:LOCAL_RANK (NCCL) unless
    `device` says cpu (gloo); a `device` naming one GPU is replaced by the
    rank's own, since every rank receives the same command line.
    """
    env = dict(os.environ) if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if "RANK" not in env:
        raise ValueError("WORLD_SIZE is set but RANK is not: start the ranks with torchrun")
    rank = int(env["RANK"])
    local = int(env.get("LOCAL_RANK", rank))
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    if (device is None and torch.cuda.is_available()) or (device or "").startswith("cuda"):
        return Rank(rank, world, local, "nccl", f"cuda:{local}", local_world)
    return Rank(rank, world, local, "gloo", "cpu", local_world)


def rank_gpus(rank: Rank, n_gpus: int | None = None) -> list[int]:
    """The GPUs of this node a rank's device map may use: the node's GPUs split evenly between its ranks."""
    n = torch.cuda.device_count() if n_gpus is None else n_gpus
    per_rank = n // rank.local_world
    if per_rank < 1:
        raise ValueError(f"{rank.local_world} ranks on a node with {n} GPUs: start at most {n} ranks per node "
                         f"(--nproc-per-node) for a --device-map")
    return list(range(rank.local_rank * per_rank, (rank.local_rank + 1) * per_rank))


def rank_max_memory(rank: Rank, max_memory: dict[int | str, Any] | None, n_gpus: int | None = None,
                    gpu_bytes: Callable[[int], int] | None = None) -> dict[int | str, Any]:
    """`max_memory` for one rank's device map: only its own GPUs (at the user's limit, else 90% of each), plus the
    user's cpu/disk limits; without it every rank's `auto` map would spread over all the node's GPUs."""
    max_memory = dict(max_memory or {})
    if gpu_bytes is None:
        def gpu_bytes(i: int) -> int:
            return int(torch.cuda.get_device_properties(i).total_memory * 0.9)
    out: dict[int | str, Any] = {g: max_memory.get(g, gpu_bytes(g)) for g in rank_gpus(rank, n_gpus)}
    out.update({k: v for k, v in max_memory.items() if not isinstance(k, int)})
    return out


def block(n: int, rank: int, world: int) -> range:
    """Positions of the facts rank `rank` of `world` works on: a contiguous block, sizes differing by at most one."""
    return range(n * rank // world, n * (rank + 1) // world)


def shard_path(out: str | Path, rank: int, world: int, directory: bool) -> Path:
    """Where rank `rank` writes its part of --out `out`: `OUT.rankR-of-N`, or `OUT/shards/rankR-of-N/` for a directory."""
    out = Path(out)
    name = f"rank{rank}-of-{world}"
    return out / "shards" / name if directory else out.with_name(f"{out.name}.{name}")


def incomplete_marker(out: str | Path) -> Path:
    """The file that marks --out `out` as not (yet) holding every fact: `OUT.incomplete`."""
    out = Path(out)
    return out.with_name(out.name + ".incomplete")


_OUT_FLAGS = ("--out", "-o", "--output", "--plots", "--offload-folder")


def command_key(argv: Sequence[str]) -> str:
    """A digest of a command line and of the files it names (size and modification time, not their bytes).

    A finished shard is reused only by the very same command over unchanged
    inputs: another --hparams, --layers, trace setting or retrained model gives
    another key, so its shard is computed afresh.
    """
    h = hashlib.sha256()
    after_out = False
    for arg in argv:
        h.update(arg.encode() + b"\x00")
        # The output is what the command writes: its changing contents must not change the key.
        is_out, after_out = after_out, arg in _OUT_FLAGS
        if is_out or arg.split("=", 1)[0] in _OUT_FLAGS:
            continue
        path = Path(arg)
        try:
            entries = sorted(path.iterdir()) if path.is_dir() else [path] if path.is_file() else []
        except OSError:
            entries = []
        for entry in entries:
            try:
                st = entry.stat()
            except OSError:
                continue
            h.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}\x01".encode())
    return h.hexdigest()


def _facts_digest(facts: Sequence[Any]) -> str:
    # Every rank must shard the very same list: compared at the merge.
    h = hashlib.sha256()
    for f in facts:
        h.update(f"{getattr(f, 'id', '')}\x00{getattr(f, 'prompt', f)}\x01".encode())
    return h.hexdigest()


# ---- the job -------------------------------------------------------------------


@dataclass
class _Job:
    rank: Rank
    group: Any  # the gloo group the shards are exchanged over
    exchanged: bool = False
    error: str | None = None
    part: "Part | None" = None  # the command's part, once it has one
    key: str = ""  # command_key of the command line this job runs
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM, not failed
    merged: bool = False  # rank 0 wrote --out and its final marker (none when complete)


_JOB: _Job | None = None


def current() -> Rank | None:
    """This process's Rank inside a torchrun job started by `session`, else None."""
    return _JOB.rank if _JOB is not None else None


@contextmanager
def session(command: str, device: str | None = None, argv: Sequence[str] = ()) -> Iterator[Rank | None]:
    """Join torchrun's process group for one CLI command (nothing happens in a single process).

    Every rank takes part in exactly one exchange: `Part.gather` when its shard
    finished, or here, on the way out, as a failed rank, so that a rank that
    failed never leaves the others waiting.
    """
    global _JOB
    rank = rank_from_env(device)
    if rank is None:
        yield None
        return
    if command not in SHARDED_COMMANDS:
        raise ValueError(f"`{command}` does not shard over ranks; run it in one process "
                         f"(torchrun shards {', '.join(SHARDED_COMMANDS)})")
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    _import_group_holders()
    if rank.backend == "nccl":
        torch.cuda.set_device(rank.local_rank)
    dist.init_process_group(rank.backend, rank=rank.rank, world_size=rank.world, timeout=timeout)
    group = dist.new_group(backend="gloo", timeout=timeout) if rank.backend != "gloo" else None
    _JOB = _Job(rank, group, key=command_key(argv))
    try:
        yield rank
    except BaseException as exc:
        _JOB.error = _JOB.error or f"{type(exc).__name__}: {exc}"
        _JOB.interrupted = isinstance(exc, KeyboardInterrupt)  # Ctrl-C, or SIGTERM (process.Terminated)
        raise
    finally:
        try:
            _leave(rank)
        finally:
            _JOB = None
            dist.destroy_process_group()


def _import_group_holders() -> None:
    """Import, before any process group exists, the torch modules that would otherwise keep one alive."""
    # torch.distributed.nn's collectives take `group=group.WORLD` as a default argument, evaluated at import:
    # imported while a group is up (transformers' from_pretrained imports it), they hold that group past
    # destroy_process_group, and its gloo worker threads with it. One of them could still be freeing the last
    # gather's tensors when the interpreter finalised: taking the GIL then ends the thread (pthread_exit) through
    # C++ frames, which is std::terminate ("terminate called without an active exception", SIGABRT; issue 21
    # defect 9, seen in a core dump). Imported first, they hold None and destroy_process_group joins the threads.
    try:
        import torch.distributed.nn  # noqa: F401
    except ImportError:  # a torch built without it: nothing to hold the group either
        pass


def _leave(rank: Rank) -> None:
    """A rank's way out of the job: the failure exchange (unless its shard was gathered) and, on rank 0, the
    incomplete marker; an interrupted rank 0 marks --out before the exchange, which killed ranks never join."""
    assert _JOB is not None
    merged_out = _JOB.part.merged_out if _JOB.part is not None else None
    marker = incomplete_marker(merged_out) if merged_out is not None and rank.rank == 0 else None
    if marker is not None and _JOB.interrupted and not _JOB.merged:
        write_json(marker, {"complete": False, "status": "interrupted", "failed_ranks": {rank.rank: _JOB.error},
                            "world": rank.world, "rerun": RERUN})
    if _JOB.exchanged:
        return
    try:
        received = _exchange({"ok": False, "rank": rank.rank, "interrupted": _JOB.interrupted,
                              "error": _JOB.error or f"rank {rank.rank} stopped before its shard finished"})
    except Exception:
        if _JOB.interrupted:  # the other ranks are being stopped too: the marker already says so
            return
        raise
    if received is not None and marker is not None:  # rank 0 itself failed: nothing is merged
        write_json(marker, {"complete": False, "status": _status(received),
                            "failed_ranks": {s["rank"]: s["error"] for s in received if not s["ok"]},
                            "world": rank.world, "rerun": RERUN})


def _status(received: list[dict[str, Any]]) -> str:
    """OUT.incomplete's status: "interrupted" when a rank was stopped (Ctrl-C, SIGTERM), else "failed"."""
    return "interrupted" if any(s.get("interrupted") for s in received) else "failed"


def record_failure(exc: BaseException) -> None:
    """Remember why this rank failed (for a failure the command reports itself), for the incomplete marker."""
    if _JOB is not None:
        _JOB.error = f"{type(exc).__name__}: {exc}"


def _exchange(status: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Send this rank's status (and records) to rank 0; rank 0 gets every rank's, in rank order."""
    import torch.distributed as dist

    assert _JOB is not None
    _JOB.exchanged = True
    received: list[Any] | None = [None] * _JOB.rank.world if _JOB.rank.rank == 0 else None
    dist.gather_object(status, received, dst=0, group=_JOB.group)
    return received


class RankFailure(RuntimeError):
    """Some rank of the job failed: --out holds the other ranks' facts and OUT.incomplete names the failure."""


# ---- one command's part --------------------------------------------------------

# A merge writes --out from the payloads of the ranks that finished (rank order) and returns
# what the command goes on with; `complete` is False when some rank's payload is missing.
Merge = Callable[[list[Any], "Path | None", bool], Any]


@dataclass
class Part:
    """The facts and output path of this rank; in a single process, all the facts and --out itself."""

    facts: list[Any]
    positions: range
    out: Path | None  # where this rank writes
    merged_out: Path | None = None  # --out, written by rank 0 (None in a single process)
    rank: Rank | None = None
    digest: str = ""
    n_all: int = 0  # facts in the whole dataset
    _done: Path | None = field(default=None, repr=False)
    key: str = ""  # the job's command_key: a shard finished by another command is not reused

    @property
    def finished(self) -> bool:
        """This rank's shard, with these very facts, was completed by an earlier run of the same command over
        unchanged inputs (never in a single process)."""
        if self._done is None or not self._done.is_file():
            return False
        try:
            done = json.loads(self._done.read_text(encoding="utf-8"))
            return done.get("facts") == _facts_digest(self.facts) and done.get("command") == self.key
        except (json.JSONDecodeError, AttributeError):
            return False

    def gather(self, payload: Any, merge: Merge) -> Any | None:
        """Single process: `payload`. Under torchrun: rank 0 merges every rank's payload into --out and returns the
        merge's result, other ranks return None; when a rank failed, rank 0 writes what finished, marks --out
        incomplete and raises RankFailure."""
        if self.rank is None:
            return payload
        if self._done is not None:
            write_json(self._done, {"rank": self.rank.rank, "world": self.rank.world, "facts": _facts_digest(self.facts),
                                    "command": self.key,
                                    "positions": [self.positions.start, self.positions.stop]})
        received = _exchange({"ok": True, "rank": self.rank.rank, "digest": self.digest, "payload": payload})
        if received is None:
            return None
        failed = {s["rank"]: s["error"] for s in received if not s["ok"]}
        wrong = [s["rank"] for s in received if s["ok"] and s["digest"] != self.digest]
        if wrong:
            raise RuntimeError(f"ranks {wrong} read other facts than rank 0: every rank must see the same --facts")
        merged = merge([s["payload"] for s in received if s["ok"]], self.merged_out, not failed)
        if self.merged_out is not None:
            marker = incomplete_marker(self.merged_out)
            if failed:
                missing = {r: [block(self.n_all, r, self.rank.world).start, block(self.n_all, r, self.rank.world).stop]
                           for r in failed}
                write_json(marker, {"complete": False, "status": _status(received), "failed_ranks": failed,
                                    "missing_positions": missing,  # [start, stop) per rank
                                    "world": self.rank.world, "rerun": RERUN})
            else:
                marker.unlink(missing_ok=True)
            if _JOB is not None:
                _JOB.merged = True
        if failed:
            where = f"; {self.merged_out} holds the other ranks' facts" if self.merged_out is not None else ""
            raise RankFailure(f"rank(s) {sorted(failed)} failed: " + "; ".join(f"rank {r}: {e}" for r, e in
                                                                                  sorted(failed.items())) + where)
        return merged


def part(facts: Sequence[Any], out: str | Path | None, *, directory: bool = False, shards_only: bool = False) -> Part:
    """This rank's facts and output path for --out `out` (a file, or a `directory`); see the module docstring.

    `shards_only`: the ranks write shards beside `out` (to resume from) but
    nothing is merged into it, and a single process writes nothing (`hparams`,
    whose output is a YAML file the command writes itself).
    """
    facts = list(facts)
    rank = current()
    if rank is None:
        return Part(facts, range(len(facts)), Path(out) if out is not None and not shards_only else None,
                    n_all=len(facts))
    if rank.world > len(facts):
        raise ValueError(f"{rank.world} ranks for {len(facts)} facts: start at most {len(facts)} ranks")
    positions = block(len(facts), rank.rank, rank.world)
    shard = shard_path(out, rank.rank, rank.world, directory) if out is not None else None
    done = None if shard is None else shard.with_name(shard.name + ".done")
    merged = Path(out) if out is not None and not shards_only else None
    if merged is not None:
        _check_ours(merged, directory)
    p = Part([facts[i] for i in positions], positions, shard, merged, rank, _facts_digest(facts), len(facts), done,
             key=_JOB.key if _JOB is not None else "")
    if _JOB is not None:
        _JOB.part = p
    if shard is not None:
        shard.parent.mkdir(parents=True, exist_ok=True)
    if merged is not None and rank.rank == 0:
        # Written first, removed by a complete merge: a job killed halfway leaves --out marked.
        write_json(incomplete_marker(merged), {"complete": False, "status": "running", "world": rank.world})
    return p


def _check_ours(path: Path, directory: bool) -> None:
    """Refuse, before any work, to merge over a file rome-locate did not write (or one another run is writing)."""
    if not directory:
        from .locate import check_out

        check_out(path)  # a locate output: every line a locate record, no lock beside it
        return
    from .outdir import check_report_files

    check_report_files(path)  # results.json, report.md, report.html: rome-locate's, or absent


# ---- merges: one small function per output format ---------------------------------


def merge_lines(payloads: list[list[dict[str, Any]]], out: Path | None, complete: bool) -> list[dict[str, Any]]:
    """JSON Lines records (locate): the ranks' records in order; written to `out` one line each, as locate writes,
    under its lock."""
    from .files import output_lock
    from .locate import record_line

    records = [r for p in payloads for r in p]
    if out is not None:
        with output_lock(out, "--out"):
            write_text(out, "".join(record_line(r) + "\n" for r in records))
    return records


def merge_eval(payloads: list[dict[str, Any]], out: Path | None, complete: bool) -> dict[str, Any]:
    """`edit`'s and `eval`'s output directory (the pipeline's): locate.jsonl and results.json merged in fact order,
    the report drawn from all the records (rank 0's run settings)."""
    from .outcome import EvalRecord
    from .report import write_report
    from .trace import TraceResult

    lines = [r for p in payloads for r in (p.get("locate") or [])]
    records, traces = [], []
    for p in payloads:
        # The report's heatmaps: each record's trace, matched within its own shard by what defines the fact's
        # trace (locate.fact_key); the last line of a key is the newest, after a corrected fact was traced again.
        shard = {(str(r["fact_id"]), r["prompt"], r.get("subject"), r.get("target")): r
                 for r in (p.get("locate") or [])}
        for r in p["results"]["records"]:
            rec = EvalRecord.from_json(r)
            records.append(rec)
            line = shard.get((str(rec.fact_id), rec.prompt, rec.subject, rec.target_true))
            traces.append(TraceResult.from_json(line) if line is not None else None)
    settings = payloads[0]["results"]["settings"] if payloads else {}
    errors = [p["results"]["error"] for p in payloads if p["results"].get("error")]
    error = "; ".join(errors) or (None if complete else "some ranks failed: see OUT.incomplete")
    paths: dict[str, Path] = {}
    if out is not None:
        if lines:
            merge_lines([lines], out / "locate.jsonl", complete)
        paths = write_report(records, out, settings, traces=traces, error=error)
    return {"records": records, "paths": paths, "error": error}


def read_dir_payload(out: Path) -> dict[str, Any]:
    """What an `eval` shard directory holds: its results.json and its locate.jsonl lines (if traced)."""
    located = out / "locate.jsonl"
    lines = [json.loads(x) for x in located.read_text(encoding="utf-8").splitlines() if x.strip()] \
        if located.is_file() else None
    return {"results": json.loads((out / "results.json").read_text(encoding="utf-8")), "locate": lines}
