"""Pictures in the style of ROME's figures: per-fact heatmaps and the dataset's average indirect effect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
# Figure objects, not pyplot: no global backend switch and no figure registry in the caller's process.
from matplotlib.figure import Figure

from .files import atomic_path, check_output_dir, write_json
from .trace import TraceResult

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
COLORS = {"hidden": "purple", "mlp": "green", "attn": "red"}
KIND_LABEL = {"hidden": "single restored layer", "mlp": "MLP", "attn": "Attn"}
FORMATS = ("png", "pdf")


def save_figure(fig, path_stem: str | Path, formats: tuple[str, ...] = FORMATS, dpi: int = 150) -> list[Path]:
    """Write the figure once per format next to `path_stem`, each atomically."""
    stem = Path(path_stem)
    paths = []
    for fmt in formats:
        final = stem.with_name(stem.name + "." + fmt)
        with atomic_path(final) as tmp:
            fig.savefig(tmp, format=fmt, bbox_inches="tight", dpi=dpi if fmt == "png" else None)
        paths.append(final)
    return paths


def token_labels(result: TraceResult) -> list[str]:
    """Token strings for the y axis; subject tokens get a star, as in ROME's figures ("Dor*")."""
    b, e = result.subject_range
    # Whitespace-only tokens would be invisible on the axis.
    shown = [repr(t)[1:-1] if t.strip() else "␣" * max(1, len(t)) for t in result.tokens]
    return [s + ("*" if b <= i < e else "") for i, s in enumerate(shown)]


def _xlabel(result: TraceResult) -> str:
    if result.kind == "hidden":
        return "single restored layer"
    return f"center of interval of {result.window} restored {KIND_LABEL[result.kind]} layers"


def heatmap(result: TraceResult, path_stem: str | Path) -> list[Path]:
    """Tokens × layers heatmap of p(answer) with restoration; needs a full trace (`full=True`)."""
    if result.table is None:
        raise ValueError(f"fact {result.fact_id!r}: the heatmap needs the full table; trace with full=True")
    table = np.asarray(result.table, dtype=float)
    n_tokens, n_layers = table.shape
    fig = Figure(figsize=(max(3.5, 0.35 * n_layers + 2.0), max(2.0, 0.28 * n_tokens + 1.0)))
    ax = fig.subplots()
    mesh = ax.pcolormesh(table, cmap=CMAPS[result.kind], vmin=result.low_score)
    ax.invert_yaxis()
    ax.set_yticks(np.arange(n_tokens) + 0.5)
    ax.set_yticklabels(token_labels(result), fontsize=8)
    step = max(1, n_layers // 8)
    ax.set_xticks(np.arange(0, n_layers, step) + 0.5)
    ax.set_xticklabels([str(i) for i in range(0, n_layers, step)])
    ax.set_xlabel(_xlabel(result))
    kind = {"hidden": "single restored layer", "mlp": "MLP", "attn": "Attn"}[result.kind]
    title = "Impact of restoring state after corrupted input" if result.kind == "hidden" else \
        f"Impact of restoring {kind} after corrupted input"
    ax.set_title(f"{title}\nanswer {result.answer!r} ({result.answer_source})", fontsize=9)
    cb = fig.colorbar(mesh, ax=ax)
    cb.set_label("p(answer)")
    return save_figure(fig, path_stem)


def average_effect_plot(results: Sequence[TraceResult], path_stem: str | Path) -> list[Path]:
    """Mean indirect effect at the last subject token per layer, with a 95% band, over a dataset."""
    results = list(results)
    if not results:
        raise ValueError("no traced facts to average")
    kinds = {r.kind for r in results}
    depths = {len(r.scores) for r in results}
    if len(kinds) > 1 or len(depths) > 1:
        raise ValueError(f"cannot average traces of kinds {sorted(kinds)} and depths {sorted(depths)}")
    kind = kinds.pop()
    eff = np.array([r.effects for r in results], dtype=float)
    mean = eff.mean(axis=0)
    band = 1.96 * eff.std(axis=0, ddof=1) / np.sqrt(len(results)) if len(results) > 1 else np.zeros_like(mean)
    layers = np.arange(eff.shape[1])
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    ax.plot(layers, mean, color=COLORS[kind], marker="o", ms=3, label=f"{kind} (n={len(results)})")
    ax.fill_between(layers, mean - band, mean + band, color=COLORS[kind], alpha=0.2, label="95% interval")
    best = int(np.argmax(mean))
    ax.axvline(best, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("layer" if kind == "hidden" else f"center of interval of {results[0].window} restored layers")
    ax.set_ylabel("average indirect effect on p(answer)")
    ax.set_title(f"Average indirect effect of {KIND_LABEL[kind]} at the last subject token (peak: layer {best})",
                 fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path_stem)


# ---- which per-fact heatmaps are current --------------------------------------------------------------------

PLOTS_RECORD = "rome-locate-plots.json"  # beside the heatmaps: the settings and model they were drawn with
_WRITTEN_BY = "rome-locate locate --plots"


def _read_record(folder: Path) -> dict[str, Any] | None:
    """The folder's record, {} when there is none, None when the file is not one rome-locate wrote."""
    path = folder / PLOTS_RECORD
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ours = isinstance(obj, dict) and obj.get("written_by") == _WRITTEN_BY and isinstance(obj.get("heatmaps"), dict)
    return obj if ours else None


def _own_record(folder: Path, flag: str = "--plots") -> dict[str, Any]:
    obj = _read_record(folder)
    if obj is None:
        raise FileExistsError(f"{flag} {folder}: {folder / PLOTS_RECORD} exists and was not written by rome-locate; "
                              f"rome-locate never writes over a file it did not write: pass another {flag}")
    return obj


def check_plots_dir(folder: str | Path, flag: str = "--plots") -> Path:
    """Fail now when `folder` cannot hold the plots: not writable, or its record file is not rome-locate's."""
    folder = check_output_dir(folder, flag)
    _own_record(folder, flag)
    return folder


def _drawn(entry: Mapping[str, Any]) -> dict[str, str]:
    drawn = entry.get("drawn")
    return {str(k): str(v) for k, v in drawn.items()} if isinstance(drawn, Mapping) else {}


class HeatmapRecord:
    """Which per-fact heatmaps of a plots folder were drawn with this run's trace settings and model.

    `PLOTS_RECORD` keeps, per kind, the settings and model fingerprint and the
    heatmaps drawn with them. A heatmap is reused only when it is listed under
    the same settings and model; after a change of either, every heatmap of the
    kind is redrawn (the record is reset first, so that a run stopped halfway
    leaves the rest marked as not current).
    """

    def __init__(self, folder: str | Path, kind: str, settings: Any, model: Any):
        self.folder, self.kind = Path(folder), kind
        self.key = {"settings": settings.to_json(), "model": model.to_json()}
        self.drawn: dict[str, str] = {}  # heatmap stem name -> the fact it shows
        entry = _own_record(self.folder).get("heatmaps", {}).get(kind)
        if isinstance(entry, dict) and {k: entry.get(k) for k in self.key} == self.key:
            self.drawn = _drawn(entry)
        else:
            self._write()

    def current(self, stem: Path, fact: str) -> bool:
        """Whether the heatmap at `stem` (without its suffix) shows `fact` (a fact's text key), drawn with these
        settings on this model: a corrected fact under the same name is drawn again."""
        return self.drawn.get(stem.name) == fact and stem.with_name(stem.name + ".png").exists()

    def add(self, drawn: Sequence[tuple[Path, str]]) -> None:
        """Note heatmaps just drawn with these settings: (stem, the fact it shows)."""
        if drawn:
            self.drawn.update({stem.name: fact for stem, fact in drawn})
            self._write()

    def _write(self) -> None:
        obj = _own_record(self.folder)
        entries = dict(obj.get("heatmaps") or {})
        old = entries.get(self.kind)
        if isinstance(old, dict) and {k: old.get(k) for k in self.key} == self.key:
            self.drawn = {**_drawn(old), **self.drawn}  # another torchrun rank's heatmaps, drawn alike
        entries[self.kind] = {**self.key, "drawn": dict(sorted(self.drawn.items()))}
        write_json(self.folder / PLOTS_RECORD, {"written_by": _WRITTEN_BY, "heatmaps": entries})
