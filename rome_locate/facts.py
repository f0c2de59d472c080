"""Facts: the records every later stage starts from, and loaders for the formats users bring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .fact_formats import read_record
# The records live one floor down, beside the format readers that build them; they are facts' public names too.
from .fact_records import NEIGHBORHOOD, Fact, FactFormatError, Probe, neighbours  # noqa: F401
from .files import not_utf8, write_text

__all__ = ["NEIGHBORHOOD", "Fact", "FactFormatError", "Probe", "neighbours", "fact_from_record", "check_limit",
           "iter_facts", "load_facts", "save_jsonl"]


def fact_from_record(rec: dict[str, Any], idx: int = 0) -> Fact:
    """Read one record of any supported format (`rome_locate.fact_formats`: known_1000, CounterFact, EasyEdit's
    shapes, KnowEdit, ZsRE, our own JSON form)."""
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
