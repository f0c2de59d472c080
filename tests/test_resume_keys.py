"""locate's resume matches a record to a fact by everything that defines the fact's trace (issue 21, items 4
and 5): a corrected fact is traced again, and facts that share an id and a prompt each get their own trace."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import build_tiny_model

from rome_locate import cli
from rome_locate import locate as locate_mod
from rome_locate.fact_models import fact_model_dir
from rome_locate.facts import Fact
from rome_locate.locate import locate
from rome_locate.trace import TraceSettings

SETTINGS = TraceSettings(samples=2, noise=0.1)
FACTS = [
    Fact(prompt="Dorven Kaltmoor was born in the city of", subject="Dorven Kaltmoor", target="Paris", id="0"),
    Fact(prompt="Alma Berridge speaks the language of", subject="Alma Berridge", target="French", id="1"),
]


@pytest.fixture(scope="module")
def gpt2(tiny_tokenizer):
    return build_tiny_model("gpt2", len(tiny_tokenizer)), tiny_tokenizer


@pytest.fixture
def traced(monkeypatch):
    """The ids of the facts handed to tracing, in order."""
    calls: list[str] = []
    real = locate_mod.trace_each_by_method

    def counting(model, tok, facts, settings, **kw):
        calls.extend(f.id for f in facts)
        return real(model, tok, facts, settings, **kw)

    monkeypatch.setattr(locate_mod, "trace_each_by_method", counting)
    return calls


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("correction", [{"subject": "Kaltmoor"}, {"target": "Rome"}])
def test_a_corrected_fact_is_traced_again_and_the_stale_line_is_ignored(gpt2, tmp_path, traced, correction):
    model, tok = gpt2
    out = tmp_path / "res.jsonl"
    locate(model, tok, FACTS, SETTINGS, out=out, progress=False)
    first = out.read_text()
    traced.clear()
    fixed = [dataclasses.replace(FACTS[0], **correction), FACTS[1]]
    pairs = locate(model, tok, fixed, SETTINGS, out=out, progress=False)
    assert traced == ["0"]  # only the corrected fact
    (name, value), = correction.items()
    assert getattr(pairs[0][0], name) == value and pairs[1][0].fact_id == "1"
    # Appended, never rewritten: the stale line stays in the file, and nothing reads it for the corrected fact.
    assert out.read_text().startswith(first) and len(_lines(out)) == 3
    assert _lines(out)[2][name] == value
    traced.clear()
    again = locate(model, tok, fixed, SETTINGS, out=out, progress=False)
    assert traced == [] and [r for r, _ in again] == [r for r, _ in pairs]
    # The old facts still resume from their own lines.
    old = locate(model, tok, FACTS, SETTINGS, out=out, progress=False)
    assert traced == [] and old[0][0].subject == FACTS[0].subject and old[0][0].target == FACTS[0].target


def test_facts_sharing_id_and_prompt_each_get_their_own_trace(gpt2, tmp_path, traced):
    model, tok = gpt2
    prompt = "The Eiffel Tower is in Paris, and the Colosseum is in"
    facts = [Fact(prompt=prompt, subject="The Eiffel Tower"), Fact(prompt=prompt, subject="the Colosseum"),
             Fact(prompt=prompt, subject="the Colosseum")]
    out = tmp_path / "res.jsonl"
    pairs = locate(model, tok, facts, SETTINGS, out=out, progress=False)
    assert [r.subject for r, _ in pairs] == [f.subject for f in facts]
    assert [line["subject"] for line in _lines(out)] == [f.subject for f in facts]  # one line per fact
    assert pairs[0][0].subject_range != pairs[1][0].subject_range
    written = out.read_bytes()
    traced.clear()
    again = locate(model, tok, facts, SETTINGS, out=out, progress=False)
    assert traced == [] and out.read_bytes() == written
    assert [r.subject for r, _ in again] == [f.subject for f in facts]


def test_cli_counts_each_fact_without_an_id(tmp_path, capsys):
    prompt = "Kepwyn Poxberg was born in the city of"
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(rec) + "\n" for rec in [
        {"prompt": prompt, "subject": "Kepwyn Poxberg", "target": "Rome"},
        {"prompt": prompt, "subject": "Poxberg", "target": "Rome"},
        {"prompt": "The native language of Kepwyn Poxberg is", "subject": "Kepwyn Poxberg", "target": "English"},
    ]))
    out = tmp_path / "out.jsonl"
    argv = ["locate", "--model", str(fact_model_dir("gpt2")), "--facts", str(facts), "--out", str(out),
            "--device", "cpu", "--samples", "2", "--quiet"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 facts traced" in printed
    assert [line["subject"] for line in _lines(out)] == ["Kepwyn Poxberg", "Poxberg", "Kepwyn Poxberg"]
    assert cli.main(argv) == 0 and "3 facts traced" in capsys.readouterr().out and len(_lines(out)) == 3


def test_facts_whose_ids_collide_get_a_heatmap_each(gpt2, tmp_path):
    model, tok = gpt2
    prompt = "The Eiffel Tower is in Paris, and the Colosseum is in"
    facts = [Fact(prompt=prompt, subject="The Eiffel Tower"), Fact(prompt=prompt, subject="the Colosseum")]
    plots = tmp_path / "plots"
    locate(model, tok, facts, SETTINGS, plots_dir=plots, progress=False)
    heatmaps = sorted(p.name for p in plots.glob("trace_*.png"))
    assert len(heatmaps) == 2, heatmaps
