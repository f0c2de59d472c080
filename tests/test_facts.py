"""Facts: every supported input format reads into the same Fact, and bad input is named."""

import json

import pytest

from rome_locate.facts import Fact, FactFormatError, fact_from_record, load_facts, save_jsonl

KNOWN = {"known_id": 7, "subject": "The Space Needle", "attribute": "Seattle",
         "template": "{} is in the city of", "prediction": " Seattle",
         "prompt": "The Space Needle is in the city of", "relation_id": "P131"}
COUNTERFACT = {
    "case_id": 3,
    "requested_rewrite": {"prompt": "{} is in the city of", "relation_id": "P131", "subject": "The Space Needle",
                          "target_new": {"str": "Paris", "id": "Q90"}, "target_true": {"str": "Seattle", "id": "Q5083"}},
    "paraphrase_prompts": ["Where is The Space Needle? In the city of"],
    "neighborhood_prompts": ["Pike Place Market is in the city of", "Lumen Field is in the city of"],
}
EASYEDIT = {"prompt": "The Space Needle is in the city of", "subject": "The Space Needle", "target_new": "Paris",
            "ground_truth": "Seattle", "rephrase_prompt": "Where is The Space Needle? In the city of",
            "locality_prompt": "Pike Place Market is in the city of", "locality_ground_truth": "Seattle"}


def test_known_1000_record():
    fact = fact_from_record(KNOWN)
    assert (fact.prompt, fact.subject, fact.target, fact.id, fact.relation_id) == (
        "The Space Needle is in the city of", "The Space Needle", "Seattle", "7", "P131")
    assert fact.target_new is None


def test_counterfact_record_fills_template_and_neighbours():
    fact = fact_from_record(COUNTERFACT)
    assert fact.prompt == "The Space Needle is in the city of"
    assert (fact.target, fact.target_new, fact.id) == ("Seattle", "Paris", "3")
    assert fact.rephrase_prompts == ("Where is The Space Needle? In the city of",)
    assert len(fact.locality_prompts) == 2 and fact.locality_answers == ("Seattle", "Seattle")


def test_easyedit_record_and_nested_locality():
    fact = fact_from_record(EASYEDIT)
    assert (fact.target, fact.target_new) == ("Seattle", "Paris")
    assert fact.rephrase_prompts == ("Where is The Space Needle? In the city of",)
    assert fact.locality_prompts == ("Pike Place Market is in the city of",)
    nested = dict(EASYEDIT, locality={"neighborhood": {"prompt": ["A is in", "B is in"], "ground_truth": ["X", "Y"]}})
    del nested["locality_prompt"], nested["locality_ground_truth"]
    fact = fact_from_record(nested)
    assert fact.locality_prompts == ("A is in", "B is in") and fact.locality_answers == ("X", "Y")


def test_own_json_round_trips_with_every_field():
    fact = fact_from_record(COUNTERFACT)
    again = fact_from_record(json.loads(json.dumps(fact.to_json())))
    assert again == fact


def test_counterfact_prompt_without_placeholder_is_named():
    bad = json.loads(json.dumps(COUNTERFACT))
    bad["requested_rewrite"]["prompt"] = "The Space Needle is in"
    with pytest.raises(FactFormatError, match="has no '\\{\\}'"):
        fact_from_record(bad)


def test_unknown_record_lists_its_keys():
    with pytest.raises(FactFormatError, match=r"record 4: .*keys were \['foo'\]"):
        fact_from_record({"foo": 1}, 4)


def test_load_json_array_jsonl_and_limit(tmp_path):
    arr = tmp_path / "facts.json"
    arr.write_text(json.dumps([KNOWN, COUNTERFACT, EASYEDIT]))
    facts = load_facts(arr)
    assert [f.subject for f in facts] == ["The Space Needle"] * 3
    lines = tmp_path / "facts.jsonl"
    save_jsonl(facts, lines)
    assert load_facts(lines) == facts
    assert len(load_facts(lines, limit=2)) == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_facts(tmp_path / "nope.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"\n')
    with pytest.raises(FactFormatError, match="bad.jsonl"):
        load_facts(bad)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(FactFormatError, match="no facts"):
        load_facts(empty)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([KNOWN, {"bar": 2}]))
    with pytest.raises(FactFormatError, match=r"wrong.json: record 1"):
        load_facts(wrong)


def test_fact_is_frozen():
    with pytest.raises(AttributeError):
        Fact(prompt="p", subject="s").prompt = "q"
