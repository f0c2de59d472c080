"""Locate: trace every fact of a dataset, choose its layer, and write one JSON line per fact (resumable)."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from torch import nn
from tqdm.auto import tqdm

from .arch import Arch, arch_for
from .choose import LayerChoice, choose_layer
from .facts import Fact
from .files import safe_name, write_text
from .models import ModelFingerprint, fingerprint
from .plots import average_effect_plot, heatmap
from .trace import TraceResult, TraceSettings, noise_level, trace_fact


def _key(fact_id: Any, prompt: str) -> tuple[str, str]:
    return str(fact_id), prompt


def _read_done(path: Path) -> dict[tuple[str, str], tuple[int, dict[str, Any]]]:
    """Records already in `path` with their line numbers; a torn last line (an interrupted write) is dropped."""
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        keep = text[: text.rfind("\n") + 1]
        write_text(path, keep)
        text = keep
    done = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            done[_key(obj["fact_id"], obj["prompt"])] = (n, obj)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a locate record ({exc}); use another --out or remove the file") \
                from None
    return done


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
    if not _serves(stored, settings):
        diff = [f"{f.name}={getattr(stored, f.name)!r} there, {f.name}={getattr(settings, f.name)!r} asked"
                for f in dataclasses.fields(TraceSettings) if getattr(stored, f.name) != getattr(settings, f.name)]
        return "it was traced with other settings: " + "; ".join(diff)
    if stored_model != model:
        return f"it was traced on another model ({stored_model.short()}; this one is {model.short()})"
    return None


def record(result: TraceResult, choice: LayerChoice) -> dict[str, Any]:
    """The JSON line of one located fact: the trace's fields plus the choice's."""
    return {**result.to_json(), **choice.to_json()}


def _plot_stem(plots_dir: Path, result: TraceResult) -> Path:
    return plots_dir / f"trace_{safe_name(result.fact_id)}_{result.kind}"


def locate(model: nn.Module, tok, facts: Sequence[Fact], settings: TraceSettings = TraceSettings(), *,
           out: str | Path | None = None, plots_dir: str | Path | None = None, progress: bool = True,
           arch: Arch | None = None, skip_errors: bool = False) -> list[tuple[TraceResult, LayerChoice]]:
    """Trace and choose a layer for every fact; with `out`, append one flushed JSON line per fact and resume.

    A "Ksigma" noise level is computed once over all the facts' subjects. With
    `plots_dir`, every fact is traced in full (tokens × layers, about T times
    the work of the default last-subject-token row) to draw its heatmap, and the
    average-effect plot is drawn at the end. Every record carries the settings
    and the model's fingerprint; a rerun with the same `out` reuses the records
    already there (matched by id and prompt) only when both match, and refuses
    otherwise. `skip_errors` warns and goes on when a fact cannot be traced.
    """
    facts = list(facts)
    arch = arch_for(model, arch)
    plots = Path(plots_dir) if plots_dir is not None else None
    if plots is not None:
        settings = dataclasses.replace(settings, full=True)
    model_id = fingerprint(model)

    out_path = Path(out) if out is not None else None
    done: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
    if out_path is not None:
        done = _read_done(out_path)
        for n, obj in done.values():
            why = _mismatch(obj, settings, model_id)
            if why is not None:
                raise ValueError(f"{out_path}:{n}: cannot resume: {why}. To start fresh, pass another --out "
                                 f"or delete {out_path}")

    replacements = None
    level = None
    if settings.noise_draws == "replace":
        replacements = [f.subject for f in facts]
    elif settings.fixed_noise is None:
        level = noise_level(model, tok, facts, arch, factor=settings.noise_factor)
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)

    results: list[tuple[TraceResult, LayerChoice]] = []
    fh = out_path.open("a", encoding="utf-8") if out_path is not None else None
    try:
        bar = tqdm(facts, desc=f"locate ({settings.kind})", unit="fact", disable=not progress)
        for fact in bar:
            key = _key(fact.id, fact.prompt)
            if key in done:
                obj = done[key][1]
                result, choice = TraceResult.from_json(obj), LayerChoice.from_json(obj)
            else:
                try:
                    result = trace_fact(model, tok, fact, settings, arch=arch, noise_level=level,
                                        replacements=replacements)
                except ValueError as exc:
                    if not skip_errors:
                        raise ValueError(f"fact {fact.id!r}: {exc}") from None
                    warnings.warn(f"skipped fact {fact.id!r}: {exc}", stacklevel=2)
                    continue
                result = dataclasses.replace(result, model=model_id)
                choice = choose_layer(result)
                obj = record(result, choice)
                if fh is not None:
                    fh.write(json.dumps(obj) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                done[key] = (0, obj)
            results.append((result, choice))
            if plots is not None and result.table is not None:
                stem = _plot_stem(plots, result)
                if not stem.with_name(stem.name + ".png").exists():
                    heatmap(result, stem)
    finally:
        if fh is not None:
            fh.close()
    if plots is not None and results:
        average_effect_plot([r for r, _ in results], plots / f"average_effect_{settings.kind}")
    return results
