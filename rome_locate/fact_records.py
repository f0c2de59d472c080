"""The fact records: `Fact`, its locality and portability `Probe`s by key, and the error of a record no format
matches. Every later stage starts from them; `rome_locate.facts` loads them from files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

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


