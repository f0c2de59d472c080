"""One JSON convention for every record that crosses a module line (facts, traces, choices, outcomes, settings).

A record is a frozen dataclass that also derives from `Record`. `to_json()` gives
plain JSON types (tuples become lists, nested records become dicts);
`from_json()` reads them back, rebuilding tuples and nested records from the
field annotations. The policy is the same for every record:

- a key the class does not know is ignored, because one JSON line may carry
  several records' fields (a locate line holds a trace and a layer choice);
  `strict=True` turns it into an error, for files a person writes by hand;
- a missing key takes the field's default; a missing key without a default is
  a `ValueError` naming the record and the keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Mapping, TypeVar

R = TypeVar("R", bound="Record")


class Record:
    """Base of the JSON-serialisable frozen dataclasses; see the module docstring for the policy."""

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form: tuples become lists, nested records dicts."""
        return {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_json(cls: type[R], obj: Mapping[str, Any], *, strict: bool = False) -> R:
        """Inverse of `to_json`; unknown keys are ignored (an error with `strict`), missing ones take defaults."""
        if not isinstance(obj, Mapping):
            raise ValueError(f"{cls.__name__} record must be a JSON object, got {type(obj).__name__}")
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        names = {f.name for f in fields}
        if strict:
            unknown = sorted(set(obj) - names)
            if unknown:
                raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected some of {sorted(names)}")
        hints = _hints(cls)
        missing = [f.name for f in fields if f.name not in obj and f.init
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{cls.__name__} record is missing keys {missing}")
        kw = {f.name: from_plain(hints[f.name], obj[f.name]) for f in fields if f.init and f.name in obj}
        return cls(**kw)


def to_plain(value: Any) -> Any:
    """`value` in plain JSON types (records, tuples and mappings converted recursively)."""
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    return value


def from_plain(hint: Any, value: Any) -> Any:
    """`value` read back as the annotated type `hint` (tuples and records rebuilt; other values as they are)."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        # A union of plain types (e.g. float | str) keeps the value; a record or tuple member rebuilds it.
        for arg in args:
            if _is_record(arg) and isinstance(value, Mapping):
                return arg.from_json(value)
            if typing.get_origin(arg) is tuple and isinstance(value, (list, tuple)):
                return from_plain(arg, value)
        if float in args and isinstance(value, int) and not isinstance(value, bool) and int not in args:
            return float(value)
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_plain(args[0], v) for v in value)
        if args and len(args) == len(value):
            return tuple(from_plain(a, v) for a, v in zip(args, value))
        return tuple(value)
    if _is_record(hint) and isinstance(value, Mapping):
        return hint.from_json(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def non_finite(obj: Any, path: str = "") -> list[str]:
    """Paths of the NaN or infinite floats inside a plain-JSON value (empty when every number is finite)."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [path or "."]
    if isinstance(obj, Mapping):
        return [p for k, v in obj.items() for p in non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in non_finite(v, f"{path}[{i}]")]
    return []


def _is_record(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, Record)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)
