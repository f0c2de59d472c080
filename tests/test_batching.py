"""Tracing many facts per forward: the same numbers as one fact at a time, per-fact errors, sites before the
subject, and the batch-size argument."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import build_tiny_model

from rome_locate import cli, costs, runs
from rome_locate.atp import attribution_each, attribution_trace
from rome_locate.facts import Fact
from rome_locate.fact_models import fact_model_dir, facts_path
from rome_locate.hooks import hook_count
from rome_locate.locate import locate
from rome_locate.tokens import find_subject_range
from rome_locate.trace import TraceResult, TraceSettings, trace_each, trace_fact, trace_facts

# Two prompt lengths with two facts each, one fact alone at a third, and subjects that do not start the prompt.
FACTS = [
    Fact(prompt="Dorven Kaltmoor was born in the city of", subject="Dorven Kaltmoor", target="Paris", id="a"),
    Fact(prompt="Miles Davis plays the", subject="Miles Davis", target="trumpet", id="b"),
    Fact(prompt="The trumpet of Miles Davis is", subject="Miles Davis", id="c"),
    Fact(prompt="Miles Davis works as a", subject="Miles Davis", id="d"),
    Fact(prompt="The language of Marta Lind is", subject="Marta Lind", target="French", id="e"),
    Fact(prompt="In Paris, the home of Alma Berridge, people speak", subject="Alma Berridge", id="f"),
]
SETTINGS = TraceSettings(samples=3, noise=3.0, noise_draws="rome", window=2)


@pytest.fixture(params=["gpt2", "llama"])
def sharp_model(request, tiny_tokenizer):
    """A tiny model with a peaked output (scaled, untied head), so restoring a site moves p(answer)."""
    model = build_tiny_model(request.param, len(tiny_tokenizer))
    out = model.get_output_embeddings()
    out.weight = torch.nn.Parameter(out.weight.detach().clone() * 30)
    return model, tiny_tokenizer


def _assert_same_trace(a: TraceResult, b: TraceResult) -> None:
    """Two traces of one fact agree: the same tokens and answer, the same numbers up to float rounding."""
    assert (a.tokens, a.subject_range, a.answer_id, a.top1) == (b.tokens, b.subject_range, b.answer_id, b.top1)
    assert b.high_score == pytest.approx(a.high_score, abs=1e-6)
    assert b.low_score == pytest.approx(a.low_score, abs=1e-6)
    np.testing.assert_allclose(b.scores, a.scores, atol=1e-6, rtol=0)
    assert (a.table is None) == (b.table is None)
    if a.table is not None:
        np.testing.assert_allclose(np.array(b.table), np.array(a.table), atol=1e-6, rtol=0)
    if a.target_logprob is None:
        assert b.target_logprob is None
    else:
        assert b.target_logprob == pytest.approx(a.target_logprob, abs=1e-5)


def _lengths(tok):
    return [len(find_subject_range(tok, f.prompt, f.subject)[2]) for f in FACTS]


def test_the_facts_share_prompt_lengths(tiny_tokenizer):
    lengths = _lengths(tiny_tokenizer)
    assert len(set(lengths)) < len(lengths)  # else no two facts would share a forward and nothing is tested


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("batch_facts", [None, 2])
def test_batched_equals_one_fact_at_a_time(sharp_model, monkeypatch, full, batch_facts):
    model, tok = sharp_model
    settings = dataclasses.replace(SETTINGS, full=full)
    one = [trace_fact(model, tok, f, settings) for f in FACTS]
    forwards = {"n": 0}
    real = runs.Caller.logits

    def counting(*args, **kwargs):
        forwards["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(runs.Caller, "logits", counting)
    many = trace_facts(model, tok, FACTS, settings, batch_facts=batch_facts)
    batched_forwards, forwards["n"] = forwards["n"], 0
    for f in FACTS:
        trace_fact(model, tok, f, settings)
    assert batched_forwards < forwards["n"]
    assert [r.fact_id for r in many] == [f.id for f in FACTS]
    for a, b in zip(one, many):
        _assert_same_trace(a, b)
        assert (a.table is None) == (not full)
    assert hook_count(model) == 0


def test_sites_before_the_subject_are_p_corrupt(sharp_model):
    """Causal attention: restoring a token before the subject changes nothing the corruption changed."""
    model, tok = sharp_model
    fact = FACTS[5]
    r = trace_fact(model, tok, fact, dataclasses.replace(SETTINGS, full=True), reuse_prefix=False)
    b, e = r.subject_range
    assert b > 0
    assert all(x == r.low_score for row in r.table[:b] for x in row)
    assert any(abs(x - r.low_score) > 1e-4 for row in r.table[b:] for x in row)


def test_a_fact_that_cannot_be_traced_does_not_stop_the_others(sharp_model):
    model, tok = sharp_model
    bad = Fact(prompt="Miles Davis plays the", subject="Dorven", id="bad")
    outcomes = trace_each(model, tok, [FACTS[1], bad, FACTS[3]], SETTINGS)
    assert isinstance(outcomes[0], TraceResult) and isinstance(outcomes[2], TraceResult)
    assert isinstance(outcomes[1], ValueError) and "Dorven" in str(outcomes[1])
    alone = trace_fact(model, tok, FACTS[3], SETTINGS)
    np.testing.assert_allclose(outcomes[2].scores, alone.scores, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="Dorven"):
        trace_facts(model, tok, [FACTS[1], bad], SETTINGS)
    assert hook_count(model) == 0


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_batch_facts_must_be_a_positive_integer(tiny_model, value):
    model, tok = tiny_model
    with pytest.raises(ValueError, match="batch_facts"):
        trace_each(model, tok, FACTS[:2], SETTINGS, batch_facts=value)


def test_attribution_batched_equals_one_fact_at_a_time(sharp_model):
    model, tok = sharp_model
    settings = dataclasses.replace(SETTINGS, method="atp", verify_top=3)
    many = attribution_each(model, tok, FACTS, settings)
    for fact, b in zip(FACTS, many):
        a = attribution_trace(model, tok, fact, settings)
        np.testing.assert_allclose(np.array(b.estimated), np.array(a.estimated), atol=1e-6, rtol=0)
        assert [(v.token, v.layer) for v in b.verified] == [(v.token, v.layer) for v in a.verified]
        np.testing.assert_allclose([v.exact for v in b.verified], [v.exact for v in a.verified], atol=1e-6)
        np.testing.assert_allclose(np.array(b.trace.table), np.array(a.trace.table), atol=1e-6, rtol=0)
    assert hook_count(model) == 0


def test_locate_with_small_batches_equals_default(sharp_model, tmp_path):
    model, tok = sharp_model
    one = locate(model, tok, FACTS, SETTINGS, progress=False, batch_facts=1)
    many = locate(model, tok, FACTS, SETTINGS, progress=False)
    assert [c.layer for _, c in one] == [c.layer for _, c in many]
    for (a, _), (b, _) in zip(one, many):
        np.testing.assert_allclose(b.scores, a.scores, atol=1e-6, rtol=0)


def test_skip_errors_skips_one_fact_of_a_batch(sharp_model):
    model, tok = sharp_model
    bad = Fact(prompt="Miles Davis plays the", subject="Dorven", id="bad")
    with pytest.warns(UserWarning, match="skipped fact 'bad'"):
        got = locate(model, tok, [FACTS[1], bad, FACTS[3]], SETTINGS, progress=False, skip_errors=True)
    assert [r.fact_id for r, _ in got] == ["b", "d"]


@pytest.mark.parametrize("value", ["0", "-3"])
def test_batch_facts_flag_below_one_is_an_error(tmp_path, capsys, value):
    code = cli.main(["locate", "--model", str(fact_model_dir("gpt2")), "--facts", str(facts_path("gpt2")),
                     "--out", str(tmp_path / "a.jsonl"), "--device", "cpu", "--samples", "2", "--limit", "2",
                     "--quiet", "--batch-facts", value])
    err = capsys.readouterr().err
    assert code == 2 and "--batch-facts" in err and ">= 1" in err
    assert not (tmp_path / "a.jsonl").exists()


def test_locate_batches_by_fixed_windows_so_reruns_and_resumes_write_the_same_bytes(sharp_model, tmp_path,
                                                                                     monkeypatch):
    from rome_locate import locate as locate_mod

    model, tok = sharp_model
    monkeypatch.setattr(locate_mod, "WINDOW", 2)
    real = locate_mod.trace_each_by_method
    calls: list[list[str]] = []

    def recording(model, tok, facts, settings, **kw):
        calls.append([f.id for f in facts])
        if kill_at is not None and len(calls) == kill_at:
            raise RuntimeError("killed")
        return real(model, tok, facts, settings, **kw)

    monkeypatch.setattr(locate_mod, "trace_each_by_method", recording)
    kill_at = None
    fresh, again, resumed = tmp_path / "fresh.jsonl", tmp_path / "again.jsonl", tmp_path / "resumed.jsonl"
    locate(model, tok, FACTS, SETTINGS, out=fresh, progress=False)
    assert calls == [["a", "b"], ["c", "d"], ["e", "f"]]
    locate(model, tok, FACTS, SETTINGS, out=again, progress=False)
    assert again.read_bytes() == fresh.read_bytes()
    calls.clear()
    kill_at = 2
    with pytest.raises(RuntimeError, match="killed"):
        locate(model, tok, FACTS, SETTINGS, out=resumed, progress=False)
    assert len(resumed.read_text().splitlines()) == 2  # the first window, written before the kill
    kill_at = None
    calls.clear()
    locate(model, tok, FACTS, SETTINGS, out=resumed, progress=False)
    assert calls == [["c", "d"], ["e", "f"]]  # the windows of the fresh run, less what is done
    assert resumed.read_bytes() == fresh.read_bytes()
    assert hook_count(model) == 0


@pytest.mark.parametrize("method", ["exact", "atp"])
def test_clean_rows_in_the_corrupted_forward_or_apart_give_the_same_numbers(sharp_model, monkeypatch, method):
    """The cost model only decides where the clean rows run; the numbers are the same either way."""
    model, tok = sharp_model
    settings = dataclasses.replace(SETTINGS, full=True, method=method, verify_top=2 if method == "atp" else 0)
    outcomes = {}
    for together in (True, False):
        monkeypatch.setattr(runs, "clean_rides_along", lambda *args, together=together: together)
        if method == "atp":
            outcomes[together] = [r.trace for r in attribution_each(model, tok, FACTS, settings)]
        else:
            outcomes[together] = trace_facts(model, tok, FACTS, settings)
    assert any(f.target for f in FACTS)  # some clean rows are longer than their prompt: the padding is exercised
    for a, b in zip(outcomes[True], outcomes[False]):
        _assert_same_trace(a, b)
        assert a.table is not None
    assert hook_count(model) == 0


def test_the_cost_model_runs_small_batches_together_and_large_ones_apart():
    from rome_locate.fact_models import load_fact_model

    model, _ = load_fact_model("gpt2")  # 8 layers, d 64: a forward's fixed part outweighs one fact's padding
    L = model.config.n_layer
    assert costs.clean_rides_along(model, L, 1, 10, 8, 9, gradients=False)
    assert not costs.clean_rides_along(model, L, 64, 640, 8, 10, gradients=False)
    assert costs.clean_rides_along(model, L, 64, 640, 8, 8, gradients=False)  # no padding: one forward
