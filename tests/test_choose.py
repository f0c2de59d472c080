"""Layer choice on hand-built score tables (no model)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest

from rome_locate.choose import DatasetChoice, LayerChoice, choose_dataset_layer, choose_layer
from rome_locate.trace import TraceResult


@dataclass(frozen=True)
class Scores:
    fact_id: str
    low_score: float
    scores: tuple[float, ...]
    kind: str = "mlp"
    effects = TraceResult.effects  # the one definition of the indirect effect


def test_choose_layer_picks_argmax_with_runner_up_and_margin():
    c = choose_layer(Scores("a", 0.1, (0.12, 0.30, 0.55, 0.41, 0.2)))
    assert c == LayerChoice(fact_id="a", layer=2, kind="mlp", effect=pytest.approx(0.45),
                            runner_up=3, margin=pytest.approx(0.14))


def test_choose_layer_uses_effects_not_raw_low_score():
    # Negative effects everywhere: the least harmful restoration still wins.
    c = choose_layer(Scores("b", 0.5, (0.2, 0.45, 0.3)))
    assert (c.layer, c.runner_up) == (1, 2)
    assert c.effect == pytest.approx(-0.05)
    assert c.margin == pytest.approx(0.15)


def test_ties_go_to_the_lowest_layer():
    c = choose_layer(Scores("t", 0.0, (0.1, 0.3, 0.3, 0.3)))
    assert (c.layer, c.runner_up, c.margin) == (1, 2, 0.0)


def test_one_layer_has_no_runner_up():
    c = choose_layer(Scores("s", 0.2, (0.7,)))
    assert (c.layer, c.runner_up, c.margin) == (0, None, 0.0)


def test_empty_scores_is_an_error():
    with pytest.raises(ValueError, match="'e'"):
        choose_layer(Scores("e", 0.0, ()))


def test_dataset_layer_is_highest_mean_effect_with_histogram():
    results = [
        Scores("1", 0.1, (0.1, 0.2, 0.9, 0.1)),  # choice 2
        Scores("2", 0.0, (0.0, 0.5, 0.4, 0.0)),  # choice 1
        Scores("3", 0.2, (0.2, 0.6, 0.5, 0.3)),  # choice 1
    ]
    d = choose_dataset_layer(results)
    assert d.mean_effects == pytest.approx((0.0, 0.3333333, 0.5, 0.0333333), abs=1e-6)
    # Most facts pick layer 1, but the mean effect peaks at layer 2: the dataset rule is the mean.
    assert d.layer == 2
    assert d.histogram == (0, 2, 1, 0)
    assert d.n_facts == 3 and d.kind == "mlp"


def test_dataset_rejects_mixed_inputs():
    with pytest.raises(ValueError, match="kinds"):
        choose_dataset_layer([Scores("1", 0, (1, 2)), Scores("2", 0, (1, 2), kind="attn")])
    with pytest.raises(ValueError, match="numbers of layers"):
        choose_dataset_layer([Scores("1", 0, (1, 2)), Scores("2", 0, (1, 2, 3))])
    with pytest.raises(ValueError, match="no traced facts"):
        choose_dataset_layer([])


def test_json_round_trips():
    c = choose_layer(Scores("a", 0.1, (0.2, 0.3)))
    assert LayerChoice.from_json(json.loads(json.dumps(c.to_json()))) == c
    d = choose_dataset_layer([Scores("a", 0.1, (0.2, 0.3))])
    assert DatasetChoice.from_json(json.loads(json.dumps(d.to_json()))) == d
    # A locate line carries both records; each reads its own fields.
    line = {**c.to_json(), "prompt": "p", "scores": [0.2, 0.3]}
    assert LayerChoice.from_json(line) == c


# ---- the layer rule: one decision at every entrance --------------------------------------------------------

from rome_locate.choose import LayerDecision, LayerRule, editable_layers, layer_rule, place  # noqa: E402


def test_traced_rule_picks_best_candidate_with_margin_and_reason():
    rule = LayerRule("traced", 1, (0, 1, 2), 0.05, "test")
    d = rule.decide([0.1, 0.2, 0.4, 0.9])  # layer 3 is not a candidate: never chosen, however large
    assert (d.layer, d.source, d.best) == (2, "traced", 2)
    assert d.margin == pytest.approx(0.2)
    assert "largest effect" in d.reason


def test_traced_rule_falls_back_below_threshold_and_without_positive_effect():
    rule = LayerRule("traced", 1, (0, 1, 2), 0.05, "test")
    small = rule.decide([0.1, 0.2, 0.23, 0.0])
    assert (small.layer, small.source, small.best) == (1, "fallback", 2) and "below the threshold" in small.reason
    # Negative everywhere (the example): the least harmful restoration is no reason to move the edit.
    negative = rule.decide([-0.24, -0.24, -0.18, -0.04])
    assert (negative.layer, negative.source) == (1, "fallback") and "positive" in negative.reason
    # The threshold is the boundary: a margin equal to it is traced.
    exact = LayerRule("traced", 1, (0, 1, 2), 0.25, "test")
    assert exact.decide([0.0, 0.25, 0.5, 0.0]).source == "traced"


def test_infinite_threshold_sends_every_fact_to_the_fallback():
    rule = LayerRule("traced", 2, (1, 2, 3), math.inf, "validated, threshold null")
    assert all(rule.decide(e).layer == 2 for e in ([0.0, 0.9, 0.1, 0.2], [0.0, 0.0, 0.1, 0.8]))


def test_fixed_and_validated_modes():
    fixed = LayerRule("fixed", 3, (0, 1, 2), 0.0, "test")
    assert fixed.decide(None) == LayerDecision(3, "fixed", "the hyperparameters' layer")
    rule = LayerRule("validated", 1, (0, 1, 2, 3), 0.0, "test")
    assert rule.tries([0.0, 0.1, 0.5, 0.3]) == [1, 2]  # the fallback always, then the best other candidate

    @dataclass(frozen=True)
    class S:
        efficacy: float
        neighborhood: float
        efficacy_magnitude: float

    assert rule.pick({1: S(1.0, 0.5, 0.2), 2: S(1.0, 1.0, 0.1)}).layer == 2
    assert rule.pick({1: S(1.0, 1.0, 0.1), 2: S(1.0, 1.0, 0.1)}).layer == 1  # a tie goes to the fallback
    with pytest.raises(ValueError, match="trial edits"):
        rule.decide([0.0] * 4)


def test_layer_rule_reads_the_validation_record_or_uses_the_defaults(tmp_path):
    yaml_path = tmp_path / "m.yaml"
    default = layer_rule("traced", 2, 8, yaml_path)
    assert default.candidates == editable_layers(8) == tuple(range(7)) and default.threshold == 0.0
    assert "no m.validation.json" in default.source
    (tmp_path / "m.validation.json").write_text(json.dumps({"candidates": [1, 2, 3], "threshold": None}))
    rule = layer_rule("traced", 2, 8, yaml_path)
    assert (rule.candidates, rule.threshold, rule.fallback) == ((1, 2, 3), math.inf, 2)
    assert LayerRule.from_json(json.loads(json.dumps(rule.to_json()))) == rule
    (tmp_path / "m.validation.json").write_text(json.dumps({"candidates": [1, 9], "threshold": 0.1}))
    with pytest.raises(ValueError, match="9 out of range"):
        layer_rule("traced", 2, 8, yaml_path)
    with pytest.raises(ValueError, match="layers must be one of"):
        LayerRule("argmax", 2, (1,), 0.0, "x")


def test_place_applies_the_rule_and_keeps_given_layers():
    @dataclass(frozen=True)
    class T:
        fact_id: str
        effects: tuple

    @dataclass(frozen=True)
    class F:
        id: str

    facts = [F("a"), F("b"), F("c")]
    rule = LayerRule("traced", 1, (0, 1, 2), 0.0, "test")
    located = [(T("a", (0.0, 0.1, 0.3, 0.9)), None), (T("b", (-0.1, -0.1, -0.2, 0.5)), None), 3]
    ps = place(facts, rule, located)
    assert [(p.layer, p.source) for p in ps] == [(2, "traced"), (1, "fallback"), (3, "given")]
    assert ps[0].traced.layer == 2 and ps[1].traced.best == 0
    fixed = place(facts, LayerRule("fixed", 1, (0, 1, 2), 0.0, "test"), located)
    assert [p.source for p in fixed[:2]] == ["fixed", "fixed"] and fixed[0].traced.layer == 2
    with pytest.raises(ValueError, match="choice 0 is for fact 'b' but fact 0 is 'a'"):
        place(facts, rule, [located[1], located[0], 3])
    bare = [LayerChoice("a", 2, "mlp", 0.1, 1, 0.05)]
    with pytest.raises(ValueError, match="carries no trace"):
        place(facts[:1], rule, bare)
    assert place(facts[:1], LayerRule("fixed", 1, (0, 1, 2), 0.0, "test"), bare)[0].layer == 1
