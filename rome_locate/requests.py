"""Counterfactual edit requests built from known facts alone (known_1000-style facts have no target_new).

For a fact `(subject, relation, answer)` the request is built from the other
facts of the same relation:
- `target_new`: the answer of another subject for the same relation (seeded
  choice among the relation's answers other than this fact's);
- neighbourhood prompts: the prompts of other subjects with the same relation
  and the same answer (their expected answer is this fact's answer, as in
  CounterFact);
- paraphrases: this subject in the relation's other templates, when the facts
  use more than one template for the relation (otherwise none).

The relation is `relation_id` when given, else the prompt's template (the
prompt with the subject replaced by `{}`). No torch import: plain Python.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Sequence

from .facts import Fact, neighbours

N_NEIGHBOURS = 5


def template_of(fact: Fact) -> str:
    """The fact's prompt with its (first) subject occurrence replaced by `{}`."""
    if fact.subject not in fact.prompt:
        raise ValueError(f"fact {fact.id!r}: subject {fact.subject!r} is not in prompt {fact.prompt!r}")
    return fact.prompt.replace(fact.subject, "{}", 1)


def _relation(fact: Fact) -> str:
    return fact.relation_id or template_of(fact)


def needs_requests(facts: Sequence[Fact]) -> bool:
    """True when some fact has no target_new (so requests must be built to edit them)."""
    return any(not f.target_new for f in facts)


def counterfactual_requests(facts: Sequence[Fact], seed: int = 0,
                            n_neighbours: int = N_NEIGHBOURS) -> list[Fact]:
    """Facts with target_new, paraphrases and neighbourhood prompts built from the facts themselves.

    Facts that already have a target_new are returned unchanged. A fact without
    a target (`target`), or whose relation has no other answer, cannot become a
    request and raises ValueError naming it.
    """
    rng = random.Random(seed)
    by_rel: dict[str, list[Fact]] = {}
    for f in facts:
        by_rel.setdefault(_relation(f), []).append(f)
    out = []
    for f in facts:
        if f.target_new:
            out.append(f)
            continue
        if not f.target:
            raise ValueError(f"fact {f.id!r} ({f.prompt!r}) has neither target_new nor a known answer (target)")
        group = by_rel[_relation(f)]
        answers = sorted({g.target for g in group if g.target and g.target != f.target})
        if not answers:
            raise ValueError(f"fact {f.id!r}: no other subject of relation {_relation(f)!r} has another answer "
                             f"to use as target_new")
        same = [g for g in group if g.subject != f.subject and g.target == f.target]
        nb = rng.sample(same, min(n_neighbours, len(same)))
        own = template_of(f)
        templates = sorted({template_of(g) for g in group} - {own})
        out.append(replace(
            f,
            target_new=rng.choice(answers),
            rephrase_prompts=f.rephrase_prompts or tuple(t.format(f.subject) for t in templates),
            locality=f.locality or neighbours([g.prompt for g in nb], [f.target] * len(nb)),
        ))
    return out
