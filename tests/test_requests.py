"""Counterfactual requests built from known facts: target from another subject, neighbours, paraphrases."""

from __future__ import annotations

import pytest

from rome_locate.facts import Fact
from rome_locate.requests import counterfactual_requests, needs_requests, template_of


def _known(subject, answer, template="{} was born in", rel="P19", i=0):
    return Fact(prompt=template.format(subject), subject=subject, target=answer, relation_id=rel, id=str(i))


FACTS = [
    _known("Ann Bo", "Paris", i=0), _known("Cid Do", "Paris", i=1), _known("Eve Fu", "Rome", i=2),
    _known("Gus Ho", "Paris", "The birthplace of {} is", i=3), _known("Ivy Jo", "French", "{} speaks", "P103", 4),
    _known("Kai Lu", "German", "{} speaks", "P103", 5),
]


def test_requests_from_known_facts():
    assert needs_requests(FACTS)
    reqs = counterfactual_requests(FACTS, seed=0)
    assert [r.id for r in reqs] == [f.id for f in FACTS] and not needs_requests(reqs)
    ann = reqs[0]
    assert ann.target == "Paris" and ann.target_new == "Rome"  # the only other answer of P19
    # Neighbours: other subjects, same relation and answer; their expected answer is Ann's.
    assert set(ann.locality_prompts) == {"Cid Do was born in", "The birthplace of Gus Ho is"}
    assert ann.locality_answers == ("Paris", "Paris")
    # Paraphrases: Ann in the relation's other template.
    assert ann.rephrase_prompts == ("The birthplace of Ann Bo is",)
    ivy = reqs[4]
    assert ivy.target_new == "German" and ivy.rephrase_prompts == () and ivy.locality_prompts == ()
    assert counterfactual_requests(FACTS, seed=0) == reqs  # seeded


def test_requests_keep_given_targets_and_name_bad_facts():
    given = Fact(prompt="X Y plays", subject="X Y", target="piano", target_new="harp", id="g")
    assert counterfactual_requests([given]) == [given]
    with pytest.raises(ValueError, match="another answer"):
        counterfactual_requests([_known("Ann Bo", "Paris"), _known("Cid Do", "Paris", i=1)])
    with pytest.raises(ValueError, match="neither target_new nor"):
        counterfactual_requests([Fact(prompt="A B plays", subject="A B", id="n")])
    assert template_of(FACTS[3]) == "The birthplace of {} is"
