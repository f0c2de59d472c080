"""Facts: the records every later stage starts from, and loaders for the formats users bring."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .files import write_text
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


def _str_of(value: Any) -> str | None:
    # CounterFact nests objects as {"str": ..., "id": ...}.
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("str")
    return None if value is None else str(value).strip()


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _from_known(rec: dict[str, Any], idx: int) -> Fact:
    prompt = rec.get("prompt") or rec["template"].format(rec["subject"])
    target = rec.get("attribute") or _str_of(rec.get("prediction"))
    return Fact(
        prompt=prompt,
        subject=rec["subject"],
        target=_str_of(target),
        relation_id=rec.get("relation_id"),
        id=str(rec.get("known_id", idx)),
    )


def _from_counterfact(rec: dict[str, Any], idx: int) -> Fact:
    rw = rec["requested_rewrite"]
    subject = rw["subject"]
    template = rw["prompt"]
    if "{}" not in template:
        raise FactFormatError(f"record {idx}: requested_rewrite.prompt has no '{{}}': {template!r}")
    neighbours = _as_tuple(rec.get("neighborhood_prompts"))
    return Fact(
        prompt=template.format(subject),
        subject=subject,
        target=_str_of(rw.get("target_true")),
        target_new=_str_of(rw.get("target_new")),
        rephrase_prompts=_as_tuple(rec.get("paraphrase_prompts")),
        locality_prompts=neighbours,
        # CounterFact's neighbourhood prompts share the edited fact's true object.
        locality_answers=(_str_of(rw.get("target_true")),) * len(neighbours) if rw.get("target_true") else (),
        relation_id=rw.get("relation_id"),
        id=str(rec.get("case_id", idx)),
    )


def _from_easyedit(rec: dict[str, Any], idx: int) -> Fact:
    loc_prompts: tuple[str, ...] = ()
    loc_answers: tuple[str, ...] = ()
    loc = rec.get("locality")
    if isinstance(loc, dict):
        # EasyEdit: {"neighborhood": {"prompt": [...], "ground_truth": [...]}, ...}
        for part in loc.values():
            if isinstance(part, dict):
                loc_prompts += _as_tuple(part.get("prompt"))
                loc_answers += tuple(_str_of(a) or "" for a in _as_tuple(part.get("ground_truth")))
    if "locality_prompt" in rec:
        loc_prompts += _as_tuple(rec["locality_prompt"])
        loc_answers += _as_tuple(rec.get("locality_ground_truth"))
    rephrase = rec.get("rephrase_prompts", rec.get("rephrase_prompt", rec.get("rephrase")))
    return Fact(
        prompt=rec["prompt"],
        subject=rec["subject"],
        target=_str_of(rec.get("ground_truth", rec.get("target_true", rec.get("target")))),
        target_new=_str_of(rec.get("target_new")),
        rephrase_prompts=_as_tuple(rephrase),
        locality_prompts=loc_prompts,
        locality_answers=loc_answers,
        relation_id=rec.get("relation_id"),
        id=str(rec.get("case_id", rec.get("id", idx))),
    )


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
                return Fact.from_json(rec)
            if "target_new" in rec or "ground_truth" in rec or "locality" in rec:
                return _from_easyedit(rec, idx)
            return Fact.from_json(rec)
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
        for i, (where, rec) in enumerate(_records(path, fh)):
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
