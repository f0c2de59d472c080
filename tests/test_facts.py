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


# Issue 21 (15): a wrong JSON type is named where it is read, not met later as a traceback from the tokenizer.
WRONG_TYPES = [
    ({"prompt": 123, "subject": "x", "id": "a"}, "prompt", "number 123"),
    ({"prompt": "x is", "subject": ["x"], "id": "a"}, "subject", "array"),
    ({"prompt": "x is", "subject": None, "id": "a"}, "subject", "null"),
    ({"prompt": "x is", "subject": "x", "target": 5, "id": "a"}, "target", "number 5"),
    ({"prompt": "x is", "subject": "x", "target": float("nan"), "id": "a"}, "target", "NaN"),
    ({"prompt": "x is", "subject": "x", "locality_prompts": 5, "id": "a"}, "locality_prompts", "number 5"),
    ({"prompt": "x is", "subject": "x", "rephrase_prompts": ["x's", 7], "id": "a"}, r"rephrase_prompts\[1\]",
     "number 7"),
    ({**EASYEDIT, "prompt": 123, "case_id": "a"}, "prompt", "number 123"),
    ({**EASYEDIT, "target_new": 5, "case_id": "a"}, "target_new", "number 5"),
    ({**EASYEDIT, "ground_truth": {"str": 5}, "case_id": "a"}, r"ground_truth\.str", "number 5"),
    ({**EASYEDIT, "locality_prompt": [None], "case_id": "a"}, r"locality_prompt\[0\]", "null"),
    ({**KNOWN, "subject": 5, "known_id": "a"}, "subject", "number 5"),
    ({**KNOWN, "attribute": ["Seattle"], "known_id": "a"}, "attribute", "array"),
    ({**COUNTERFACT, "case_id": "a", "requested_rewrite": {**COUNTERFACT["requested_rewrite"], "prompt": 5}},
     r"requested_rewrite\.prompt", "number 5"),
    ({**COUNTERFACT, "case_id": "a",
      "requested_rewrite": {**COUNTERFACT["requested_rewrite"], "target_new": {"str": float("nan")}}},
     r"requested_rewrite\.target_new\.str", "NaN"),
    ({**COUNTERFACT, "case_id": "a", "requested_rewrite": "rewrite"}, "requested_rewrite", "string"),
]


@pytest.mark.parametrize("rec, field, found", WRONG_TYPES, ids=[f"{i}-{c[1]}" for i, c in enumerate(WRONG_TYPES)])
def test_wrong_json_type_names_the_fact_the_field_and_the_type(rec, field, found):
    with pytest.raises(FactFormatError, match=rf"^record 4 \(id 'a'\): {field} must be .*, got {found}") as err:
        fact_from_record(rec, 4)
    assert "\n" not in str(err.value)


def test_wrong_type_in_a_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(KNOWN) + "\n" + json.dumps({"prompt": "x is", "subject": "x", "target": 5}) + "\n")
    with pytest.raises(FactFormatError, match=r"facts.jsonl:2: record 1 \(no id\): target must be a string or null, "
                                              r"got number 5"):
        load_facts(path)


def test_numeric_ids_still_read_as_text():
    # Every format stores the id as text; a hand-written own-format file may give a number.
    assert fact_from_record({"prompt": "x is", "subject": "x", "id": 12, "relation_id": 131}).id == "12"
    assert fact_from_record({"prompt": "x is", "subject": "x", "relation_id": 131}).relation_id == "131"
    assert fact_from_record({"prompt": "x is", "subject": "x", "rephrase_prompts": None}).rephrase_prompts == ()


@pytest.mark.parametrize("name, text", [("latin1.json", '[{"prompt": "Caf\xe9 is in", "subject": "Caf\xe9"}]'),
                                        ("latin1.jsonl", '{"prompt": "A is in", "subject": "A"}\n'
                                                         '{"prompt": "Caf\xe9 is in", "subject": "Caf\xe9"}\n')],
                         ids=["json", "jsonl"])
def test_non_utf8_facts_file_is_named(tmp_path, name, text):
    # Issue 21 (21): the codec's message alone ("can't decode byte 0xe9") does not say which file.
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(FactFormatError, match=rf"{name}.*not UTF-8.*0xe9") as err:
        load_facts(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# Issue 20 (1): every EasyEdit shape read whole; probes kept by key; strings and lists where EasyEdit takes both.
KNOWEDIT_CF = {
    "subject": "Frederic Piesch", "prompt": "The name of the position held by Frederic Piesch is",
    "target_new": "Archbishop of Leon", "ground_truth": "mayor of Vienna",
    "portability": {"Subject_Aliasing": [{"prompt": "The position held by Frederic of Pieschen is",
                                          "ground_truth": "Archbishop of Leon"}],
                    "Reasoning": [{"prompt": "The seat of the position held by Frederic Piesch is",
                                   "ground_truth": [["Leon", "Leon, Mexico"]]}]},
    "locality": {"Relation_Specificity": [{"prompt": "The gender of Frederic Piesch is", "ground_truth": [["male"]]},
                                          {"prompt": "Frederic Piesch's gender", "ground_truth": ["male", "man"]}],
                 "Forgetfulness": [{"prompt": "The position held by Frederic Piesch, which is not Archbishop of "
                                              "Leon, is", "ground_truth": "mayor of Vienna"}]},
}
ZSRE_RAW = {"subject": "Epaspidoceras", "src": "Which family does Epaspidoceras belong to?",
            "pred": "Aspidoceratidae", "rephrase": "What family are Epaspidoceras?", "alt": "Noctuidae",
            "answers": ["Aspidoceratidae", "Aspidoceras family"], "loc": "nq question: who sang nothing compares",
            "loc_ans": "Sinead O'Connor", "cond": "Aspidoceratidae >> Noctuidae || Which family ...",
            "portability": {"New Question": "What is the common name of the family of Epaspidoceras?",
                            "New Answer": "Owlet moths"}}


def test_knowedit_record_keeps_every_probe_by_key_with_nested_answers():
    fact = fact_from_record(KNOWEDIT_CF)
    assert (fact.target, fact.target_new, fact.rephrase_prompts) == ("mayor of Vienna", "Archbishop of Leon", ())
    assert fact.keys("portability") == ("Subject_Aliasing", "Reasoning")
    assert fact.keys("locality") == ("Relation_Specificity", "Forgetfulness")
    reasoning = fact.portability[1]
    assert (reasoning.answer, reasoning.aliases) == ("Leon", ("Leon, Mexico",))
    # A list answer is its first string, never the text of the list; the rest are aliases.
    assert [(p.answer, p.aliases) for p in fact.locality] == [("male", ()), ("male", ("man",)),
                                                             ("mayor of Vienna", ())]
    assert fact_from_record(json.loads(json.dumps(fact.to_json()))) == fact


def test_knowedit_zsre_recent_and_wikibio_shapes():
    zsre = {"subject": "Epaspidoceras", "target_new": "Noctuidae", "prompt": "Which family does Epaspidoceras "
            "belong to?", "ground_truth": ["Aspidoceratidae"], "rephrase_prompt": "What family are Epaspidoceras?",
            "cond": "x", "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is",
                                                               "ground_truth": ["genus"]}]},
            "portability": {"Reasoning": [{"prompt": "The common name of its family is", "ground_truth": "Owlets"}]}}
    fact = fact_from_record(zsre)
    assert (fact.target, fact.rephrase_prompts) == ("Aspidoceratidae", ("What family are Epaspidoceras?",))
    assert [(p.key, p.answer) for p in fact.portability] == [("Reasoning", "Owlets")]
    recent = {"subject": "Leo Arons", "prompt": "The place of death of Leo Arons is", "target_new": "Berlin",
              "portability": {"Logical_Generalization": [{"prompt": "Is Leo Arons still alive?",
                                                          "ground_truth": [["no"], ["incorrect"], ["false"]]}]},
              "locality": {"Relation_Specificity": [{"prompt": "The father of Leo Arons is",
                                                     "ground_truth": [["Albert Arons"]]}]}}
    fact = fact_from_record(recent)
    assert fact.target is None and fact.portability[0].answer == "no"
    assert fact.portability[0].aliases == ("incorrect", "false")
    bio = {"text": "This is a passage about john reynolds. He was born in", "labels": "Romsey, Hampshire.",
           "concept": "john reynolds", "locality": {"Relation_Specificity": [
               {"prompt": "The field of work of john reynolds is", "ground_truth": ["medicine"]}]}}
    fact = fact_from_record(bio)
    assert (fact.subject, fact.target_new, fact.locality[0].answer) == ("john reynolds", "Romsey, Hampshire.",
                                                                         "medicine")


def test_raw_zsre_is_read_as_run_zsre_llama2_reads_it():
    fact = fact_from_record(ZSRE_RAW, 2)
    assert (fact.prompt, fact.target, fact.target_new, fact.id) == (ZSRE_RAW["src"], "Aspidoceratidae",
                                                                    "Noctuidae", "2")
    assert fact.target_aliases == ("Aspidoceras family",) and fact.rephrase_prompts == (ZSRE_RAW["rephrase"],)
    assert [(p.key, p.prompt, p.answer) for p in fact.locality] == [("neighborhood", ZSRE_RAW["loc"],
                                                                     "Sinead O'Connor")]
    assert [(p.key, p.answer) for p in fact.portability] == [("one_hop", "Owlet moths")]
    plain = {k: v for k, v in ZSRE_RAW.items() if k != "portability"}
    assert fact_from_record(plain).portability == ()


def test_easyedit_request_shape_strings_and_lists():
    # EasyEdit's edit() and request dicts: a string prompt is one probe, a list goes with a list of answers.
    rec = dict(EASYEDIT, rephrase_prompts="Where is The Space Needle?",
               portability={"one_hop": {"prompt": "Its country is", "ground_truth": ["USA"]}},
               locality={"nb": {"prompt": ["A is in", "B is in"], "ground_truth": [["X", "x"], "Y"]}})
    fact = fact_from_record(rec)
    assert fact.rephrase_prompts == ("Where is The Space Needle?",)  # one prompt, not its characters
    assert [(p.key, p.prompt, p.answer) for p in fact.portability] == [("one_hop", "Its country is", "USA")]
    assert [(p.prompt, p.answer, p.aliases) for p in fact.locality] == [
        ("A is in", "X", ("x",)), ("B is in", "Y", ()), ("Pike Place Market is in the city of", "Seattle", ())]
    own = {"prompt": "x is", "subject": "x", "target": "y", "locality_prompts": "z is", "locality_answers": "w"}
    assert [(p.key, p.prompt, p.answer) for p in fact_from_record(own).locality] == [("neighborhood", "z is", "w")]


PROBE_ERRORS = [
    ({**KNOWEDIT_CF, "case_id": "a", "locality": {"Forgetfulness": [{"prompt": 5, "ground_truth": "x"}]}},
     r"locality\.Forgetfulness\[0\]\.prompt", "number 5"),
    ({**KNOWEDIT_CF, "case_id": "a", "portability": {"Reasoning": [{"prompt": "p", "ground_truth": [["x", 3]]}]}},
     r"portability\.Reasoning\[0\]\.ground_truth\[0\]\[1\]", "number 3"),
    ({**KNOWEDIT_CF, "case_id": "a", "portability": {"Reasoning": "p"}}, r"portability\.Reasoning", "string"),
    ({**KNOWEDIT_CF, "case_id": "a", "locality": {"nb": {"prompt": ["p", "q"], "ground_truth": ["x"]}}},
     r"locality\.nb\.ground_truth", "array"),
    ({**KNOWEDIT_CF, "case_id": "a", "ground_truth": 7}, "ground_truth", "number 7"),
    ({**ZSRE_RAW, "id": "a", "answers": [None]}, r"answers\[0\]", "null"),
    ({**ZSRE_RAW, "id": "a", "portability": {"New Question": "q", "New Answer": 1}}, r"portability\.New Answer",
     "number 1"),
    ({**ZSRE_RAW, "id": "a", "loc": ["nq question: a", 2]}, r"loc\[1\]", "number 2"),
]


@pytest.mark.parametrize("rec, field, found", PROBE_ERRORS, ids=[f"{i}-{c[1]}" for i, c in enumerate(PROBE_ERRORS)])
def test_wrong_probe_type_names_the_fact_and_the_field(rec, field, found):
    with pytest.raises(FactFormatError, match=rf"^record 4 \(id 'a'\): {field} must be .*, got {found}"):
        fact_from_record(rec, 4)


def test_zsre_without_subject_says_rome_needs_it():
    with pytest.raises(FactFormatError, match=r"record 0 \(no id\): missing field 'subject': ROME edits at"):
        fact_from_record({k: v for k, v in ZSRE_RAW.items() if k != "subject"})
