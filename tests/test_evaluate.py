"""Evaluation harness: metric arithmetic on hand-made cases, generations, bit-identical restore, partial failures."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch

from conftest import build_tiny_model, params_hash
from rome_locate.choose import LayerRule, place
from rome_locate.evaluate import evaluate, evaluate_fact, generate
from rome_locate.metrics import (harmonic_mean, kl_divergence, mean_margin, ngram_entropy, rewrite_score, spearman,
                                 success_rate)
from rome_locate.outcome import EvalRecord, EvaluationError, GenerationSettings
from rome_locate.summary import summarize
from rome_locate.facts import Fact, neighbours
from rome_locate.scoring import score_targets, token_accuracy, top1_agreement


@dataclass(frozen=True)
class FakeHParams:
    """Stands in for ROME hyperparameters: the harness only reads and replaces `layers`."""

    layers: list = field(default_factory=lambda: [1])


class ContextEditor:
    """A test double of an editor (`rome_locate.editors`): its `edited` is the given context function."""

    def __init__(self, context, name="double"):
        self.context, self.name = context, name

    def edited(self, model, tok, fact, hparams):
        return self.context(model, tok, fact, hparams)


def fixed_placements(facts, layer):
    """Every fact at `layer`, as the fixed rule places it."""
    return place(facts, LayerRule("fixed", layer, (layer,), 0.0, "test"))


@contextmanager
def bias_edit(model, tok, fact, hparams, editor="builtin"):
    """A test double of `edit.edited`: pushes block `layers[0]`'s MLP bias towards target_new, then restores."""
    layer = hparams.layers[0]
    bias = model.transformer.h[layer].mlp.c_proj.bias
    saved = bias.detach().clone()
    new_id = tok(" " + fact.target_new)["input_ids"][0]
    with torch.no_grad():
        bias += (layer + 1) * 3.0 * model.lm_head.weight[new_id]
    try:
        yield
    finally:
        with torch.no_grad():
            bias.copy_(saved)


def noop_edit(model, tok, fact, hparams, editor="builtin"):
    """An edit that changes nothing."""
    @contextmanager
    def ctx():
        yield
    return ctx()


FACT = Fact(prompt="Dorven Kaltmoor was born in the city of", subject="Dorven Kaltmoor", target="Seattle",
            target_new="Paris", rephrase_prompts=("Alma Berridge speaks the language of Dorven Kaltmoor, born in",),
            locality=neighbours(("The Eiffel Tower is in", "Miles Davis plays the"), ("Paris", "trumpet")),
            relation_id="P19", id="f0")


@pytest.fixture(scope="module")
def gpt2(tiny_tokenizer):
    """A tiny 4-layer GPT-2 and its tokenizer, shared by this module's tests."""
    return build_tiny_model("gpt2", len(tiny_tokenizer), n_layers=4), tiny_tokenizer


# ---- hand-made probability cases --------------------------------------------------


def test_efficacy_true_and_false():
    # P(new)=0.5 vs P(true)=0.2 per token: success; reversed: failure.
    nll_new, nll_true = -math.log(0.5), -math.log(0.2)
    assert success_rate([nll_new], [nll_true]) == 1.0
    assert success_rate([nll_true], [nll_new]) == 0.0
    assert success_rate([nll_new, nll_true], [nll_true, nll_new]) == 0.5
    assert mean_margin([0.5], [0.2]) == pytest.approx(0.3)
    assert success_rate([], []) is None


def test_token_accuracy_and_locality():
    assert token_accuracy([(5, 7, 9)], [(5, 8, 9)]) == pytest.approx(2 / 3)
    assert token_accuracy([(1,), (2, 3)], [(1,), (0, 3)]) == pytest.approx((1.0 + 0.5) / 2)
    assert top1_agreement([(4, 4), (1,)], [(4, 4), (1,)]) == 1.0
    assert top1_agreement([(4, 4), (1,)], [(4, 3), (2,)]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="does not match"):
        token_accuracy([(1, 2)], [(1,)])


def test_kl_and_rewrite_and_harmonic():
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.25, 0.75]]))
    assert kl_divergence(p, p) == 0.0
    assert kl_divergence(p, q) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    assert rewrite_score(0.2, 0.6) == pytest.approx(0.5)
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([1.0, 0.0, None]) == 0.0


def test_ngram_entropy_of_known_strings():
    # "a b a b": 2-grams ab, ba, ab -> H2 = H(2/3, 1/3); 3-grams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # A repeated word has one 2-gram and one 3-gram: zero entropy.
    assert ngram_entropy("the the the the the") == 0.0
    assert ngram_entropy("one") == 0.0


def test_spearman_known_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = (0, 0, -1, 1) -> rho = 1 - 6*2/(4*15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)
    # Monotone transform invariance and ties (average ranks, Pearson on ranks).
    assert spearman([0.1, 5.0, 2.0], [1, 100, 3]) == pytest.approx(1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, rel=1e-6)
    assert spearman([1, 1], [1, 2]) is None
    assert spearman([1], [1]) is None


# ---- on a tiny model ---------------------------------------------------------------


def test_score_targets_matches_direct_logprob(gpt2):
    model, tok = gpt2
    [s] = score_targets(model, tok, [(FACT.prompt, FACT.target)])
    p_ids = tok(FACT.prompt)["input_ids"]
    ids = tok(FACT.prompt + " " + FACT.target)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    direct = -sum(float(logp[i - 1, ids[i]]) for i in range(len(p_ids), len(ids))) / (len(ids) - len(p_ids))
    assert s.target_ids == tuple(ids[len(p_ids):])
    assert s.nll == pytest.approx(direct, abs=1e-5)
    # Batched with a longer prompt (right padding) gives the same number.
    both = score_targets(model, tok, [(FACT.locality_prompts[0] + " and more words here", "x"), (FACT.prompt, FACT.target)])
    assert both[1].nll == pytest.approx(s.nll, abs=1e-5)


def test_noop_edit_changes_nothing(tiny_model):
    model, tok = tiny_model
    rec = evaluate_fact(model, tok, FACT, FakeHParams(), editor=ContextEditor(noop_edit))
    m = rec.metrics
    assert m["locality"] == 1.0
    assert m["neighborhood_kl"] == pytest.approx(0.0, abs=1e-9)
    assert m["efficacy_score"] == m["efficacy_score_pre"]
    assert m["rewrite_acc"] == m["rewrite_acc_pre"]
    assert all(g.before == g.after for g in rec.generations)
    assert [g.group for g in rec.generations] == ["edit", "paraphrase", "neighborhood", "neighborhood"]


def test_bias_edit_succeeds_and_restores_bit_identically(gpt2):
    model, tok = gpt2
    before = params_hash(model)
    rng_before = torch.random.get_rng_state()
    calls = []

    def counting_edit(model, tok, fact, hparams, editor="builtin"):
        calls.append(hparams.layers[0])
        return bias_edit(model, tok, fact, hparams, editor)

    rec = evaluate_fact(model, tok, FACT, FakeHParams(layers=[3]), editor=ContextEditor(counting_edit), sweep=True,
                        generation=GenerationSettings(mode="sample", seed=3, top_k=20))
    # The main edit at layer 3 doubles as the sweep's layer-3 step.
    assert calls == [3, 0, 1, 2]
    assert params_hash(model) == before
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    m = rec.metrics
    assert m["efficacy_score"] == 1.0 and m["efficacy_score_pre"] == 0.0
    assert m["efficacy_magnitude"] > 0 > m["efficacy_magnitude_pre"]
    assert m["rewrite_acc"] > m["rewrite_acc_pre"]
    assert m["locality"] < 1.0 and m["neighborhood_kl"] > 0
    assert rec.layer == 3 and rec.layer_source == "fixed" and rec.fixed_layer == 3
    assert [s.layer for s in rec.sweep] == [0, 1, 2, 3]
    # The double's push grows with the layer, so the deepest edit gains most.
    gains = [s.rewrite_score for s in rec.sweep]
    assert gains == sorted(gains)
    assert rec.sweep[3].efficacy_magnitude == pytest.approx(m["efficacy_magnitude"], abs=1e-6)
    assert EvalRecord.from_json(rec.to_json()) == rec


def test_generation_modes_are_seeded_and_differ(gpt2):
    model, tok = gpt2
    prompts = [FACT.prompt]
    greedy = generate(model, tok, prompts, GenerationSettings(max_new_tokens=6))
    assert greedy == generate(model, tok, prompts, GenerationSettings(max_new_tokens=6))
    s1 = generate(model, tok, prompts, GenerationSettings(mode="sample", seed=1, max_new_tokens=10))
    assert s1 == generate(model, tok, prompts, GenerationSettings(mode="sample", seed=1, max_new_tokens=10))
    samples = {generate(model, tok, prompts, GenerationSettings(mode="sample", seed=s, max_new_tokens=10))[0]
               for s in range(4)}
    assert len(samples) > 1
    beam = generate(model, tok, prompts, GenerationSettings(mode="beam", num_beams=3, max_new_tokens=6))
    assert isinstance(beam[0], str) and len(tok(beam[0])["input_ids"]) <= 6
    with pytest.raises(ValueError, match="generation mode"):
        GenerationSettings(mode="nucleus")


def failing_on(n: int):
    """An editor that works like `bias_edit` but raises on the n-th fact it edits."""
    seen: list[str] = []

    def edit(model, tok, fact, hparams, editor="builtin"):
        if fact.id not in seen:
            seen.append(fact.id)
        if len(seen) == n:
            raise RuntimeError(f"editor broke on {fact.id}")
        return bias_edit(model, tok, fact, hparams, editor)
    return edit


def test_failure_keeps_finished_records_and_weights(gpt2):
    model, tok = gpt2
    before = params_hash(model)
    facts = [Fact(**{**FACT.to_json(), "id": f"f{i}", "rephrase_prompts": (), "locality": ()}) for i in range(4)]
    seen_partial: list[int] = []
    with pytest.raises(EvaluationError, match="'f2' after 2 finished") as info:
        evaluate(model, tok, facts, FakeHParams(), fixed_placements(facts, 1), editor=ContextEditor(failing_on(3)),
                 progress=False,
                 on_record=lambda recs: seen_partial.append(len(recs)))
    assert [r.fact_id for r in info.value.records] == ["f0", "f1"]
    assert seen_partial == [1, 2]
    assert "editor broke on f2" in str(info.value)
    assert params_hash(model) == before


def test_summary_strategies_and_correlation(gpt2):
    model, tok = gpt2

    @dataclass
    class Choice:
        fact_id: str
        layer: int
        margin: float

    @dataclass
    class Trace:
        scores: tuple
        low_score: float

        @property
        def effects(self):
            return tuple(s - self.low_score for s in self.scores)

    facts = [Fact(**{**FACT.to_json(), "id": f"f{i}"}) for i in range(2)]
    # Trace effects rise with the layer, like the double's push: rank correlation 1 per fact.
    located = [(Trace(scores=(0.1, 0.2, 0.3, 0.4), low_score=0.05), Choice(f.id, 2, 0.1)) for f in facts]
    rule = LayerRule("traced", 0, (0, 1, 2), 0.0, "test: every layer but the last")
    recs = evaluate(model, tok, facts, FakeHParams(layers=[0]), place(facts, rule, located), sweep=True,
                    editor=ContextEditor(bias_edit), progress=False)
    assert [r.layer for r in recs] == [2, 2] and recs[0].layer_source == "traced"
    assert recs[0].traced_layer == 2 and recs[0].fixed_layer == 0 and "largest effect" in recs[0].layer_reason
    assert recs[0].effects == pytest.approx((0.05, 0.15, 0.25, 0.35))
    s = summarize(recs)
    assert set(s["strategies"]) == {"traced", "fixed", "sweep best"}
    assert s["spearman_pooled"] == pytest.approx(1.0)
    assert s["spearman_per_fact"] == {"f0": pytest.approx(1.0), "f1": pytest.approx(1.0)}
    assert s["strategies"]["sweep best"]["rewrite_score"] >= s["strategies"]["traced"]["rewrite_score"]
    assert s["means"]["efficacy_score"] == pytest.approx(_mean_of(recs, "efficacy_score"))
    for row in s["strategies"].values():  # every mean with its 95% interval around it
        low, high = row["intervals"]["score"]
        assert low <= row["score"] <= high
    assert s["verdict"].startswith("best layer choice by ROME score: ")
    low, high = s["success_rate_interval"]
    assert low <= s["success_rate"] <= high
    with pytest.raises(ValueError, match="needs the facts' traces"):
        place(facts, rule)



def test_validated_records_and_summary_say_validated(gpt2):
    # --layers validated: the records, the summary's strategies and the report name the validated picks as such.
    from types import SimpleNamespace

    from rome_locate.choose import LayerDecision
    from rome_locate.report import print_summary

    model, tok = gpt2
    facts = [Fact(**{**FACT.to_json(), "id": f"f{i}"}) for i in range(2)]
    located = [(SimpleNamespace(effects=(0.1, 0.2, 0.3, 0.4)), SimpleNamespace(fact_id=f.id, layer=2, margin=0.1))
               for f in facts]
    hp = FakeHParams(layers=[0])
    picks = [LayerDecision(l, "validated", "trial edits") for l in (1, 3)]
    placements = place(facts, LayerRule("validated", 0, (0, 1, 2), 0.0, "test"), located, picks=picks)
    recs = evaluate(model, tok, facts, hp, placements, sweep=True, editor=ContextEditor(bias_edit), progress=False)
    assert [(r.layer, r.layer_source) for r in recs] == [(1, "validated"), (3, "validated")]
    s = summarize(recs)
    assert list(s["strategies"]) == ["validated", "traced", "fixed", "sweep best"]
    sweep_at = [next(x for x in r.sweep if x.layer == r.layer) for r in recs]
    assert s["strategies"]["validated"]["rewrite_score"] == pytest.approx(
        sum(x.rewrite_score for x in sweep_at) / 2)
    print_summary(recs)


def _mean_of(recs, key):
    return sum(r.metrics[key] for r in recs) / len(recs)


def test_builtin_rome_editor_restores_bit_identically(gpt2):
    from rome_locate.hparams import generate_hparams

    model, tok = gpt2
    before = params_hash(model)
    hp = generate_hparams(model, None, 1, model_name="tiny-gpt2", v_num_grad_steps=5,
                          context_template_length_params=[[5, 5]])
    rec = evaluate_fact(model, tok, FACT, hp, sweep=[0, 2], generation=GenerationSettings(max_new_tokens=5))
    assert params_hash(model) == before
    # A random model barely moves (ROME clamps the change to its tiny norms), but the edit is real and undone.
    assert rec.metrics["p_new"] != rec.metrics["p_new_pre"]
    assert rec.metrics["neighborhood_kl"] > 0
    assert [s.layer for s in rec.sweep] == [0, 2]
    assert all(s.rewrite_score != 0 for s in rec.sweep)
