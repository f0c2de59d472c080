"""The editing algorithms the built-in editor knows: a name (EasyEdit's `alg_name`) maps to how its YAML is loaded
and how it writes a batch of facts into a model.

ROME edits one fact per update (a batch is edited one fact after another, each at
the hyperparameters' layer); MEMIT and AlphaEdit write a whole batch in one update
over the YAML's window. Every `apply` returns the original weights it changed, so
`rome.restore` puts the model back bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .facts import Fact
from .hparams import HParamsError, load_hparams, read_yaml
from .memit import NullSpaceState, apply_memit
from .memit_hparams import load_memit_hparams
from .rome import apply_rome, restore


def _rome_batch(model: nn.Module, tok: Any, facts: Sequence[Fact], hparams: Any, *, seed: int = 0,
                info: dict | None = None, chat_template: bool = False,
                state: Any = None, z_cache: dict | None = None) -> dict[str, torch.Tensor]:
    originals: dict[str, torch.Tensor] = {}
    try:
        for fact in facts:
            for name, value in apply_rome(model, tok, fact, hparams, seed=seed, info=info,
                                          chat_template=chat_template).items():
                originals.setdefault(name, value)  # the weight before the first edit, not an edited one
    except BaseException:
        restore(model, originals)
        raise
    return originals


def _memit_batch(model: nn.Module, tok: Any, facts: Sequence[Fact], hparams: Any, *, seed: int = 0,
                 info: dict | None = None, chat_template: bool = False,
                 state: Any = None, z_cache: dict | None = None) -> dict[str, torch.Tensor]:
    return apply_memit(model, tok, facts, hparams, seed=seed, info=info, chat_template=chat_template,
                       z_cache=z_cache)


def _alphaedit_batch(model: nn.Module, tok: Any, facts: Sequence[Fact], hparams: Any, *, seed: int = 0,
                     info: dict | None = None, chat_template: bool = False,
                     state: Any = None, z_cache: dict | None = None) -> dict[str, torch.Tensor]:
    if state is None:
        raise ValueError("AlphaEdit needs the editor's NullSpaceState (its memory of the edits kept)")
    return apply_memit(model, tok, facts, hparams, seed=seed, info=info, chat_template=chat_template, state=state,
                       z_cache=z_cache)


@dataclass(frozen=True)
class Algorithm:
    """How one algorithm's hyperparameters load and how it edits a batch."""

    name: str
    window: bool  # edits a window of layers in one update (the YAML's layers), not one layer per fact
    load: Callable[[str | Path, int | None], Any]
    apply: Callable[..., dict[str, torch.Tensor]]
    state: Callable[[], Any] | None = None  # per-editor memory (AlphaEdit's null space and kept keys)


ALGORITHMS: dict[str, Algorithm] = {
    "ROME": Algorithm("ROME", False, lambda path, n: load_hparams(path, n, easyedit=False), _rome_batch),
    "MEMIT": Algorithm("MEMIT", True, lambda path, n: load_memit_hparams(path, n), _memit_batch),
    "AlphaEdit": Algorithm("AlphaEdit", True, lambda path, n: load_memit_hparams(path, n), _alphaedit_batch,
                           NullSpaceState),
}


def algorithm(hparams_or_name: Any) -> Algorithm:
    """The algorithm of these hyperparameters (their alg_name) or of that name; a ValueError lists the known ones."""
    name = hparams_or_name if isinstance(hparams_or_name, str) else getattr(hparams_or_name, "alg_name", None)
    if name not in ALGORITHMS:
        raise ValueError(f"alg_name must be one of {tuple(ALGORITHMS)} for the built-in editor, got {name!r}")
    return ALGORITHMS[name]


def load_any_hparams(path: str | Path, n_layers: int | None = None) -> Any:
    """Load a ROME, MEMIT or AlphaEdit YAML by the alg_name it holds (rome-locate's own dataclasses)."""
    where, config = read_yaml(path, "editing")
    name = config.get("alg_name")
    if name not in ALGORITHMS:
        raise HParamsError(f"{where}: alg_name must be one of {tuple(ALGORITHMS)}, got {name!r}")
    return ALGORITHMS[name].load(where, n_layers)


def is_window(hparams: Any) -> bool:
    """Whether these hyperparameters edit a window in one update (MEMIT, AlphaEdit) rather than one layer (ROME, and
    the one-layer algorithms only EasyEdit's editor knows, such as R-ROME)."""
    entry = ALGORITHMS.get(getattr(hparams, "alg_name", "ROME"))
    return bool(entry is not None and entry.window)
