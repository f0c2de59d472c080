"""The synthetic world: determinism, shape, names, and exports that load through rome_locate.facts."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from rome_locate.fact_models import world as W
from rome_locate.fact_models.shapes import write_exports
from rome_locate.facts import load_facts


@pytest.fixture(scope="module")
def world():
    return W.build_world(0)


def test_deterministic_from_seed(world):
    again = W.build_world(0)
    assert again.to_json() == world.to_json()
    assert W.known_records(again) == W.known_records(world)
    assert W.counterfact_records(again) == W.counterfact_records(world)
    assert W.corpus_lines(again) == W.corpus_lines(world)
    other = W.build_world(1)
    assert other.subjects != world.subjects
    assert other.objects != world.objects


def test_shape(world):
    assert len(world.subjects) >= 300
    assert len(set(world.subjects)) == len(world.subjects)
    assert len(world.relations) >= 4
    assert len({r.relation_id for r in world.relations}) == len(world.relations)
    for rel in world.relations:
        assert 8 <= len(rel.objects) <= 15
        assert len(rel.train_templates) >= 3
        assert len(rel.heldout_templates) >= 1
        assert not set(rel.train_templates) & set(rel.heldout_templates)
        for t in rel.train_templates + rel.heldout_templates:
            assert t.count("{}") == 1 and not t.endswith(" ")
        objs = world.objects[rel.relation_id]
        assert set(objs) == set(world.subjects)
        assert set(objs.values()) == set(rel.objects)  # every object is used


def test_name_parts_are_shared(world):
    uses = Counter(p for parts in world.name_parts.values() for p in parts)
    for pool in (W.FIRST_A, W.FIRST_B, W.LAST_C, W.LAST_D):
        for part in pool:
            assert uses[part] >= 20, (part, uses[part])
    for s, (a, b, c, d) in world.name_parts.items():
        assert s == f"{a}{b} {c}{d}"


def test_siblings_share_the_first_three_chunks(world):
    # The subject is only identified at its last token: (A, B, C) leaves at least 5 candidates.
    prefixes = Counter(parts[:3] for parts in world.name_parts.values())
    for s, parts in world.name_parts.items():
        assert prefixes[parts[:3]] >= 5, (s, prefixes[parts[:3]])
    assert set(prefixes.values()) == {W.SIBLINGS}
    # Siblings differ in D only, and their objects are drawn independently: most sibling pairs differ.
    by_prefix: dict[tuple[str, str, str], list[str]] = {}
    for s, parts in world.name_parts.items():
        by_prefix.setdefault(parts[:3], []).append(s)
    for group in by_prefix.values():
        assert len({world.name_parts[s][3] for s in group}) == len(group)
    pairs = differ = 0
    for group in by_prefix.values():
        for i, s in enumerate(group):
            for t in group[i + 1 :]:
                for r in world.relations:
                    pairs += 1
                    differ += world.obj(s, r.relation_id) != world.obj(t, r.relation_id)
    assert differ / pairs > 0.8, differ / pairs


def test_first_names_belong_to_one_group(world):
    first = Counter(parts[:2] for parts in world.name_parts.values())
    assert set(first.values()) == {W.SIBLINGS}
    last = Counter(parts[2:] for parts in world.name_parts.values())
    assert max(last.values()) <= 3


@pytest.mark.parametrize("seed", [0, 1])
def test_names_are_four_chunk_tokens_with_a_fresh_tokenizer(seed):
    # The tokenizer `fact_models.train.train` builds from this world's corpus splits every name at its chunks.
    pytest.importorskip("tokenizers")
    from rome_locate.fact_models import FAMILIES
    from rome_locate.fact_models.train import build_tokenizer

    world = W.build_world(seed)
    lines = W.corpus_lines(world)
    for family in FAMILIES:
        tok = build_tokenizer(lines, family)
        last = Counter()
        for s in world.subjects:
            toks = tok.tokenize(s)
            assert [t.lstrip("Ġ") for t in toks] == list(world.name_parts[s]), (family, s, toks)
            last[toks[-1]] += 1
        # No last subject token is a rare sub-word that identifies one subject.
        assert min(last.values()) >= 10, (family, last.most_common()[-3:])


def test_names_are_four_tokens_with_shipped_tokenizer():
    from rome_locate.fact_models import FAMILIES, fact_model_dir

    from transformers import AutoTokenizer

    world = W.build_world(0)
    for family in FAMILIES:
        tok = AutoTokenizer.from_pretrained(fact_model_dir(family))
        for s in world.subjects:
            toks = tok.tokenize(s)
            assert [t.lstrip("Ġ") for t in toks] == list(world.name_parts[s]), (family, s, toks)


def test_bad_subject_count():
    with pytest.raises(ValueError, match="multiple of"):
        W.build_world(0, n_subjects=321)


def test_corpus(world):
    lines = W.corpus_lines(world)
    n_train = sum(len(r.train_templates) for r in world.relations) * len(world.subjects)
    assert len(lines) >= n_train
    text = "\n".join(lines)
    s = world.subjects[0]
    rel = world.relations[0]
    assert f"{rel.train_templates[0].format(s)} {world.obj(s, rel.relation_id)}." in lines
    for r in world.relations:  # held-out paraphrases never appear in training text
        for t in r.heldout_templates:
            assert t.format(s) not in text


def test_exports_load(world, tmp_path):
    paths = write_exports(world, tmp_path)
    known = json.loads(paths["known"].read_text())
    assert len(known) == len(world.subjects) * len(world.relations)
    rec = known[0]
    assert set(rec) >= {"known_id", "subject", "attribute", "template", "prediction", "prompt", "relation_id"}
    assert rec["prediction"] == " " + rec["attribute"]
    assert rec["prompt"] == rec["template"].format(rec["subject"])
    facts = load_facts(paths["known"])
    assert len(facts) == len(known)
    assert facts[0].target == rec["attribute"] and facts[0].subject == rec["subject"]
    assert facts[0].prompt == rec["prompt"]

    cf = json.loads(paths["counterfact"].read_text())
    assert 200 <= len(cf) <= 1000
    cfacts = load_facts(paths["counterfact"])
    assert len(cfacts) == len(cf)
    heldout = {t for r in world.relations for t in r.heldout_templates}
    for rec, fact in zip(cf, cfacts):
        rw = rec["requested_rewrite"]
        rel = world.relation(rw["relation_id"])
        true, new = rw["target_true"]["str"], rw["target_new"]["str"]
        assert true == world.obj(rw["subject"], rel.relation_id)
        assert new != true and new in rel.objects
        assert fact.target == true and fact.target_new == new
        assert fact.prompt == rw["prompt"].format(rw["subject"])
        assert rec["paraphrase_prompts"] and all(
            any(p == t.format(rw["subject"]) for t in heldout) for p in rec["paraphrase_prompts"]
        )
        assert len(rec["neighborhood_prompts"]) >= 3
        for p in rec["neighborhood_prompts"]:  # other subjects, same relation, same true object
            others = [s for s in world.subjects if s in p]
            assert others and rw["subject"] not in others
            assert world.obj(others[0], rel.relation_id) == true
        assert fact.locality_answers == (true,) * len(rec["neighborhood_prompts"])


def test_shipped_exports_match_world():
    from rome_locate.fact_models import FAMILIES, corpus_path, counterfact_path, facts_path

    world = W.build_world(0)
    for family in FAMILIES:
        assert json.loads(facts_path(family).read_text()) == W.known_records(world)
        assert json.loads(counterfact_path(family).read_text()) == W.counterfact_records(world)
        assert corpus_path(family).read_text().splitlines() == W.corpus_lines(world)


def test_world3_is_a_separate_world():
    # The third world shares no name chunk, relation, template or object with the default one.
    default, third = W.build_world(0), W.build_world(W.WORLD3.seed, spec=W.WORLD3)
    assert third.spec == "world3" and default.spec == "default"
    assert not set(third.subjects) & set(default.subjects)
    for pool3, pool0 in zip((W.WORLD3.first_a, W.WORLD3.first_b, W.WORLD3.last_c, W.WORLD3.last_d),
                            (W.FIRST_A, W.FIRST_B, W.LAST_C, W.LAST_D)):
        assert not set(pool3) & set(pool0)
    assert not {r.relation_id for r in third.relations} & {r.relation_id for r in default.relations}
    texts0 = {t for r in default.relations for t in r.train_templates + r.heldout_templates + r.objects}
    texts3 = {t for r in third.relations for t in r.train_templates + r.heldout_templates + r.objects}
    assert not texts0 & texts3
    assert W.corpus_lines(third)[-1] == W.WORLD3.filler[-1]
    assert json.loads(json.dumps(third.to_json()))["spec"] == "world3"
    with pytest.raises(ValueError, match="world must be one of"):
        W.world_spec("nowhere")


def test_world3_names_tokenize_into_four_chunks():
    # The tokenizer of fact_models.train, trained on the third world's corpus, keeps every name at 4 tokens.
    from rome_locate.fact_models.train import build_tokenizer

    third = W.build_world(W.WORLD3.seed, spec=W.WORLD3)
    tok = build_tokenizer(W.corpus_lines(third), "gpt2", W.WORLD3.relations)
    assert all(len(tok(" " + s)["input_ids"]) == 4 for s in third.subjects)
    assert all(len(tok(" " + o)["input_ids"]) == 1 for r in third.relations for o in r.objects)


def test_easyedit_export_is_counterfact_with_portability():
    # The demo's facts: the same cases as counterfact.json, so the CounterFact figures do not move, plus portability.
    from rome_locate.fact_models import FAMILIES, counterfact_path, easyedit_path
    from rome_locate.fact_models.shapes import easyedit_records

    world = W.build_world(0)
    for family in FAMILIES:
        assert json.loads(easyedit_path(family).read_text()) == easyedit_records(world)
    for cf, ee in zip(load_facts(counterfact_path("gpt2")), load_facts(easyedit_path("gpt2"))):
        assert (ee.prompt, ee.subject, ee.target, ee.target_new, ee.rephrase_prompts, ee.locality, ee.id) == (
            cf.prompt, cf.subject, cf.target, cf.target_new, cf.rephrase_prompts, cf.locality, cf.id)
        assert ee.keys("portability") == ("other_phrasing", "hard_paraphrase")
        assert all(p.answer == cf.target_new and cf.subject in p.prompt for p in ee.portability)
        assert len([p for p in ee.portability if p.key == "other_phrasing"]) == 2
