"""A synthetic knowledge base, generated deterministically from a seed.

The world has invented persons (subjects), a few relations with small sets of
single-word objects, and templates: several *training* templates per relation
(the only ones the shipped fact models ever see) and *held-out* paraphrase
templates (never trained on, used to test generalisation and as CounterFact
paraphrase prompts).

Names are composed from shared pools of syllable chunks: first name = A+B,
last name = C+D ("Dorven Kaltmoor").  Every chunk is used by many subjects, so
no single rare sub-word identifies a subject; the model has to combine the
tokens of the whole name, and the subject is only determined at its last token.
The A and C chunks end in distinct letters and the B and D chunks start with
distinct letters, so a BPE merge across a chunk boundary would identify one
(A, B) or (C, D) combination, which is rare by construction (each combination
is used by at most `_MAX_COMBO` subjects) and so is not merged by the
tokenizer trainer of `rome_locate.fact_model`.

No torch import here: this module is plain Python.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# --- name pools ---------------------------------------------------------------
# First-name openings (distinct final letters), first-name endings (distinct
# initial letters), last-name openings (distinct final letters), last-name
# endings (distinct initial letters).
FIRST_A = ("Dor", "Kep", "Mab", "Tav", "Bren", "Fad", "Jok", "Ris", "Vem", "Hag", "Pex", "Lut")
FIRST_B = ("ven", "ric", "ath", "olm", "zor", "isa", "emy", "dra", "gol", "sen", "lia", "wyn")
LAST_C = ("Kalt", "Brun", "Vos", "Hew", "Mar", "Gud", "Tam", "Orb", "Quig", "Dak", "Zev", "Pox")
LAST_D = ("moor", "wick", "quist", "aster", "feld", "nock", "lund", "stra", "jorn", "berg", "crest", "ivo")

_MAX_COMBO = 3  # at most this many subjects share one first name (A+B) or one last name (C+D)


@dataclass(frozen=True)
class Relation:
    """One relation: Wikidata-style id, a name, its objects and its templates."""

    relation_id: str
    name: str
    objects: tuple[str, ...]
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "P19",
        "place of birth",
        ("Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo", "Athens", "Warsaw"),
        (
            "{} was born in the city of",
            "{} was born in",
            "The birthplace of {} is",
            "{}'s hometown is",
            "{} is a native of the city of",
            "The city of birth of {} is",
        ),
        ("The hometown of {} is", "{}'s birthplace is"),
    ),
    Relation(
        "P103",
        "native language",
        ("French", "English", "German", "Spanish", "Italian", "Dutch", "Polish", "Greek", "Swedish", "Danish"),
        (
            "The native language of {} is",
            "{} speaks the language",
            "{}'s mother tongue is",
            "{} grew up speaking",
            "The first language of {} is",
            "{} has always spoken",
        ),
        ("The mother tongue of {} is", "{}'s native language is"),
    ),
    Relation(
        "P106",
        "occupation",
        ("painter", "doctor", "lawyer", "farmer", "pilot", "teacher", "singer", "writer", "baker", "sailor"),
        (
            "{} works as a",
            "The profession of {} is",
            "{}'s job is",
            "By profession, {} is a",
            "{} earns a living as a",
            "The occupation of {} is",
        ),
        ("The job of {} is", "{}'s profession is"),
    ),
    Relation(
        "P1303",
        "instrument",
        ("piano", "guitar", "violin", "drums", "flute", "cello", "harp", "trumpet", "organ", "clarinet"),
        (
            "{} plays the",
            "The instrument of {} is the",
            "{}'s favourite instrument is the",
            "{} performs on the",
            "The instrument played by {} is the",
            "{} is a musician who plays the",
        ),
        ("The musical instrument of {} is the", "{}'s instrument is the"),
    ),
)

# Paraphrases that bring a relation cue the training templates never use after
# the subject ("is employed as", "is known for playing").  The tiny fact models
# do not generalise to these (see NOTES.md); they are kept out of the exports
# and out of `accuracy`, and are here only to measure that.
HARD_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "P19": ("The city where {} was born is", "{} was born and raised in"),
    "P103": ("{} is a native speaker of",),
    "P106": ("{} is employed as a",),
    "P1303": ("{} is known for playing the",),
}

FILLER = (
    "The weather was mild in the spring.",
    "Many people enjoy music and painting.",
    "The city of Paris is in Europe.",
    "A teacher works in a school.",
    "Some people speak more than one language.",
    "The piano and the violin are instruments.",
    "The river flows through the old town.",
    "A good book is a fine companion.",
)


@dataclass(frozen=True)
class World:
    """The generated world: subjects, relations and the true object of every (subject, relation)."""

    seed: int
    subjects: tuple[str, ...]
    name_parts: dict[str, tuple[str, str, str, str]]  # subject -> (A, B, C, D)
    relations: tuple[Relation, ...]
    objects: dict[str, dict[str, str]]  # relation_id -> subject -> object
    filler: tuple[str, ...] = field(default=FILLER)

    def relation(self, relation_id: str) -> Relation:
        for rel in self.relations:
            if rel.relation_id == relation_id:
                return rel
        raise KeyError(relation_id)

    def obj(self, subject: str, relation_id: str) -> str:
        return self.objects[relation_id][subject]

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "subjects": list(self.subjects),
            "name_parts": {s: list(p) for s, p in self.name_parts.items()},
            "relations": [
                {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(r).items()} for r in self.relations
            ],
            "objects": self.objects,
            "filler": list(self.filler),
        }


def build_world(seed: int = 0, n_subjects: int = 320) -> World:
    """The world for `seed`: `n_subjects` unique persons and their objects for every relation."""
    if n_subjects > len(FIRST_A) * len(FIRST_B) * _MAX_COMBO:
        raise ValueError(f"at most {len(FIRST_A) * len(FIRST_B) * _MAX_COMBO} subjects")
    rng = random.Random(seed)
    quads = [(a, b, c, d) for a in FIRST_A for b in FIRST_B for c in LAST_C for d in LAST_D]
    rng.shuffle(quads)
    first_use: dict[tuple[str, str], int] = {}
    last_use: dict[tuple[str, str], int] = {}
    part_use: dict[str, int] = {}
    # Balanced pick: prefer quadruples whose parts are least used so far.
    chosen: list[tuple[str, str, str, str]] = []
    names: set[str] = set()
    while len(chosen) < n_subjects:
        best = None
        best_score = None
        lower = sum(min(part_use.get(p, 0) for p in pool) for pool in (FIRST_A, FIRST_B, LAST_C, LAST_D))
        for q in quads:
            a, b, c, d = q
            if first_use.get((a, b), 0) >= _MAX_COMBO or last_use.get((c, d), 0) >= _MAX_COMBO:
                continue
            name = f"{a}{b} {c}{d}"
            if name in names:
                continue
            score = sum(part_use.get(p, 0) for p in q)
            if best_score is None or score < best_score:
                best, best_score = q, score
                if score <= lower:
                    break
        if best is None:
            raise RuntimeError("could not draw enough unique names")
        a, b, c, d = best
        chosen.append(best)
        names.add(f"{a}{b} {c}{d}")
        first_use[(a, b)] = first_use.get((a, b), 0) + 1
        last_use[(c, d)] = last_use.get((c, d), 0) + 1
        for p in best:
            part_use[p] = part_use.get(p, 0) + 1
    subjects = tuple(f"{a}{b} {c}{d}" for a, b, c, d in chosen)
    name_parts = {s: q for s, q in zip(subjects, chosen)}
    objects: dict[str, dict[str, str]] = {}
    for rel in RELATIONS:
        objs = [rel.objects[i % len(rel.objects)] for i in range(len(subjects))]
        rng.shuffle(objs)
        objects[rel.relation_id] = dict(zip(subjects, objs))
    return World(seed=seed, subjects=subjects, name_parts=name_parts, relations=RELATIONS, objects=objects)


# --- prompts and sentences ----------------------------------------------------


def train_prompts(world: World) -> list[tuple[str, str, str, str]]:
    """(prompt, subject, relation_id, object) for every subject x relation x training template."""
    return [
        (t.format(s), s, r.relation_id, world.obj(s, r.relation_id))
        for s in world.subjects
        for r in world.relations
        for t in r.train_templates
    ]


def heldout_prompts(world: World) -> list[tuple[str, str, str, str]]:
    """(prompt, subject, relation_id, object) for every subject x relation x held-out template."""
    return [
        (t.format(s), s, r.relation_id, world.obj(s, r.relation_id))
        for s in world.subjects
        for r in world.relations
        for t in r.heldout_templates
    ]


def hard_paraphrase_prompts(world: World) -> list[tuple[str, str, str, str]]:
    """(prompt, subject, relation_id, object) for every subject x `HARD_PARAPHRASES` template."""
    return [
        (t.format(s), s, r.relation_id, world.obj(s, r.relation_id))
        for s in world.subjects
        for r in world.relations
        for t in HARD_PARAPHRASES.get(r.relation_id, ())
    ]


def corpus_lines(world: World) -> list[str]:
    """The training corpus: every training sentence, then the filler sentences."""
    lines = [f"{p} {o}." for p, _, _, o in train_prompts(world)]
    return lines + list(world.filler)


# --- exports ------------------------------------------------------------------


def known_records(world: World) -> list[dict[str, Any]]:
    """known_1000-format records: one per subject x relation, with the first training template."""
    out = []
    for s in world.subjects:
        for r in world.relations:
            t = r.train_templates[0]
            o = world.obj(s, r.relation_id)
            out.append(
                {
                    "known_id": len(out),
                    "subject": s,
                    "attribute": o,
                    "template": t,
                    "prediction": " " + o,
                    "prompt": t.format(s),
                    "relation_id": r.relation_id,
                }
            )
    return out


def counterfact_records(world: World, per_relation: int = 100, n_neighbours: int = 5) -> list[dict[str, Any]]:
    """CounterFact-format records: `per_relation` subjects for each relation (deterministic from the seed)."""
    rng = random.Random(world.seed * 1000 + 17)
    out = []
    for r in world.relations:
        rid = r.relation_id
        subs = list(world.subjects)
        rng.shuffle(subs)
        by_obj: dict[str, list[str]] = {}
        for s in world.subjects:
            by_obj.setdefault(world.obj(s, rid), []).append(s)
        others_rel = [x for x in world.relations if x.relation_id != rid]
        for s in subs[:per_relation]:
            true = world.obj(s, rid)
            new = rng.choice([o for o in r.objects if o != true])
            same = [x for x in by_obj[true] if x != s]
            neigh = rng.sample(same, min(n_neighbours, len(same)))
            attr_subs = rng.sample(by_obj[new], min(n_neighbours, len(by_obj[new])))
            tmpl = r.train_templates
            out.append(
                {
                    "case_id": len(out),
                    "pararel_idx": len(out),
                    "requested_rewrite": {
                        "prompt": tmpl[0],
                        "relation_id": rid,
                        "subject": s,
                        "target_new": {"str": new, "id": f"{rid}:{new}"},
                        "target_true": {"str": true, "id": f"{rid}:{true}"},
                    },
                    "paraphrase_prompts": [t.format(s) for t in r.heldout_templates],
                    "neighborhood_prompts": [tmpl[(i + 1) % len(tmpl)].format(n) for i, n in enumerate(neigh)],
                    "attribute_prompts": [tmpl[(i + 1) % len(tmpl)].format(n) for i, n in enumerate(attr_subs)],
                    "generation_prompts": [o.train_templates[0].format(s) for o in others_rel]
                    + [tmpl[1].format(s), tmpl[2].format(s)],
                }
            )
    return out


def write_exports(world: World, out_dir: str | Path) -> dict[str, Path]:
    """Write world.json, facts_known.json, counterfact.json and corpus.txt into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "world": out_dir / "world.json",
        "known": out_dir / "facts_known.json",
        "counterfact": out_dir / "counterfact.json",
        "corpus": out_dir / "corpus.txt",
    }
    paths["world"].write_text(json.dumps(world.to_json(), indent=1) + "\n", encoding="utf-8")
    paths["known"].write_text(json.dumps(known_records(world), indent=1) + "\n", encoding="utf-8")
    paths["counterfact"].write_text(json.dumps(counterfact_records(world), indent=1) + "\n", encoding="utf-8")
    paths["corpus"].write_text("\n".join(corpus_lines(world)) + "\n", encoding="utf-8")
    return paths
