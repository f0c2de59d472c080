"""Locate: trace every fact of a dataset, choose its layer, and write one JSON line per fact (resumable)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Container, Sequence

from torch import nn
from tqdm.auto import tqdm

from .arch import Arch, arch_for
from .choose import LayerChoice, choose_layer
from .facts import Fact
from .files import check_lock, check_output_file, output_lock, safe_name, write_text
from .models import ModelFingerprint, fingerprint
from .plots import HeatmapRecord, average_effect_plot, check_plots_dir, heatmap
from .records import non_finite
from .atp import trace_each_by_method
from .trace import TraceResult, TraceSettings, noise_level

# Facts per window: a window's facts are traced together (batches of one prompt length share forwards) and
# written together. A fixed count, not a time: which facts share a forward changes the last float bits of their
# numbers, so the same command must batch alike on every run and on every resume. 64 facts fill a GPU's restored
# runs and, at 70B on 2 GPUs (about 4 s a fact), still write every few minutes.
WINDOW = 64


# What defines a fact's trace: a record is reused only for a fact equal in all of these, so a fact whose subject
# or target was corrected is traced again. (target_new plays no part in a trace: the answer is the clean top-1 or
# the target's first token.)
Key = tuple[str, str, str, str | None]
# A fact's place among the facts of one key: the k-th such fact reads the k-th such line, so facts that share
# every field (ids collide: rome-locate's format without `id` gives every fact id "") each have their own line.
Slot = tuple[Key, int]


def fact_key(fact: Fact) -> Key:
    """The fields of `fact` that its trace depends on, as locate matches records by them."""
    return str(fact.id), fact.prompt, fact.subject, fact.target


def _record_key(obj: dict[str, Any]) -> Key:
    return str(obj["fact_id"]), obj["prompt"], obj.get("subject"), obj.get("target")


def _slots(keys: Sequence[Key]) -> list[Slot]:
    """Each key with the number of equal keys before it."""
    seen: dict[Key, int] = {}
    out = []
    for key in keys:
        out.append((key, seen.get(key, 0)))
        seen[key] = seen.get(key, 0) + 1
    return out


# A locate line is json.dumps of a record, whose first field is the fact id.
_RECORD_START = '{"fact_id": '
_RECORD_KEYS = {"fact_id", "prompt", "scores", "low_score", "layer"}


def _not_ours(path: Path, n: int) -> ValueError:
    return ValueError(f"{path}:{n}: not a locate output (this line is not a rome-locate record), and rome-locate never "
                      f"writes over a file it did not write; pass another --out")


def _read_done(path: Path, repair: bool = True) -> dict[Slot, tuple[int, dict[str, Any]]]:
    """Records already in the locate output `path`, with their line numbers, by slot (`_slots` in file order).

    Every complete line must be a locate record; otherwise the file is someone
    else's and is refused, untouched. A last line without its newline is an
    interrupted write: with `repair` it is cut off, but only when it starts as
    a locate record does.
    """
    if not path.exists():
        return {}
    if path.is_dir():
        raise IsADirectoryError(f"--out {path} is a directory; give a file path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _not_ours(path, 1) from None
    *complete, torn = text.split("\n")
    found: list[tuple[int, dict[str, Any]]] = []
    for n, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise _not_ours(path, n) from None
        if not isinstance(obj, dict) or not _RECORD_KEYS <= set(obj):
            raise _not_ours(path, n)
        found.append((n, obj))
    done = dict(zip(_slots([_record_key(obj) for _, obj in found]), found))
    if torn:
        if not torn.startswith(_RECORD_START):
            raise _not_ours(path, len(complete) + 1)
        if repair:
            write_text(path, text[: len(text) - len(torn)])
    return done


def check_out(out: str | Path) -> Path:
    """Fail before any work when `out` cannot serve as a locate output: not writable, another writer's, or a
    file rome-locate did not write. Reads only."""
    path = check_output_file(out, "--out")
    check_lock(path, "--out")  # a lock left by a process that is gone is taken over, not refused
    _read_done(path, repair=False)
    return path


def record_line(obj: dict[str, Any]) -> str:
    """One JSON line of a locate record; a NaN or infinite number is an error naming the fact, never written."""
    bad = non_finite(obj)
    if bad:
        raise ValueError(f"fact {obj.get('fact_id')!r}: non-finite numbers (NaN or inf) in {', '.join(bad[:5])}; "
                         f"not written (check the model's weights and dtype)")
    return json.dumps(obj, allow_nan=False)


def _serves(stored: TraceSettings, asked: TraceSettings) -> bool:
    """Whether a record traced with `stored` answers a request for `asked` (a full table also has the row)."""
    return stored == asked or (stored.full and not asked.full and dataclasses.replace(stored, full=False) == asked)


def _mismatch(obj: dict[str, Any], settings: TraceSettings, model: ModelFingerprint) -> str | None:
    """Why the record `obj` cannot be reused for `settings` on `model`; None when it can."""
    raw = obj.get("settings")
    if not isinstance(raw, dict) or not isinstance(obj.get("model"), dict):
        return "it was written without trace settings and a model fingerprint (an older rome-locate)"
    try:
        stored, stored_model = TraceSettings.from_json(raw), ModelFingerprint.from_json(obj["model"])
    except (TypeError, ValueError) as exc:
        return f"its settings or model cannot be read ({exc})"
    why = []
    if not _serves(stored, settings):
        diff = [f"{f.name}={getattr(stored, f.name)!r} there, {f.name}={getattr(settings, f.name)!r} asked"
                for f in dataclasses.fields(TraceSettings) if getattr(stored, f.name) != getattr(settings, f.name)]
        why.append("it was traced with other settings: " + "; ".join(diff))
    if stored_model != model:
        why.append(f"it was traced on another model ({stored_model.short()}; this one is {model.short()})")
    return ", and ".join(why) or None


def record(result: TraceResult, choice: LayerChoice) -> dict[str, Any]:
    """The JSON line of one located fact: the trace's fields plus the choice's."""
    return {**result.to_json(), **choice.to_json()}


def _plot_stem(plots_dir: Path, result: TraceResult, nth: int = 0) -> Path:
    # nth: the fact's place among the facts of one id, so facts whose ids collide do not share a heatmap.
    return plots_dir / (f"trace_{safe_name(result.fact_id)}_{result.kind}" + (f"_{nth}" if nth else ""))


def locate(model: nn.Module, tok, facts: Sequence[Fact], settings: TraceSettings = TraceSettings(), *,
           out: str | Path | None = None, plots_dir: str | Path | None = None, progress: bool = True,
           arch: Arch | None = None, skip_errors: bool = False,
           dataset: Sequence[Fact] | None = None,
           batch_facts: int | None = None) -> list[tuple[TraceResult, LayerChoice]]:
    """Trace and choose a layer for every fact; with `out`, append one flushed JSON line per fact and resume.

    A "Ksigma" noise level is computed once over all the facts' subjects. With
    `plots_dir`, every fact is traced in full (tokens × layers, about T times
    the work of the default last-subject-token row) to draw its heatmap, and the
    average-effect plot is drawn at the end. Every record carries the settings
    and the model's fingerprint; a rerun with the same `out` reuses the records
    already there only when both match, and refuses otherwise. A record serves
    the fact with its id, prompt, subject and target (`fact_key`): a corrected
    fact is traced again and its old line is left in place, unused; facts alike
    in all four get one line each, matched in order. `out` is written by one
    run at a time (`out`.lock beside it) and only if rome-locate wrote it.
    `skip_errors` warns and goes on when a fact
    cannot be traced (a ValueError: subject not in the prompt, prompt too long,
    NaN in the model). `dataset`, when `facts` is a shard of it (torchrun), is
    where the noise level and the replacement subjects come from, so that a
    shard is traced as the whole is. `settings.method="atp"` (with
    `verify_top`) estimates each table by attribution patching. Facts of one
    prompt length share forwards, `batch_facts` at most (default: as many as
    fill a forward; 1 traces each fact alone).
    """
    out_path = check_out(out) if out is not None else None
    plots = check_plots_dir(plots_dir, "--plots") if plots_dir is not None else None
    facts = list(facts)
    whole = list(dataset) if dataset is not None else facts
    arch = arch_for(model, arch)
    if plots is not None:
        settings = dataclasses.replace(settings, full=True)
    with contextlib.ExitStack() as stack:
        if out_path is not None:
            stack.enter_context(output_lock(out_path, "--out"))
        return _locate(model, tok, facts, whole, settings, out_path, plots, progress, arch, skip_errors, batch_facts)


def _draw(drawn: HeatmapRecord | None, result: TraceResult, nth: int) -> tuple[Path, str] | None:
    """The fact's heatmap in the plots folder ((its stem, the fact it shows)), unless there is no table or that
    fact's heatmap was drawn already with these settings on this model; a corrected fact is drawn again."""
    if drawn is None or result.table is None:
        return None
    stem = _plot_stem(drawn.folder, result, nth)
    shown = json.dumps([result.prompt, result.subject, result.target])
    if drawn.current(stem, shown):
        return None
    heatmap(result, stem)
    return stem, shown


def _note(drawn: HeatmapRecord | None, stems: list[tuple[Path, str] | None]) -> None:
    if drawn is not None:
        drawn.add([s for s in stems if s is not None])


def _resumable(out_path: Path | None, settings: TraceSettings, model_id) -> dict[Slot, tuple[int, dict]]:
    """The records already in `out_path` by slot; an error naming the line when one cannot be reused."""
    done: dict[Slot, tuple[int, dict[str, Any]]] = {}
    if out_path is not None:
        done = _read_done(out_path)
        for n, obj in done.values():
            why = _mismatch(obj, settings, model_id)
            if why is not None:
                raise ValueError(f"{out_path}:{n}: cannot resume: {why}. To start fresh, pass another --out "
                                 f"or delete {out_path}")
    return done


def _corruption(model: nn.Module, tok, whole: list[Fact], settings: TraceSettings,
                arch: Arch) -> tuple[float | None, list[str] | None]:
    """(noise level, replacement subjects) of the dataset: one of them, as the settings ask."""
    if settings.noise_draws == "replace":
        return None, [f.subject for f in whole]
    if settings.fixed_noise is not None:
        return None, None
    level = noise_level(model, tok, whole, arch, factor=settings.noise_factor)
    if not math.isfinite(level):
        raise ValueError(f"the noise level ({settings.noise} of the subjects' embeddings) is {level}: the "
                         f"model's embedding weights hold NaN or inf (check the model file and --dtype)")
    return level, None


def _windows(slots: list[Slot], done: Container[Slot]) -> list[list[int]]:
    """Positions of the facts not yet traced, by window of WINDOW facts: the windows of a fresh run and of a
    resumed one are the same, so a window traces (and is written) alike either way."""
    windows: list[list[int]] = []
    for n, slot in enumerate(slots):
        if n % WINDOW == 0:
            windows.append([])
        if slot not in done:
            windows[-1].append(n)
    return windows


def _nth_of_id(facts: list[Fact]) -> list[int]:
    """Each fact's place among the facts of its id (0 for the first), for the names of their heatmaps."""
    return [n for _, n in _slots([(str(f.id), "", "", None) for f in facts])]


def _locate(model: nn.Module, tok, facts: list[Fact], whole: list[Fact], settings: TraceSettings,
            out_path: Path | None, plots: Path | None, progress: bool, arch: Arch,
            skip_errors: bool, batch_facts: int | None) -> list[tuple[TraceResult, LayerChoice]]:
    model_id = fingerprint(model)
    done = _resumable(out_path, settings, model_id)
    level, replacements = _corruption(model, tok, whole, settings, arch)
    drawn = None
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        drawn = HeatmapRecord(plots, settings.kind, settings, model_id)
    slots = _slots([fact_key(f) for f in facts])
    nth = _nth_of_id(facts)
    windows = _windows(slots, done)
    fresh: dict[int, tuple[TraceResult, LayerChoice]] = {}
    fh = out_path.open("a", encoding="utf-8") if out_path is not None else None
    bar = tqdm(total=len(facts), desc=f"locate ({settings.kind})", unit="fact", disable=not progress)
    try:
        bar.update(len(facts) - sum(len(part) for part in windows))
        for part in filter(None, windows):
            outcomes = trace_each_by_method(model, tok, [facts[n] for n in part], settings, arch=arch,
                                            noise_level=level, replacements=replacements, batch_facts=batch_facts)
            for n, out in zip(part, outcomes):
                fact = facts[n]
                try:
                    if isinstance(out, ValueError):
                        raise out
                    result = dataclasses.replace(out, model=model_id)
                    choice = choose_layer(result)
                    obj = record(result, choice)
                    line = record_line(obj)
                except ValueError as exc:
                    message = str(exc) if str(exc).startswith("fact ") else f"fact {fact.id!r}: {exc}"
                    if not skip_errors:
                        raise ValueError(message) from None
                    warnings.warn(f"skipped {message}", stacklevel=3)
                    continue
                finally:
                    bar.update(1)
                if fh is not None:
                    fh.write(line + "\n")
                fresh[n] = (result, choice)
            if fh is not None:
                fh.flush()
                os.fsync(fh.fileno())
            _note(drawn, [_draw(drawn, fresh[n][0], nth[n]) for n in part if n in fresh])
    finally:
        bar.close()
        if fh is not None:
            fh.close()
    results: list[tuple[TraceResult, LayerChoice]] = []
    redrawn = []
    for n, slot in enumerate(slots):
        if n in fresh:
            result, choice = fresh[n]
        elif slot in done:
            obj = done[slot][1]
            result, choice = TraceResult.from_json(obj), LayerChoice.from_json(obj)
            redrawn.append(_draw(drawn, result, nth[n]))
        else:  # skipped (skip_errors)
            continue
        results.append((result, choice))
    _note(drawn, redrawn)
    if plots is not None and results:
        average_effect_plot([r for r, _ in results], plots / f"average_effect_{settings.kind}")
    return results


def summary_lines(results: Sequence[TraceResult], wall: float) -> list[str]:
    """What `rome-locate locate` prints after tracing: counts, the noise, known facts, the dataset's edit layer (the
    editable layer of largest mean effect, as `hparams` writes it) and the per-layer table."""
    from .choose import choose_dataset_layer, dataset_edit_layer

    d = choose_dataset_layer(results)
    layer = dataset_edit_layer(d.mean_effects)
    known = [r.known for r in results if r.known is not None]
    first = results[0]
    lines = [f"{len(results)} facts traced ({first.kind}) in {wall:.1f} s; noise {first.noise:.4g} "
             f"({first.noise_draws}), window {first.window}, {first.samples} samples"]
    if known:
        lines.append(f"known facts (model top-1 = target's first token): {sum(known)}/{len(known)}")
    lines.append(f"dataset layer: {layer} (mean indirect effect {d.mean_effects[layer]:.4f}; the last layer, which "
                 f"ROME cannot edit, is never chosen)")
    lines.append("layer  facts  mean_IE")
    lines += [f"{l:5d}  {n:5d}  {m:+.4f}" for l, (n, m) in enumerate(zip(d.histogram, d.mean_effects))]
    return lines
