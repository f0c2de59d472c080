"""Layer choice on hand-built score tables (no model)."""

from __future__ import annotations

import json
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
