"""The readers of every facts format users bring, into `rome_locate.facts.Fact`: known_1000, ROME's CounterFact,
EasyEdit's request and CounterFact shapes, KnowEdit (wiki_counterfact, ZsRE, wiki_recent, WikiBio), raw ZsRE
(`src`, `alt`, `answers`, `loc`, ...) and our own JSON form.

Every field is read by type (`_Fields`): a wrong JSON type is a FactFormatError naming the record (position and id)
and the field, before the value can reach a tokenizer. Strings and lists are both accepted where EasyEdit accepts
both: a string of prompts is one prompt, and a list of answers is one answer (its first) with aliases (the rest).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator

from .fact_records import Fact, FactFormatError, Probe, neighbours

# The key EasyEdit's run_zsre_llama2.py gives ZsRE's `portability` question.
ZSRE_PORTABILITY = "one_hop"


def _found(value: Any) -> str:
    """`value`'s JSON type (and a short form of it) for a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    kind = {int: "number", float: "number", str: "string", list: "array", tuple: "array", dict: "object"}.get(
        type(value), type(value).__name__)
    text = json.dumps(value) if kind in ("array", "object") else repr(value)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


ANSWER_TYPES = "a string, an array of strings (the answer, then its aliases) or null"


class _Fields:
    """Typed reads of one record's fields: a wrong JSON type is a FactFormatError naming the record (position and
    id), the field and the type found."""

    def __init__(self, rec: dict[str, Any], idx: int):
        self.rec = rec
        ident = next((rec[k] for k in ("case_id", "known_id", "id") if rec.get(k) is not None), None)
        self.where = f"record {idx} ({'no id' if ident is None else f'id {str(ident)!r}'})"

    def fail(self, field: str, expected: str, value: Any) -> FactFormatError:
        return FactFormatError(f"{self.where}: {field} must be {expected}, got {_found(value)}")

    def text(self, value: Any, field: str) -> str:
        """A required string."""
        if not isinstance(value, str):
            raise self.fail(field, "a string", value)
        return value

    def answer(self, value: Any, field: str) -> str | None:
        """A string, CounterFact's {"str": ...} or null; stripped (targets are stored without a leading space)."""
        if isinstance(value, dict):
            field, value = field + ".str", value.get("str")
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(field, "a string or null", value)
        return value.strip()

    def answers(self, value: Any, field: str) -> tuple[str | None, tuple[str, ...]]:
        """(answer, aliases) of a string, {"str": ...}, null or a (nested) array of strings: the first string is
        the answer EasyEdit scores, the others are kept as aliases (KnowEdit's [["Berlin", "Berlin, Germany"]])."""
        if not isinstance(value, list):
            if value is not None and not isinstance(value, (str, dict)):
                raise self.fail(field, ANSWER_TYPES, value)
            return self.answer(value, field), ()
        leaves = [self.answer(v, p) or "" for v, p in self._leaves(value, field)]
        return (leaves[0], tuple(leaves[1:])) if leaves else (None, ())

    def _leaves(self, value: list, field: str) -> Iterator[tuple[Any, str]]:
        for i, v in enumerate(value):
            if isinstance(v, list):
                yield from self._leaves(v, f"{field}[{i}]")
            elif isinstance(v, (str, dict)):
                yield v, f"{field}[{i}]"
            else:
                raise self.fail(f"{field}[{i}]", ANSWER_TYPES, v)

    def texts(self, value: Any, field: str, answers: bool = False) -> tuple[str, ...]:
        """Null, one string, or an array of strings (of answers, with `answers`: each as `answer` reads it)."""
        if value is None:
            return ()
        if isinstance(value, str):
            return (value.strip(),) if answers else (value,)
        if not isinstance(value, list):
            raise self.fail(field, "a string or an array of strings", value)
        if answers:
            return tuple(self.answer(v, f"{field}[{i}]") or "" for i, v in enumerate(value))
        return tuple(self.text(v, f"{field}[{i}]") for i, v in enumerate(value))

    def label(self, value: Any, field: str) -> str | None:
        """An id or relation id: a string, or a number read as text; null is absent."""
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise self.fail(field, "a string or an integer", value)

    def probes(self, value: Any, field: str) -> tuple[Probe, ...]:
        """Every probe of a `locality` or `portability` value, by key.

        Accepted: KnowEdit's {key: [{prompt, ground_truth}, ...]}, EasyEdit's request form {key: {prompt,
        ground_truth}} (a string prompt is one probe, a list of prompts goes with a list of answers of the same
        length), and our own [{key, prompt, answer, aliases}, ...]. A key whose value is null has no probes.
        """
        if value is None:
            return ()
        if isinstance(value, list):
            return tuple(self._own_probe(v, f"{field}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, dict):
            raise self.fail(field, "an object of keys (or an array of probes)", value)
        out: list[Probe] = []
        for key, part in value.items():
            where = f"{field}.{key}"
            if isinstance(part, list):
                out += [self._knowedit_probe(key, v, f"{where}[{i}]") for i, v in enumerate(part)]
            elif isinstance(part, dict):
                out += self._request_probes(key, part, where)
            elif part is not None:
                raise self.fail(where, "an array of {prompt, ground_truth} objects or an object "
                                       "{prompt, ground_truth}", part)
        return tuple(out)

    def _knowedit_probe(self, key: str, item: Any, where: str) -> Probe:
        if not isinstance(item, dict):
            raise self.fail(where, "an object {prompt, ground_truth}", item)
        answer, aliases = self.answers(item.get("ground_truth"), f"{where}.ground_truth")
        return Probe(key, self.text(item.get("prompt"), f"{where}.prompt"), answer, aliases)

    def _request_probes(self, key: str, part: dict[str, Any], where: str) -> list[Probe]:
        prompts, truth = part.get("prompt"), part.get("ground_truth")
        if isinstance(prompts, str) or prompts is None:
            answer, aliases = self.answers(truth, f"{where}.ground_truth")
            return [Probe(key, self.text(prompts, f"{where}.prompt"), answer, aliases)]
        texts = self.texts(prompts, f"{where}.prompt")
        truths = truth if isinstance(truth, list) else [truth] * len(texts) if truth is None else None
        if truths is None or len(truths) != len(texts):
            raise self.fail(f"{where}.ground_truth", f"an array of {len(texts)} answer(s), one per prompt", truth)
        return [Probe(key, p, *self.answers(t, f"{where}.ground_truth[{i}]"))
                for i, (p, t) in enumerate(zip(texts, truths))]

    def _own_probe(self, item: Any, where: str) -> Probe:
        if not isinstance(item, dict):
            raise self.fail(where, "an object {key, prompt, answer}", item)
        answer = item.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise self.fail(f"{where}.answer", "a string or null", answer)
        aliases = item.get("aliases")
        if aliases is not None and not isinstance(aliases, list):
            raise self.fail(f"{where}.aliases", "an array of strings", aliases)
        return Probe(self.text(item.get("key"), f"{where}.key"), self.text(item.get("prompt"), f"{where}.prompt"),
                     answer, self.texts(aliases, f"{where}.aliases"))


def _from_known(rec: dict[str, Any], idx: int) -> Fact:
    f = _Fields(rec, idx)
    subject = f.text(rec["subject"], "subject")
    prompt = f.text(rec["prompt"], "prompt") if rec.get("prompt") is not None else ""
    if not prompt:
        prompt = f.text(rec["template"], "template").format(subject)
    target = f.answer(rec.get("attribute"), "attribute") or f.answer(rec.get("prediction"), "prediction")
    return Fact(prompt=prompt, subject=subject, target=target,
                relation_id=f.label(rec.get("relation_id"), "relation_id"),
                id=f.label(rec.get("known_id"), "known_id") or str(idx))


def _from_counterfact(rec: dict[str, Any], idx: int) -> Fact:
    # ROME's CounterFact. Its attribute_prompts and generation_prompts feed ROME's essence and consistency scores,
    # which rome-locate does not compute (README, Facts).
    f = _Fields(rec, idx)
    rw = rec["requested_rewrite"]
    if not isinstance(rw, dict):
        raise f.fail("requested_rewrite", "an object", rw)
    subject = f.text(rw["subject"], "requested_rewrite.subject")
    template = f.text(rw["prompt"], "requested_rewrite.prompt")
    if "{}" not in template:
        raise FactFormatError(f"record {idx}: requested_rewrite.prompt has no '{{}}': {template!r}")
    target_true = f.answer(rw.get("target_true"), "requested_rewrite.target_true")
    nb = f.texts(rec.get("neighborhood_prompts"), "neighborhood_prompts")
    return Fact(
        prompt=template.format(subject), subject=subject, target=target_true,
        target_new=f.answer(rw.get("target_new"), "requested_rewrite.target_new"),
        rephrase_prompts=f.texts(rec.get("paraphrase_prompts"), "paraphrase_prompts"),
        # CounterFact's neighbourhood prompts share the edited fact's true object.
        locality=neighbours(nb, [target_true] * len(nb)),
        relation_id=f.label(rw.get("relation_id"), "requested_rewrite.relation_id"),
        id=f.label(rec.get("case_id"), "case_id") or str(idx),
    )


def _first(rec: dict[str, Any], keys: tuple[str, ...]) -> str:
    """The first of `keys` present in `rec` (the first one when none is): the name a dataset spells a field by."""
    return next((k for k in keys if k in rec), keys[0])


def _from_easyedit(rec: dict[str, Any], idx: int) -> Fact:
    # EasyEdit's request dicts and CounterFact shape, and KnowEdit: wiki_counterfact, ZsRE and wiki_recent spell
    # prompt/subject/target_new, WikiBio text/concept/labels (as KnowEditDataset reads them).
    f = _Fields(rec, idx)
    locality = f.probes(rec.get("locality"), "locality")
    if "locality_prompt" in rec:
        prompts = f.texts(rec["locality_prompt"], "locality_prompt")
        answers = f.texts(rec.get("locality_ground_truth"), "locality_ground_truth", answers=True)
        locality += neighbours(prompts, answers)
    prompt_key, subject_key = _first(rec, ("prompt", "text")), _first(rec, ("subject", "concept"))
    new_key, target_key = _first(rec, ("target_new", "labels")), _first(rec, ("ground_truth", "target_true", "target"))
    rephrase_key = _first(rec, ("rephrase_prompts", "rephrase_prompt", "rephrase"))
    target, aliases = f.answers(rec.get(target_key), target_key)
    ident = rec.get("case_id", rec.get("id"))
    return Fact(
        prompt=f.text(rec[prompt_key], prompt_key), subject=f.text(rec[subject_key], subject_key),
        target=target, target_aliases=aliases, target_new=f.answer(rec.get(new_key), new_key),
        rephrase_prompts=f.texts(rec.get(rephrase_key), rephrase_key), locality=locality,
        portability=f.probes(rec.get("portability"), "portability"),
        relation_id=f.label(rec.get("relation_id"), "relation_id"),
        id=f.label(ident, "case_id" if "case_id" in rec else "id") or str(idx),
    )


def _from_zsre(rec: dict[str, Any], idx: int) -> Fact:
    # Raw ZsRE (zsre_mend_eval*.json), read as run_zsre_llama2.py reads it: the ground truth is answers[0]
    # (ZsreDataset's), the others are kept as aliases; `pred` (the original model's answer) is not a fact.
    f = _Fields(rec, idx)
    if "subject" not in rec:
        raise FactFormatError(f"{f.where}: missing field 'subject': ROME edits at the subject, and a ZsRE record "
                              f"carries it (zsre_mend_eval*.json does; run_zsre_llama2.py reads it)")
    target, aliases = f.answers(rec.get("answers"), "answers")
    portability: tuple[Probe, ...] = ()
    port = rec.get("portability")
    if port is not None:
        if not isinstance(port, dict):
            raise f.fail("portability", "an object {New Question, New Answer}", port)
        if "New Question" in port:
            answer, more = f.answers(port.get("New Answer"), "portability.New Answer")
            portability = (Probe(ZSRE_PORTABILITY, f.text(port["New Question"], "portability.New Question"),
                                 answer, more),)
        else:
            portability = f.probes(port, "portability")
    loc = f.texts(rec.get("loc"), "loc")
    return Fact(
        prompt=f.text(rec["src"], "src"), subject=f.text(rec["subject"], "subject"), target=target,
        target_aliases=aliases, target_new=f.answer(rec.get("alt"), "alt") or None,
        rephrase_prompts=f.texts(rec.get("rephrase"), "rephrase"),
        locality=neighbours(loc, f.texts(rec.get("loc_ans"), "loc_ans", answers=True)), portability=portability,
        relation_id=f.label(rec.get("relation_id"), "relation_id"),
        id=f.label(rec.get("case_id", rec.get("id")), "case_id" if "case_id" in rec else "id") or str(idx),
    )


def _from_own(rec: dict[str, Any], idx: int) -> Fact:
    # Our own form is written by to_json: plain strings and arrays, never CounterFact's {"str": ...} objects.
    # Files written before probes had keys hold locality_prompts/locality_answers: read as "neighborhood" probes.
    f = _Fields(rec, idx)
    for name in ("target", "target_new"):
        if rec.get(name) is not None and not isinstance(rec[name], str):
            raise f.fail(name, "a string or null", rec[name])
    locality = f.probes(rec.get("locality"), "locality")
    if "locality_prompts" in rec:
        answers = rec.get("locality_answers")
        if answers is not None and not isinstance(answers, (list, str)):
            raise f.fail("locality_answers", "a string or an array of strings", answers)
        locality += neighbours(f.texts(rec["locality_prompts"], "locality_prompts"),
                               [a or None for a in f.texts(answers, "locality_answers", answers=True)])
    return Fact(
        prompt=f.text(rec["prompt"], "prompt"), subject=f.text(rec["subject"], "subject"), target=rec.get("target"),
        target_new=rec.get("target_new"), rephrase_prompts=f.texts(rec.get("rephrase_prompts"), "rephrase_prompts"),
        locality=locality, portability=f.probes(rec.get("portability"), "portability"),
        relation_id=f.label(rec.get("relation_id"), "relation_id"), id=f.label(rec.get("id"), "id") or "",
        target_aliases=f.texts(rec.get("target_aliases"), "target_aliases"),
    )


# Keys only our own form writes; EasyEdit's shapes never do.
OWN_KEYS = {"target", "locality_prompts", "locality_answers", "target_aliases"}
EASYEDIT_KEYS = {"target_new", "ground_truth", "locality", "portability", "rephrase_prompt", "locality_prompt"}


def read_record(rec: Any, idx: int = 0) -> Fact:
    """Read one record in known_1000, ROME's CounterFact, EasyEdit's or KnowEdit's shapes, raw ZsRE or our own
    JSON form."""
    if not isinstance(rec, dict):
        raise FactFormatError(f"record {idx}: expected a JSON object, got {type(rec).__name__}")
    try:
        if "requested_rewrite" in rec:
            return _from_counterfact(rec, idx)
        if "known_id" in rec or ("attribute" in rec and "template" in rec):
            return _from_known(rec, idx)
        if "src" in rec and "alt" in rec:
            return _from_zsre(rec, idx)
        if "text" in rec and "concept" in rec:
            return _from_easyedit(rec, idx)  # KnowEdit's WikiBio
        if "prompt" in rec and "subject" in rec:
            if OWN_KEYS & set(rec):
                return _from_own(rec, idx)
            if EASYEDIT_KEYS & set(rec):
                return _from_easyedit(rec, idx)
            return _from_own(rec, idx)
    except KeyError as exc:
        raise FactFormatError(f"{_Fields(rec, idx).where}: missing field {exc}") from None
    raise FactFormatError(
        f"record {idx}: not known_1000 (known_id, subject, attribute, prompt), CounterFact (requested_rewrite), "
        f"EasyEdit/KnowEdit (prompt, subject, target_new; WikiBio: text, concept, labels), ZsRE (src, alt, "
        f"answers, subject) or rome-locate (prompt, subject) format; keys were {sorted(rec)}"
    )
