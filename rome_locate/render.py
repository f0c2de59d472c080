"""How the report looks: its neutral structure (sections of plain-text paragraphs, tables, images), the two
renderers of it, and the pictures.

`rome_locate.report` builds the sections once; `to_markdown` and `to_html` only
lay them out. Every text the HTML shows goes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

if TYPE_CHECKING:
    from .outcome import EvalRecord


@dataclass(frozen=True)
class Para:
    """A paragraph of plain text, optionally led by a bold label; style "error" marks it as a warning box."""

    text: str
    lead: str = ""
    style: str = ""


@dataclass(frozen=True)
class Table:
    """A table of plain-text cells."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> "Table":
        """A table whose cells are the `str` of the given values."""
        return cls(tuple(str(h) for h in header), tuple(tuple(str(c) for c in row) for row in rows))


@dataclass(frozen=True)
class Image:
    """A PNG written under the output folder, with its alternative text."""

    path: Path
    alt: str


@dataclass(frozen=True)
class Code:
    """A preformatted block (JSON), shown folded in the HTML under its label."""

    label: str
    text: str
    lang: str = "json"


@dataclass(frozen=True)
class Bullets:
    """A bulleted list of plain-text items."""

    items: tuple[str, ...]


Block = Union[Para, Table, Image, Code, Bullets]


@dataclass(frozen=True)
class Section:
    """A titled part of the report (level 2-4; an empty title adds no heading); `card` boxes it in the HTML."""

    title: str
    blocks: tuple[Block, ...] = ()
    children: tuple["Section", ...] = ()
    level: int = 2
    anchor: str = ""
    card: bool = False


def fmt(v: Any) -> str:
    """A value as a report cell: None as an en dash, floats to three decimals (tiny ones to 3 significant digits)."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}"
    return str(v)


# ---- Markdown ----------------------------------------------------------------------


def md_cell(text: str) -> str:
    """A table cell's text escaped for a Markdown pipe table (one line)."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_block(block: Block, out_dir: Path) -> list[str]:
    if isinstance(block, Para):
        text = f"**{block.lead}** {block.text}" if block.lead else block.text
        return [f"> {text}" if block.style == "error" else text]
    if isinstance(block, Table):
        lines = ["| " + " | ".join(md_cell(h) for h in block.header) + " |", "|" + "---|" * len(block.header)]
        return lines + ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in block.rows]
    if isinstance(block, Image):
        # Relative, so the folder can be moved or shared as a whole.
        return [f"![{block.alt}]({block.path.relative_to(out_dir).as_posix()})"]
    if isinstance(block, Code):
        return [f"{block.label}:", "", f"```{block.lang}", block.text, "```"]
    return [f"- {item}" for item in block.items]


def _md_section(section: Section, out_dir: Path) -> list[str]:
    lines = [f"{'#' * section.level} {section.title}", ""] if section.title else []
    for block in section.blocks:
        lines += _md_block(block, out_dir) + [""]
    for child in section.children:
        lines += _md_section(child, out_dir)
    return lines


def to_markdown(title: str, sections: Sequence[Section], out_dir: Path, marker: str = "") -> str:
    """The report as Markdown, after the `marker` line when given; images are linked relative to `out_dir`."""
    lines = ([marker] if marker else []) + [f"# {title}", ""]
    for section in sections:
        lines += _md_section(section, out_dir)
    return "\n".join(lines)


# ---- HTML --------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top;font-size:90%}
th{background:#f2f2f2}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.card{border:1px solid #bbb;border-radius:6px;padding:0 1em 1em;margin:1.5em 0}
.error{background:#fee;border:1px solid #c33;padding:.5em 1em}
img{max-width:100%}
"""


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _html_table(table: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in table.header)
    num = ' class="num"'
    body = "".join("<tr>" + "".join(f"<td{num if _looks_numeric(c) else ''}>{e(c)}</td>" for c in row) + "</tr>"
                   for row in table.rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html_block(block: Block) -> str:
    e = html.escape
    if isinstance(block, Para):
        text = (f"<b>{e(block.lead)}</b> " if block.lead else "") + e(block.text)
        return f"<div class='error'>{text}</div>" if block.style == "error" else f"<p>{text}</p>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Image):
        # Inline, so the page is one self-contained file.
        data = base64.b64encode(block.path.read_bytes()).decode("ascii")
        return f"<img alt='{e(block.alt)}' src='data:image/png;base64,{data}'>"
    if isinstance(block, Code):
        return f"<details><summary>{e(block.label)}</summary><pre>{e(block.text)}</pre></details>"
    return "<ul>" + "".join(f"<li>{e(item)}</li>" for item in block.items) + "</ul>"


def _html_section(section: Section) -> list[str]:
    e = html.escape
    anchor = f" id='{e(section.anchor)}'" if section.anchor else ""
    out = [f"<div class='card'{anchor}>"] if section.card else []
    if section.title:
        out.append(f"<h{section.level}{'' if section.card else anchor}>{e(section.title)}</h{section.level}>")
    out += [_html_block(b) for b in section.blocks]
    for child in section.children:
        out += _html_section(child)
    return out + (["</div>"] if section.card else [])


def to_html(title: str, sections: Sequence[Section], marker: str = "") -> str:
    """The report as one self-contained HTML page (the `marker` line after the doctype): images inline, every
    shown text escaped."""
    e = html.escape
    doctype = f"<!DOCTYPE html>\n{marker}\n" if marker else "<!DOCTYPE html>"
    out = [f"{doctype}<html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style></head>"
           f"<body>", f"<h1>{e(title)}</h1>"]
    for section in sections:
        out += _html_section(section)
    out.append("</body></html>")
    return "\n".join(out)


# ---- pictures ----------------------------------------------------------------------


def heatmap_png(trace: Any, folder: Path, stem: str) -> Path | None:
    """The trace's heatmap PNG in `folder`; a trace without the full table gets a bar chart of its effects."""
    if getattr(trace, "table", None) is None:
        return _effect_bars(trace, folder / f"effects_{stem}.png")
    from .plots import heatmap

    paths = heatmap(trace, folder / f"trace_{stem}")
    return next((Path(p) for p in paths if str(p).endswith(".png")), None)


def _save_png(fig, path: Path) -> Path:
    from .plots import save_figure

    return save_figure(fig, path.with_suffix(""), formats=("png",), dpi=110)[0]


def _effect_bars(trace: Any, path: Path) -> Path:
    from matplotlib.figure import Figure

    effects = list(trace.effects)
    fig = Figure(figsize=(5, 2.6))
    ax = fig.subplots()
    ax.bar(range(len(effects)), effects, color="tab:green")
    ax.set_xlabel(f"layer ({trace.kind}, window {trace.window})")
    ax.set_ylabel("indirect effect")
    ax.set_title(f"last subject token, answer {trace.answer!r}", fontsize=9)
    fig.tight_layout()
    return _save_png(fig, path)


def sweep_plot(records: Sequence[EvalRecord], path: Path) -> Path | None:
    """Traced indirect effect against edit success (rewrite score) per layer, per fact and averaged."""
    swept = [r for r in records if r.sweep]
    if not swept:
        return None
    from matplotlib.figure import Figure
    import numpy as np

    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    drawn = 0
    for r in swept:
        pts = [(s.effect, s.rewrite_score) for s in r.sweep if s.effect is not None and s.rewrite_score is not None]
        if pts:
            ax1.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, label=f"fact {r.fact_id}")
            drawn += 1
    if not drawn:
        ax1.text(0.5, 0.5, "no traced effects (facts not traced)", ha="center", va="center", transform=ax1.transAxes)
    ax1.set_xlabel("traced indirect effect (p_restored - p_corrupt)")
    ax1.set_ylabel("edit success: rewrite score")
    ax1.set_title("per layer, each fact")
    if 0 < drawn <= 10:
        ax1.legend(fontsize=7)
    n_layers = max(s.layer for r in swept for s in r.sweep) + 1
    success = np.full((len(swept), n_layers), np.nan)
    effect = np.full((len(swept), n_layers), np.nan)
    for i, r in enumerate(swept):
        for s in r.sweep:
            if s.rewrite_score is not None:
                success[i, s.layer] = s.rewrite_score
            if s.effect is not None:
                effect[i, s.layer] = s.effect
    layers = np.arange(n_layers)
    ax2.plot(layers, np.nanmean(success, 0), "o-", color="tab:red", label="mean rewrite score")
    ax2.set_xlabel("layer")
    ax2.set_xticks(layers)
    ax2.set_ylabel("mean rewrite score", color="tab:red")
    if not np.isnan(effect).all():
        ax3 = ax2.twinx()
        ax3.plot(layers, np.nanmean(effect, 0), "s--", color="tab:blue", label="mean indirect effect")
        ax3.set_ylabel("mean indirect effect", color="tab:blue")
    ax2.set_title("by layer, mean over facts")
    fig.tight_layout()
    return _save_png(fig, path)


def curve_plot(curve: Sequence[Mapping[str, float | None]], path: Path) -> Path:
    """Success, rephrase_acc and locality of the edits so far against the number of edits, on a log axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    xs = [p["n_edits"] for p in curve]
    for key, label in (("success", "efficacy (target_new top-1)"), ("rephrase_acc", "rephrase_acc"),
                       ("locality", "locality")):
        ys = [p.get(key) for p in curve]
        if any(y is not None for y in ys):
            ax.plot(xs, [float("nan") if y is None else y for y in ys], "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("number of edits")
    ax.set_ylabel("mean over the edits so far")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_png(fig, path)
