"""Facts: the records every later stage starts from, and loaders for the formats users bring."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .files import not_utf8, write_text
from .records import Record


@dataclass(frozen=True)
class Probe(Record):
    """One portability or locality question of a fact: its group (`key`, as EasyEdit's dicts name it), prompt and
    answer.

    `answer` is the answer EasyEdit scores: the first one a dataset gives. `aliases` keeps the others (KnowEdit's
    alias lists and alternative answers), so nothing a file holds is lost; None is an unknown answer.
    """

    key: str
    prompt: str
    answer: str | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "aliases", tuple(self.aliases or ()))


# CounterFact's neighbourhood prompts and ZsRE's `loc` question: the key EasyEdit's own scripts give them.
NEIGHBORHOOD = "neighborhood"


def _probe(value: Any) -> Probe:
    return value if isinstance(value, Probe) else Probe.from_json(value)


@dataclass(frozen=True)
class Fact(Record):
    """One fact to trace or edit.

    `prompt` ends where the answer starts (no `{}`); targets are stored without
    a leading space, as CounterFact and EasyEdit store them. `locality` and
    `portability` hold every probe of the fact, each under its key (CounterFact's
    neighbourhood prompts under "neighborhood", KnowEdit's under its own keys).
    """

    prompt: str
    subject: str
    target: str | None = None  # the true object ("ground truth"), if known
    target_new: str | None = None  # the object an edit should write
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()  # what the edit should leave alone, by key
    portability: tuple[Probe, ...] = ()  # what should follow from the edit, by key
    relation_id: str | None = None
    id: str = ""
    target_aliases: tuple[str, ...] = ()  # other accepted true answers (ZsRE's answers[1:], KnowEdit's aliases)

    def __post_init__(self) -> None:
        # JSON gives lists (or null) where the record keeps tuples, and dicts where it keeps probes.
        for name in ("rephrase_prompts", "target_aliases"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        for name in ("locality", "portability"):
            object.__setattr__(self, name, tuple(_probe(p) for p in getattr(self, name) or ()))

    @property
    def locality_prompts(self) -> tuple[str, ...]:
        """The prompts of every locality probe, in order (all keys)."""
        return tuple(p.prompt for p in self.locality)

    @property
    def locality_answers(self) -> tuple[str | None, ...]:
        """The answers of every locality probe, aligned with `locality_prompts` (None where unknown)."""
        return tuple(p.answer for p in self.locality)

    def keys(self, group: str) -> tuple[str, ...]:
        """The keys of `group` ("locality" or "portability"), in the order they first appear."""
        return tuple(dict.fromkeys(p.key for p in getattr(self, group)))


def neighbours(prompts: Iterable[str], answers: Iterable[str | None] = (), key: str = NEIGHBORHOOD
               ) -> tuple[Probe, ...]:
    """Locality probes of `key` from prompts and their answers (missing answers are None)."""
    answers = list(answers)
    return tuple(Probe(key, p, answers[i] if i < len(answers) else None) for i, p in enumerate(prompts))


class FactFormatError(ValueError):
    """A facts file or record that no supported format matches."""


def fact_from_record(rec: dict[str, Any], idx: int = 0) -> Fact:
    """Read one record of any supported format (`rome_locate.fact_formats`: known_1000, CounterFact, EasyEdit's
    shapes, KnowEdit, ZsRE, our own JSON form)."""
    from .fact_formats import read_record

    return read_record(rec, idx)


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
