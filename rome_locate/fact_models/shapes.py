"""The world's CounterFact cases in EasyEdit's KnowEdit shape, with portability probes (`easyedit.json` beside each
shipped model): what the demo edits, so its report shows portability beside efficacy, paraphrase and locality.

The synthetic world has no aliases and no two-hop facts, so its portability keys say what they are:
`other_phrasing` asks for target_new through two of the relation's other training templates (phrasings the model
learnt the true answer with), `hard_paraphrase` through the relation's hard paraphrases (`world.HARD_PARAPHRASES`,
cues the tiny models never saw and do not generalise to). Locality is CounterFact's neighbourhood, unchanged, so
the CounterFact figures of a case are the same from either file. Plain Python, no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import world as W
from .world import HARD_PARAPHRASES, World, counterfact_records

OTHER_PHRASINGS = 2  # training templates per case asked as `other_phrasing`


def _probes(prompts: list[str], answer: str) -> list[dict[str, Any]]:
    return [{"prompt": p, "ground_truth": answer} for p in prompts]


def easyedit_record(world: World, case: dict[str, Any]) -> dict[str, Any]:
    """One CounterFact case of `world` as a KnowEdit-shaped record with its portability probes."""
    rw = case["requested_rewrite"]
    subject, new, true = rw["subject"], rw["target_new"]["str"], rw["target_true"]["str"]
    rel = world.relation(rw["relation_id"])
    others = [t for t in rel.train_templates if t != rw["prompt"]][:OTHER_PHRASINGS]
    return {
        "case_id": case["case_id"], "subject": subject, "prompt": rw["prompt"].format(subject), "target_new": new,
        "ground_truth": true, "rephrase_prompts": list(case["paraphrase_prompts"]),
        "relation_id": rel.relation_id,
        "portability": {
            "other_phrasing": _probes([t.format(subject) for t in others], new),
            "hard_paraphrase": _probes([t.format(subject) for t in HARD_PARAPHRASES.get(rel.relation_id, ())], new),
        },
        # CounterFact's neighbours share the edited subject's true object.
        "locality": {"neighborhood": _probes(list(case["neighborhood_prompts"]), true)},
    }


def easyedit_records(world: World) -> list[dict[str, Any]]:
    """Every CounterFact case of `world` (`world.counterfact_records`, same order) as `easyedit_record` gives it."""
    return [easyedit_record(world, case) for case in counterfact_records(world)]


def write_exports(world: World, out_dir: str | Path) -> dict[str, Path]:
    """Write world.json, facts_known.json, counterfact.json, easyedit.json and corpus.txt into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "world": out_dir / "world.json",
        "known": out_dir / "facts_known.json",
        "counterfact": out_dir / "counterfact.json",
        "easyedit": out_dir / "easyedit.json",
        "corpus": out_dir / "corpus.txt",
    }
    paths["world"].write_text(json.dumps(world.to_json(), indent=1) + "\n", encoding="utf-8")
    paths["known"].write_text(json.dumps(W.known_records(world), indent=1) + "\n", encoding="utf-8")
    paths["counterfact"].write_text(json.dumps(W.counterfact_records(world), indent=1) + "\n", encoding="utf-8")
    paths["easyedit"].write_text(json.dumps(easyedit_records(world), indent=1) + "\n", encoding="utf-8")
    paths["corpus"].write_text("\n".join(W.corpus_lines(world)) + "\n", encoding="utf-8")
    return paths
