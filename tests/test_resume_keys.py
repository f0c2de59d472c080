"""locate's resume matches a record to a fact by everything that defines the fact's trace (issue 21, item 4):
a corrected fact is traced again."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import build_tiny_model

from rome_locate import locate as locate_mod
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
