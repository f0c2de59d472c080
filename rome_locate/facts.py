"""Facts: the records every later stage starts from, and loaders for the formats users bring."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .files import not_utf8, write_text
from .records import Record


@dataclass(frozen=True)
class Fact(Record):
    """One fact to trace or edit.

    `prompt` ends where the answer starts (no `{}`); targets are stored without
    a leading space, as CounterFact and EasyEdit store them.
    """

    prompt: str
    subject: str
    target: str | None = None  # the true object ("ground truth"), if known
    target_new: str | None = None  # the object an edit should write
    rephrase_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[str, ...] = ()  # other subjects, same relation
    locality_answers: tuple[str, ...] = ()  # their true objects, when known
    relation_id: str | None = None
    id: str = ""

    def __post_init__(self) -> None:
        # JSON gives lists (or null) where the record keeps tuples.
        for name in ("rephrase_prompts", "locality_prompts", "locality_answers"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))


class FactFormatError(ValueError):
    """A facts file or record that no supported format matches."""


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


class _Fields:
    """Typed reads of one record's fields: a wrong JSON type is a FactFormatError naming the record (position and
    id), the field and the type found, before the value can reach a tokenizer."""

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


def _from_known(rec: dict[str, Any], idx: int) -> Fact:
    f = _Fields(rec, idx)
    subject = f.text(rec["subject"], "subject")
    prompt = f.text(rec["prompt"], "prompt") if rec.get("prompt") is not None else ""
    if not prompt:
        prompt = f.text(rec["template"], "template").format(subject)
    target = f.answer(rec.get("attribute"), "attribute") or f.answer(rec.get("prediction"), "prediction")
    return Fact(
        prompt=prompt,
        subject=subject,
        target=target,
        relation_id=f.label(rec.get("relation_id"), "relation_id"),
        id=f.label(rec.get("known_id"), "known_id") or str(idx),
    )


def _from_counterfact(rec: dict[str, Any], idx: int) -> Fact:
    f = _Fields(rec, idx)
    rw = rec["requested_rewrite"]
    if not isinstance(rw, dict):
        raise f.fail("requested_rewrite", "an object", rw)
    subject = f.text(rw["subject"], "requested_rewrite.subject")
    template = f.text(rw["prompt"], "requested_rewrite.prompt")
    if "{}" not in template:
        raise FactFormatError(f"record {idx}: requested_rewrite.prompt has no '{{}}': {template!r}")
    target_true = f.answer(rw.get("target_true"), "requested_rewrite.target_true")
    neighbours = f.texts(rec.get("neighborhood_prompts"), "neighborhood_prompts")
    return Fact(
        prompt=template.format(subject),
        subject=subject,
        target=target_true,
        target_new=f.answer(rw.get("target_new"), "requested_rewrite.target_new"),
        rephrase_prompts=f.texts(rec.get("paraphrase_prompts"), "paraphrase_prompts"),
        locality_prompts=neighbours,
        # CounterFact's neighbourhood prompts share the edited fact's true object.
        locality_answers=(target_true,) * len(neighbours) if target_true else (),
        relation_id=f.label(rw.get("relation_id"), "requested_rewrite.relation_id"),
        id=f.label(rec.get("case_id"), "case_id") or str(idx),
    )


def _from_easyedit(rec: dict[str, Any], idx: int) -> Fact:
    f = _Fields(rec, idx)
    loc_prompts: tuple[str, ...] = ()
    loc_answers: tuple[str, ...] = ()
    loc = rec.get("locality")
    if isinstance(loc, dict):
        # EasyEdit: {"neighborhood": {"prompt": [...], "ground_truth": [...]}, ...}
        for name, part in loc.items():
            if isinstance(part, dict):
                loc_prompts += f.texts(part.get("prompt"), f"locality.{name}.prompt")
                loc_answers += f.texts(part.get("ground_truth"), f"locality.{name}.ground_truth", answers=True)
    if "locality_prompt" in rec:
        loc_prompts += f.texts(rec["locality_prompt"], "locality_prompt")
        loc_answers += f.texts(rec.get("locality_ground_truth"), "locality_ground_truth", answers=True)
    # The first of these keys present names the field, as EasyEdit's datasets spell it.
    target_key = next((k for k in ("ground_truth", "target_true", "target") if k in rec), "ground_truth")
    rephrase_key = next((k for k in ("rephrase_prompts", "rephrase_prompt", "rephrase") if k in rec), "rephrase")
    ident = rec.get("case_id", rec.get("id"))
    return Fact(
        prompt=f.text(rec["prompt"], "prompt"),
        subject=f.text(rec["subject"], "subject"),
        target=f.answer(rec.get(target_key), target_key),
        target_new=f.answer(rec.get("target_new"), "target_new"),
        rephrase_prompts=f.texts(rec.get(rephrase_key), rephrase_key),
        locality_prompts=loc_prompts,
        locality_answers=loc_answers,
        relation_id=f.label(rec.get("relation_id"), "relation_id"),
        id=f.label(ident, "case_id" if "case_id" in rec else "id") or str(idx),
    )


def _from_own(rec: dict[str, Any], idx: int) -> Fact:
    # Our own form is written by to_json: plain strings and arrays, never CounterFact's {"str": ...} objects.
    f = _Fields(rec, idx)
    clean = dict(rec)
    for name in ("prompt", "subject"):
        clean[name] = f.text(rec[name], name)
    for name in ("target", "target_new"):
        if rec.get(name) is not None and not isinstance(rec[name], str):
            raise f.fail(name, "a string or null", rec[name])
    for name in ("rephrase_prompts", "locality_prompts", "locality_answers"):
        if name in rec:
            value = rec[name]
            if value is not None and not isinstance(value, list):
                raise f.fail(name, "an array of strings", value)
            clean[name] = [f.text(v, f"{name}[{i}]") for i, v in enumerate(value or ())]
    clean["relation_id"] = f.label(rec.get("relation_id"), "relation_id")
    clean["id"] = f.label(rec.get("id"), "id") or ""
    return Fact.from_json(clean)


def fact_from_record(rec: dict[str, Any], idx: int = 0) -> Fact:
    """Read one record in known_1000, CounterFact, EasyEdit or our own JSON form."""
    if not isinstance(rec, dict):
        raise FactFormatError(f"record {idx}: expected a JSON object, got {type(rec).__name__}")
    try:
        if "requested_rewrite" in rec:
            return _from_counterfact(rec, idx)
        if "known_id" in rec or ("attribute" in rec and "template" in rec):
            return _from_known(rec, idx)
        if "prompt" in rec and "subject" in rec:
            # Our own keys first: EasyEdit never writes these, and its parser would drop locality_prompts.
            if {"target", "locality_prompts", "locality_answers"} & set(rec):
                return _from_own(rec, idx)
            if "target_new" in rec or "ground_truth" in rec or "locality" in rec:
                return _from_easyedit(rec, idx)
            return _from_own(rec, idx)
    except KeyError as exc:
        raise FactFormatError(f"record {idx}: missing field {exc}") from None
    raise FactFormatError(
        f"record {idx}: not known_1000 (known_id, subject, attribute, prompt), CounterFact "
        f"(requested_rewrite), EasyEdit (prompt, subject, target_new) or rome-locate (prompt, subject) "
        f"format; keys were {sorted(rec)}"
    )


def _records(path: Path, fh: IO[str]) -> Iterator[tuple[str, Any]]:
    """(where, record) of a JSON array (read whole) or a JSON Lines file (read line by line); `where` names the
    file and, for JSON Lines, the line, so an error points at it."""
    head = ""
    while True:
        ch = fh.read(1)
        if not ch or not ch.isspace():
            head = ch
            break
    if head == "[":
        try:
            records = json.loads(head + fh.read())
        except json.JSONDecodeError as exc:
            raise FactFormatError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        for rec in records:
            yield str(path), rec
        return
    fh.seek(0)
    for n, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FactFormatError(f"{path}:{n}: not valid JSON ({exc.msg}, column {exc.colno}); a JSON Lines file "
                                  f"holds one JSON object per line") from None
        yield f"{path}:{n}", rec


def _decoded(path: Path, records: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    # The codec's own message names no file; the file is read lazily, so the error can come at any record.
    try:
        yield from records
    except UnicodeDecodeError as exc:
        raise FactFormatError(not_utf8(path, exc)) from None


def check_limit(limit: int | None, flag: str = "limit") -> int | None:
    """`limit` when it is None or an integer >= 1; otherwise a ValueError naming `flag`."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{flag} must be >= 1 (the number of facts to use), got {limit!r}")
    return limit


def iter_facts(path: str | Path, limit: int | None = None) -> Iterator[Fact]:
    """Facts of a JSON array or JSON Lines file in any supported format; JSON Lines is read only as far as needed."""
    check_limit(limit)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"facts file not found: {path}")
    with path.open(encoding="utf-8") as fh:
        for i, (where, rec) in enumerate(_decoded(path, _records(path, fh))):
            try:
                fact = fact_from_record(rec, i)
            except FactFormatError as exc:
                raise FactFormatError(f"{where}: {exc}") from None
            yield fact
            if limit is not None and i + 1 >= limit:
                return  # nothing after the last fact asked for is read


def load_facts(path: str | Path, limit: int | None = None) -> list[Fact]:
    """Load facts from a JSON array or JSON Lines file in any supported format (`limit`: only the first N)."""
    out = list(iter_facts(path, limit))
    if not out:
        raise FactFormatError(f"{path}: no facts in file")
    return out


def save_jsonl(records: Iterable[Any], path: str | Path) -> None:
    """Write records (objects with `to_json`, or dicts) as JSON Lines, atomically."""
    lines = [json.dumps(rec.to_json() if hasattr(rec, "to_json") else rec) for rec in records]
    write_text(path, "".join(line + "\n" for line in lines))
