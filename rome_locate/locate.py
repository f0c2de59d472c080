"""Locate: trace every fact of a dataset, choose its layer, and write one JSON line per fact (resumable)."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

from torch import nn
from tqdm.auto import tqdm

from .arch import Arch, arch_for
from .atp import tracer
from .choose import LayerChoice, choose_layer
from .facts import Fact
from .files import safe_name, write_text
from .plots import average_effect_plot, heatmap
from .trace import TraceResult, noise_level, trace_fact

_SIGMA = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*sigma\s*$", re.IGNORECASE)


def parse_noise(noise: float | str | None) -> tuple[float | None, float]:
    """Split a noise setting into (fixed level or None, factor of sigma): "3sigma" → (None, 3.0), 0.1 → (0.1, 0)."""
    if noise is None:
        return None, 3.0
    if isinstance(noise, (int, float)):
        return float(noise), 0.0
    m = _SIGMA.match(noise)
    if m:
        return None, float(m.group(1))
    try:
        return float(noise), 0.0
    except ValueError:
        raise ValueError(f"noise must be a number or 'Ksigma' (e.g. '3sigma'), got {noise!r}") from None


def _key(fact_id: Any, prompt: str) -> tuple[str, str]:
    return str(fact_id), prompt


def _read_done(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Records already in `path`; a torn last line (an interrupted write) is dropped from the file."""
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
            done[_key(obj["fact_id"], obj["prompt"])] = obj
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a locate record ({exc}); use another --out or remove the file") \
                from None
    return done


def record(result: TraceResult, choice: LayerChoice) -> dict[str, Any]:
    """The JSON line of one located fact: the trace's fields plus the choice's."""
    return {**result.to_json(), **choice.to_json()}


def _plot_stem(plots_dir: Path, result: TraceResult) -> Path:
    return plots_dir / f"trace_{safe_name(result.fact_id)}_{result.kind}"


def locate(model: nn.Module, tok, facts: Sequence[Fact], *, out: str | Path | None = None,
           plots_dir: str | Path | None = None, progress: bool = True, arch: Arch | None = None,
           noise: float | str | None = "3sigma", skip_errors: bool = False,
           **trace_kwargs) -> list[tuple[TraceResult, LayerChoice]]:
    """Trace and choose a layer for every fact; with `out`, append one flushed JSON line per fact and resume.

    The noise level is computed once over all the facts' subjects ("Ksigma"),
    unless a number is given. With `plots_dir`, every fact is traced in full
    (tokens × layers, about T times the work of the default last-subject-token
    row) to draw its heatmap, and the average-effect plot is drawn at the end.
    A rerun with the same `out` skips facts already there (matched by id and
    prompt). `skip_errors` warns and goes on when a fact cannot be traced.
    `method="atp"` (with `verify_top`) estimates each table by attribution patching.
    """
    facts = list(facts)
    arch = arch_for(model, arch)
    kind = trace_kwargs.get("kind", "mlp")
    method, verify_top = trace_kwargs.pop("method", "exact"), trace_kwargs.pop("verify_top", 0)
    trace = trace_fact if method == "exact" else tracer(method, verify_top)
    draws = trace_kwargs.get("noise_draws", "torch")
    level, factor = parse_noise(noise)
    if draws == "replace":
        level = 0.0
        trace_kwargs.setdefault("replacements", [f.subject for f in facts])
    elif level is None:
        level = noise_level(model, tok, facts, arch, factor=factor)
    plots = Path(plots_dir) if plots_dir is not None else None
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        trace_kwargs["full"] = True

    out_path = Path(out) if out is not None else None
    done: dict[tuple[str, str], dict[str, Any]] = {}
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        done = _read_done(out_path)
        for obj in done.values():
            if obj.get("kind") != kind:
                raise ValueError(f"{out_path} holds kind={obj.get('kind')!r} traces but kind={kind!r} was asked; "
                                 f"use another --out")

    results: list[tuple[TraceResult, LayerChoice]] = []
    fh = out_path.open("a", encoding="utf-8") if out_path is not None else None
    try:
        bar = tqdm(facts, desc=f"locate ({kind})", unit="fact", disable=not progress)
        for fact in bar:
            key = _key(fact.id, fact.prompt)
            if key in done:
                obj = done[key]
                result, choice = TraceResult.from_json(obj), LayerChoice.from_json(obj)
            else:
                try:
                    result = trace(model, tok, fact, arch=arch, noise=level, **trace_kwargs)
                except ValueError as exc:
                    if not skip_errors:
                        raise ValueError(f"fact {fact.id!r}: {exc}") from None
                    warnings.warn(f"skipped fact {fact.id!r}: {exc}", stacklevel=2)
                    continue
                choice = choose_layer(result)
                obj = record(result, choice)
                if fh is not None:
                    fh.write(json.dumps(obj) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                done[key] = obj
            results.append((result, choice))
            if plots is not None and result.table is not None:
                stem = _plot_stem(plots, result)
                if not stem.with_name(stem.name + ".png").exists():
                    heatmap(result, stem)
    finally:
        if fh is not None:
            fh.close()
    if plots is not None and results:
        average_effect_plot([r for r, _ in results], plots / f"average_effect_{kind}")
    return results
