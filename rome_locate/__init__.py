"""rome-locate: choose ROME's edit layer by causal tracing, write EasyEdit ROME hyperparameters, edit, evaluate.

The public API, stage by stage (facts → trace → layer choice → hyperparameters →
edit → evaluation → report). Names are imported on first use, so `import
rome_locate` and `rome-locate --help` stay instant and torch loads only when a
stage runs.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it, in the order data flows. The functions `locate` and `evaluate` share their
# modules' names, so they are imported from the modules (`from rome_locate.locate import locate`): importing a
# submodule rebinds the package attribute of the same name.
_EXPORTS = {
    "Fact": "facts", "Probe": "facts", "load_facts": "facts",
    "ModelFingerprint": "models", "fingerprint": "models", "load_model": "models", "LoadedModel": "models",
    "model_input": "prompts",
    "Arch": "arch", "arch_for": "arch",
    "TraceSettings": "trace", "TraceResult": "trace", "trace_fact": "trace",
    "LayerChoice": "choose", "DatasetChoice": "choose", "choose_layer": "choose", "choose_dataset_layer": "choose",
    "LayerRule": "choose", "LayerDecision": "choose", "layer_rule": "choose", "place": "choose",
    "RomeHParams": "hparams", "load_hparams": "hparams", "with_layer": "hparams", "generate_hparams": "hparams",
    "write_hparams": "hparams",
    "compute_mom2": "stats",
    "edited": "edit", "make_editor": "editors",
    "GenerationSettings": "outcome", "EvalRecord": "outcome", "summarize": "summary",
    "write_report": "report",
    "run_pipeline": "pipeline", "edit_facts": "pipeline",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rome_locate' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
