"""Everything that touches EasyEdit: its import (with stand-ins for what ROME never runs), its hyperparameters,
its request format and its ROME editor. The only module that imports `easyeditor`.

EasyEdit is found through `path`, the `EASYEDIT_PATH` environment variable (a
clone of its GitHub main) or the import path; see `import_easyedit`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import types
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .facts import Fact
from .hparams import to_dict

# Modules EasyEdit's package __init__ imports only for its multimodal, API and
# training methods; none is needed by ROME. On a CPU-only torch, torchvision's
# compiled ops fail to load, and other extras (higher, open_clip, ...) are often
# not installed, so `import easyeditor` fails. `import_easyedit(stub_missing=True)`
# puts empty stand-ins for exactly the modules that fail in sys.modules while
# EasyEdit's import runs, and removes them afterwards.
# Whatever else fails to import is stubbed too, except what ROME itself runs on.
_KNOWN_BROKEN = ("torchvision",)  # raises RuntimeError (not ModuleNotFoundError) on a CPU-only torch
_NEVER_STUB = ("torch", "transformers", "numpy", "yaml", "tqdm", "easyeditor", "tokenizers", "safetensors")


class _Stub(types.ModuleType):
    """A module whose every attribute is another stub (or a dummy class for capitalised names)."""

    __path__: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        if name[:1].isupper():
            # A class: subclassable, callable, and subscriptable (used in type annotations).
            value: Any = type(name, (), {"__init__": lambda self, *a, **k: None, "__module__": self.__name__,
                                         "__class_getitem__": classmethod(lambda cls, item: cls)})
        else:
            value = sys.modules.get(full) or _Stub(full)
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: Sequence[str]):
        self.roots = set(roots)
        self.made: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        self.made.append(spec.name)
        return _Stub(spec.name)

    def exec_module(self, module):
        pass


def _missing_roots(exc: BaseException) -> set[str]:
    roots: set[str] = set()
    chain: BaseException | None = exc
    while chain is not None:
        name = getattr(chain, "name", None)
        if isinstance(chain, ModuleNotFoundError) and name:
            roots.add(name.split(".")[0])
        for root in _KNOWN_BROKEN:
            if re.search(rf"\b{root}\b", str(chain)):
                roots.add(root)
        chain = chain.__cause__ or chain.__context__
    return roots - set(_NEVER_STUB)


def import_easyedit(path: str | Path | None = None, stub_missing: bool = True, max_tries: int = 30) -> types.ModuleType:
    """Import EasyEdit's `easyeditor` package from `path`, $EASYEDIT_PATH or the import path.

    When its import fails on a module that ROME does not use (torchvision on a
    CPU-only torch, an uninstalled extra), and `stub_missing` is on, the import is
    retried with an empty stand-in for that module, installed in sys.modules only
    for the duration of the import. Raises ImportError naming what is missing.
    Note: importing EasyEdit seeds the global RNGs (seed_everything(42)) and
    configures logging; that is EasyEdit's behaviour, not ours.
    """
    if "easyeditor.models.rome" in sys.modules and "easyeditor.editors.editor" in sys.modules:
        return sys.modules["easyeditor"]
    path = path or os.environ.get("EASYEDIT_PATH")
    if path:
        path = str(Path(path).expanduser().resolve())
        if not (Path(path) / "easyeditor" / "__init__.py").is_file():
            raise ImportError(f"EasyEdit not found at {path} (no easyeditor/__init__.py); set EASYEDIT_PATH to a clone")
        if path not in sys.path:
            sys.path.insert(0, path)
    stubbed: set[str] = set()
    finder = _StubFinder(())
    before = set(sys.modules)
    sys.meta_path.insert(0, finder)
    try:
        for _ in range(max_tries):
            try:
                module = importlib.import_module("easyeditor")
                importlib.import_module("easyeditor.models.rome")
                importlib.import_module("easyeditor.editors.editor")
                return module
            except Exception as exc:  # EasyEdit raises all kinds of errors on a broken optional import
                roots = _missing_roots(exc) - stubbed
                if not stub_missing or not roots:
                    raise ImportError(f"cannot import EasyEdit{' from ' + path if path else ''}: "
                                      f"{type(exc).__name__}: {exc}") from exc
                stubbed |= roots
                finder.roots = set(stubbed)
                # Drop the half-imported modules so the retry starts clean.
                for name in set(sys.modules) - before:
                    if name.split(".")[0] in stubbed or name.startswith("easyeditor"):
                        del sys.modules[name]
        raise ImportError(f"cannot import EasyEdit: still failing after stubbing {sorted(stubbed)}")
    finally:
        sys.meta_path.remove(finder)
        # The stand-ins served only EasyEdit's import; later code sees the real state.
        for name in finder.made:
            sys.modules.pop(name, None)
        _STUBBED[:] = sorted(stubbed)


_STUBBED: list[str] = []


def stubbed_modules() -> list[str]:
    """The top-level modules replaced by stand-ins during the last EasyEdit import."""
    return list(_STUBBED)


def easyedit_hparams(hparams: Any) -> Any:
    """EasyEdit's ROMEHyperParams with the same values (EasyEdit must be importable)."""
    import_easyedit()
    from easyeditor.models.rome.rome_hparams import ROMEHyperParams

    if isinstance(hparams, ROMEHyperParams):
        return hparams
    return ROMEHyperParams(**to_dict(hparams))


def easyedit_request(fact: Fact) -> dict[str, Any]:
    """The request dict EasyEdit's BaseEditor.edit_requests takes for one fact (targets without a leading space)."""
    request: dict[str, Any] = {"prompt": fact.prompt, "subject": fact.subject, "target_new": fact.target_new,
                               "ground_truth": fact.target or "<|unknown|>", "portability": {}, "locality": {}}
    if fact.rephrase_prompts:
        # EasyEdit's datasets carry one rephrasing a request (a list is scored against one target and fails).
        request["rephrase_prompt"] = fact.rephrase_prompts[0]
    pairs = [(p, a) for p, a in zip(fact.locality_prompts, fact.locality_answers) if a]
    if pairs:
        request["locality"] = {"neighborhood": {"prompt": [p for p, _ in pairs], "ground_truth": [a for _, a in pairs]}}
    return request


def apply_easyedit_rome(model: nn.Module, tok: Any, fact: Fact, hparams: Any) -> dict[str, torch.Tensor]:
    """Apply EasyEdit's ROME for one fact at `hparams.layers` in place; returns the original weights to restore."""
    import_easyedit()
    from easyeditor.models.rome.rome_main import apply_rome_to_model

    # EasyEdit's ROME prepends the space itself: target_new goes without one.
    request = {"prompt": fact.prompt, "subject": fact.subject, "target_new": fact.target_new}
    _, originals = apply_rome_to_model(model, tok, [request], easyedit_hparams(hparams), copy=False,
                                       return_orig_weights=True)
    return originals
