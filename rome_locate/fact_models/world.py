"""A synthetic knowledge base, generated deterministically from a seed.

The world has invented persons (subjects), a few relations with small sets of
single-word objects, and templates: several *training* templates per relation
(the only ones the shipped fact models ever see) and *held-out* paraphrase
templates (never trained on, used to test generalisation and as CounterFact
paraphrase prompts).

Names are composed from shared pools of syllable chunks: first name = A+B,
last name = C+D ("Dorven Kaltmoor").  Subjects come in sibling groups of
`SIBLINGS` that share A, B and C and differ only in D, so the first three
tokens of a name leave `SIBLINGS` candidates and the subject is only
determined at its last token (the token ROME reads).  Every chunk is used by
many subjects, so no single rare sub-word identifies a subject either.
The A and C chunks end in distinct letters and the B and D chunks start with
distinct letters, so a BPE merge across a chunk boundary would identify one
(A, B) or (C, D) combination.  Each (A, B) first name belongs to one group only
(`SIBLINGS` subjects) and each (C, D) last name to at most `_MAX_LAST_COMBO`
subjects; both stay below the merge threshold of the tokenizer trainer of
`rome_locate.fact_models.train`, while every chunk is far above it.

No torch import here: this module is plain Python.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..records import Record

# --- name pools ---------------------------------------------------------------
# First-name openings (distinct final letters), first-name endings (distinct
# initial letters), last-name openings (distinct final letters), last-name
# endings (distinct initial letters).
FIRST_A = ("Dor", "Kep", "Mab", "Tav", "Bren", "Fad", "Jok", "Ris", "Vem", "Hag", "Pex", "Lut")
FIRST_B = ("ven", "ric", "ath", "olm", "zor", "isa", "emy", "dra", "gol", "sen", "lia", "wyn")
LAST_C = ("Kalt", "Brun", "Vos", "Hew", "Mar", "Gud", "Tam", "Orb", "Quig", "Dak", "Zev", "Pox")
LAST_D = ("moor", "wick", "quist", "aster", "feld", "nock", "lund", "stra", "jorn", "berg", "crest", "ivo")

SIBLINGS = 8  # subjects per (A, B, C) prefix; they differ only in D
_MAX_LAST_COMBO = 3  # at most this many subjects share one last name (C+D)


@dataclass(frozen=True)
class Relation(Record):
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
class WorldSpec:
    """What varies between worlds: the name-chunk pools, the relations and the filler sentences."""

    name: str
    first_a: tuple[str, ...]
    first_b: tuple[str, ...]
    last_c: tuple[str, ...]
    last_d: tuple[str, ...]
    relations: tuple[Relation, ...]
    filler: tuple[str, ...]
    seed: int = 0


DEFAULT = WorldSpec("default", FIRST_A, FIRST_B, LAST_C, LAST_D, RELATIONS, FILLER, seed=0)

# A separate world (other names, relations, templates and seed) for checking that a method
# tuned on the shipped pair of fact models is not tuned to their world.  Same shape as the
# default (12 chunks per pool with distinct boundary letters, 4 relations x 6 training + 2
# held-out templates), so the tokenizer thresholds of `train` hold unchanged.
WORLD3 = WorldSpec(
    "world3",
    ("Qal", "Nim", "Wor", "Sev", "Gru", "Yat", "Ceb", "Hux", "Pid", "Lof", "Zan", "Ebo"),
    ("bex", "dusk", "fion", "marr", "vash", "zell", "kett", "pira", "wend", "stov", "gally", "trim"),
    ("Thal", "Brom", "Kriv", "Sund", "Welt", "Gorw", "Nox", "Fenk", "Lob", "Huz", "Yarn", "Crej"),
    ("ovich", "hurst", "ane", "ello", "nuss", "mont", "sby", "dahl", "ton", "worth", "ivel", "gaard"),
    (
        Relation(
            "R1", "favourite colour",
            ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown", "grey"),
            ("{}'s favourite colour is", "The preferred colour of {} is", "{} always dresses in",
             "{} paints every wall", "The colour that {} likes best is", "{} likes the colour"),
            ("The favourite colour of {} is", "{}'s preferred colour is"),
        ),
        Relation(
            "R2", "pet",
            ("dog", "cat", "horse", "parrot", "rabbit", "goat", "hamster", "turtle", "ferret", "lizard"),
            ("{} owns a pet", "The pet of {} is a", "{}'s companion animal is a", "{} takes care of a",
             "At home, {} keeps a", "The animal living with {} is a"),
            ("{}'s pet is a", "The companion animal of {} is a"),
        ),
        Relation(
            "R3", "sport",
            ("tennis", "football", "chess", "golf", "rugby", "hockey", "cricket", "boxing", "rowing", "skiing"),
            ("{} plays", "The sport of {} is", "{}'s favourite game is", "Every weekend {} practises",
             "{} is a champion of", "The game {} loves is"),
            ("{}'s sport is", "The favourite game of {} is"),
        ),
        Relation(
            "R4", "country of residence",
            ("Norway", "Chile", "Egypt", "Japan", "Canada", "Kenya", "Peru", "Mexico", "Brazil", "India",
             "Nepal", "Iceland"),
            ("{} lives in", "The country of {} is", "{}'s home country is", "{} has settled in",
             "{} resides in", "The country where {} lives is"),
            ("{}'s country is", "The home country of {} is"),
        ),
    ),
    (
        "The harbour was quiet in the morning.",
        "Children like to play games outside.",
        "A dog and a cat can be friends.",
        "Snow falls in Norway in winter.",
        "Green is the colour of grass.",
        "Tennis is played with a racket.",
        "The train left the station at noon.",
        "An old map hangs on the wall.",
    ),
    seed=3,
)
WORLDS = {spec.name: spec for spec in (DEFAULT, WORLD3)}


def world_spec(name: str) -> WorldSpec:
    """The named world specification (`default` or `world3`)."""
    if name not in WORLDS:
        raise ValueError(f"world must be one of {sorted(WORLDS)}, got {name!r}")
    return WORLDS[name]


@dataclass(frozen=True)
class World(Record):
    """The generated world: subjects, relations and the true object of every (subject, relation)."""

    seed: int
    subjects: tuple[str, ...]
    name_parts: dict[str, tuple[str, str, str, str]]  # subject -> (A, B, C, D)
    relations: tuple[Relation, ...]
    objects: dict[str, dict[str, str]]  # relation_id -> subject -> object
    filler: tuple[str, ...] = field(default=FILLER)
    spec: str = "default"

    def relation(self, relation_id: str) -> Relation:
        for rel in self.relations:
            if rel.relation_id == relation_id:
                return rel
        raise KeyError(relation_id)

    def obj(self, subject: str, relation_id: str) -> str:
        return self.objects[relation_id][subject]



def _template_text(spec: WorldSpec = DEFAULT) -> str:
    # Only text repeated for every subject (training templates, objects) is frequent in the corpus.
    return " ".join(t for r in spec.relations for t in r.train_templates + r.objects).lower()


def _clean_first_names(spec: WorldSpec = DEFAULT) -> set[tuple[str, str]]:
    """(A, B) whose boundary letter pair occurs in no training-template or object word.

    A first name is used by a whole sibling group, so a boundary pair that the
    templates make frequent ("ge" of "language" in "Hag|emy") would be merged
    by BPE and cut the name across the chunk boundary ("ĠH|age|m|y").
    """
    text = _template_text(spec)
    return {(a, b) for a in spec.first_a for b in spec.first_b if (a[-1] + b[0]).lower() not in text}


def _draw_prefixes(rng: random.Random, n_groups: int, spec: WorldSpec = DEFAULT) -> list[tuple[str, str, str]]:
    """`n_groups` (A, B, C) prefixes: each pool used evenly, each clean (A, B) first name at most once."""
    FIRST_A, FIRST_B, LAST_C = spec.first_a, spec.first_b, spec.last_c
    clean = _clean_first_names(spec)
    a_s = [FIRST_A[i % len(FIRST_A)] for i in range(n_groups)]
    # Every B `base` times; the remainder goes to the B's that fit the most A's
    # ("emy" fits only 3 A's cleanly, so it cannot take a 4th group).
    fits = {b: sum(1 for a in FIRST_A if (a, b) in clean) for b in FIRST_B}
    base, extra = divmod(n_groups, len(FIRST_B))
    roomy = sorted(FIRST_B, key=lambda b: (-fits[b], rng.random()))[:extra]
    b_s = [b for b in FIRST_B for _ in range(base + (b in roomy))]
    c_s = [LAST_C[i % len(LAST_C)] for i in range(n_groups)]
    rng.shuffle(a_s)
    rng.shuffle(b_s)
    rng.shuffle(c_s)

    def ok(i: int) -> bool:
        pair = (a_s[i], b_s[i])
        return pair in clean and sum(1 for k in range(n_groups) if (a_s[k], b_s[k]) == pair) == 1

    def n_bad() -> int:
        return sum(1 for i in range(n_groups) if not ok(i))

    # Repair by swaps of B between groups (the pool counts, i.e. evenness, never
    # change); a swap is kept unless it makes more groups bad.
    bad = n_bad()
    for _ in range(200 * n_groups):
        if not bad:
            return list(zip(a_s, b_s, c_s))
        i = rng.choice([k for k in range(n_groups) if not ok(k)])
        j = rng.randrange(n_groups)
        b_s[i], b_s[j] = b_s[j], b_s[i]
        now = n_bad()
        if now > bad:
            b_s[i], b_s[j] = b_s[j], b_s[i]
        else:
            bad = now
    raise RuntimeError(f"could not draw {n_groups} distinct first names")


def build_world(seed: int = 0, n_subjects: int = 320, spec: WorldSpec = DEFAULT) -> World:
    """The world for `seed`: `n_subjects` unique persons (sibling groups of `SIBLINGS`) and their objects."""
    LAST_D, RELATIONS = spec.last_d, spec.relations
    most = len(_clean_first_names(spec)) * SIBLINGS
    if n_subjects % SIBLINGS or not 0 < n_subjects <= most:
        raise ValueError(f"n_subjects must be a positive multiple of {SIBLINGS} up to {most}, got {n_subjects}")
    rng = random.Random(seed)
    d_use = {d: 0 for d in LAST_D}
    last_use: dict[tuple[str, str], int] = {}
    chosen: list[tuple[str, str, str, str]] = []
    for a, b, c in _draw_prefixes(rng, n_subjects // SIBLINGS, spec):
        # Least-used endings first (random tie-break) keeps every D evenly shared.
        order = sorted(LAST_D, key=lambda d: (d_use[d], last_use.get((c, d), 0), rng.random()))
        ds = [d for d in order if last_use.get((c, d), 0) < _MAX_LAST_COMBO][:SIBLINGS]
        if len(ds) < SIBLINGS:
            raise RuntimeError(f"could not find {SIBLINGS} endings for prefix {a}{b} {c}")
        for d in ds:
            chosen.append((a, b, c, d))
            d_use[d] += 1
            last_use[(c, d)] = last_use.get((c, d), 0) + 1
    # Shuffled so that any slice of the subjects (e.g. the first facts) spans many groups.
    rng.shuffle(chosen)
    subjects = tuple(f"{a}{b} {c}{d}" for a, b, c, d in chosen)
    name_parts = {s: q for s, q in zip(subjects, chosen)}
    objects: dict[str, dict[str, str]] = {}
    for rel in RELATIONS:
        objs = [rel.objects[i % len(rel.objects)] for i in range(len(subjects))]
        rng.shuffle(objs)
        objects[rel.relation_id] = dict(zip(subjects, objs))
    return World(seed=seed, subjects=subjects, name_parts=name_parts, relations=RELATIONS, objects=objects,
                 filler=spec.filler, spec=spec.name)


# --- prompts and sentences ----------------------------------------------------


def _prompts(world: World, templates_of) -> list[tuple[str, str, str, str]]:
    return [
        (t.format(s), s, r.relation_id, world.obj(s, r.relation_id))
        for s in world.subjects
        for r in world.relations
        for t in templates_of(r)
    ]


def train_prompts(world: World) -> list[tuple[str, str, str, str]]:
    """(prompt, subject, relation_id, object) for every subject x relation x training template."""
    return _prompts(world, lambda r: r.train_templates)


def heldout_prompts(world: World) -> list[tuple[str, str, str, str]]:
    """(prompt, subject, relation_id, object) for every subject x relation x held-out template."""
    return _prompts(world, lambda r: r.heldout_templates)


def hard_paraphrase_prompts(world: World) -> list[tuple[str, str, str, str]]:
    """(prompt, subject, relation_id, object) for every subject x `HARD_PARAPHRASES` template."""
    return _prompts(world, lambda r: HARD_PARAPHRASES.get(r.relation_id, ()))


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
