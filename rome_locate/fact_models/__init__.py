"""The shipped fact models: where they and their data live, and how to load them (the ROME settings that edit them
are the validated hparams/ROME/fact-*.yaml).

`train.py` rebuilds them (`python -m rome_locate.fact_models.train train gpt2`)
from the synthetic world of `world.py`; this module imports neither, so asking
for a path stays instant.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("gpt2", "llama")
ROOT = Path(__file__).resolve().parent

__all__ = ["FAMILIES", "corpus_path", "counterfact_path", "easyedit_path", "fact_model_dir", "facts_path",
           "load_fact_model", "world_path"]


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return family


def fact_model_dir(family: str) -> Path:
    """The shipped directory of one family (save_pretrained output plus the world's exports)."""
    return ROOT / _check_family(family)


def facts_path(family: str) -> Path:
    """known_1000-format facts of the world the model was trained on."""
    return fact_model_dir(family) / "facts_known.json"


def counterfact_path(family: str) -> Path:
    """CounterFact-format edit cases of the world the model was trained on."""
    return fact_model_dir(family) / "counterfact.json"


def easyedit_path(family: str) -> Path:
    """The CounterFact cases in EasyEdit's KnowEdit shape, with portability probes (`shapes.easyedit_records`)."""
    return fact_model_dir(family) / "easyedit.json"


def corpus_path(family: str) -> Path:
    """The plain-text training corpus, one sentence a line."""
    return fact_model_dir(family) / "corpus.txt"


def world_path(family: str) -> Path:
    """The world's description (seed, subjects, relations, objects) the model was trained on."""
    return fact_model_dir(family) / "world.json"


def load_fact_model(family: str, device: str = "cpu"):
    """(model, tokenizer) of the shipped model of `family`, loaded with from_pretrained (offline)."""
    from ..models import load_model

    return load_model(fact_model_dir(family), device=device, dtype="float32")
