"""Importing EasyEdit: its `easyeditor` package with stand-ins for the optional modules ROME-family editing never
runs, and the EasyEdit names the plugin uses. The only module that imports `easyeditor`; every other module asks
`easyedit_name` (which imports EasyEdit on first use: importing it seeds the RNGs and configures logging)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import types
from pathlib import Path
from typing import Any, Sequence

from .models import hidden_modules, hide_unloadable

# EasyEdit's package __init__ imports modules only its multimodal, API and training methods need: torchvision's
# compiled ops fail on a CPU-only torch, other extras (higher, open_clip, ...) are often not installed, so
# `import easyeditor` fails. `import_easyedit(stub_missing=True)` puts stand-ins for exactly the modules that fail
# in sys.modules while EasyEdit's import runs, and removes them afterwards; never what ROME itself runs on.
_KNOWN_BROKEN = ("torchvision",)  # raises RuntimeError (not ModuleNotFoundError) on a CPU-only torch
_NEVER_STUB = ("torch", "transformers", "numpy", "yaml", "tqdm", "easyeditor", "tokenizers", "safetensors")


class _StandInClass(type):
    """Metaclass of stand-in classes: any attribute (`InterpolationMode.NEAREST`) is another stand-in class."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = _stand_in_class(name, cls.__module__)
        setattr(cls, name, value)
        return value


def _stand_in_class(name: str, module: str) -> type:
    # Subclassable, callable, subscriptable (type annotations), and every attribute is a stand-in too.
    return _StandInClass(name, (), {"__init__": lambda self, *a, **k: None, "__module__": module,
                                    "__class_getitem__": classmethod(lambda cls, item: cls)})


class _Stub(types.ModuleType):
    """A module whose every attribute is another stub (or a stand-in class for capitalised names)."""

    __path__: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        value: Any = _stand_in_class(name, self.__name__) if name[:1].isupper() else (
            sys.modules.get(full) or _Stub(full))
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


def _uses_stand_in(module: Any) -> bool:
    # isinstance only: an attribute lookup could wake a lazy-import proxy (torch.onnx has some).
    values = getattr(module, "__dict__", {}).values()
    return any(isinstance(v, (_Stub, _StandInClass)) for v in list(values))


def import_easyedit(path: str | Path | None = None, stub_missing: bool = True, max_tries: int = 30) -> types.ModuleType:
    """Import EasyEdit's `easyeditor` package from `path`, $EASYEDIT_PATH or the import path.

    When its import fails on a module that ROME does not use (torchvision on a
    CPU-only torch, an uninstalled extra), and `stub_missing` is on, the import is
    retried with a stand-in for that module, installed only for the duration of
    the import. What stays changed for the rest of the process:
    - a torchvision that cannot load is hidden first (`hide_unloadable`), so that
      transformers can load models: `import torchvision` then raises
      ModuleNotFoundError;
    - the stand-ins leave sys.modules, and so does every module first imported
      during EasyEdit's import that took a stand-in (e.g. timm without
      torchvision): a later import of it fails as it would have without EasyEdit.
      EasyEdit's own modules keep their references (`stubbed_modules()` lists them).
    Raises ImportError naming what is missing. Note: importing EasyEdit seeds the
    global RNGs (seed_everything(42)) and configures logging; that is EasyEdit's
    behaviour, not ours.
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
    if stub_missing:
        hide_unloadable("torchvision")
    stubbed: set[str] = set()
    finder = _StubFinder(())
    before = set(sys.modules)
    # A hidden module (None in sys.modules) would stop the import before any finder is asked.
    hidden = {name for name, mod in sys.modules.items() if mod is None and name in hidden_modules()}
    for name in hidden:
        del sys.modules[name]
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
        new = [n for n in set(sys.modules) - before if not n.startswith("easyeditor")]
        tainted = {n.split(".")[0] for n in new if _uses_stand_in(sys.modules.get(n))}
        for name in new:
            if name.split(".")[0] in tainted:
                del sys.modules[name]
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]
        _STUBBED[:] = sorted(stubbed)


_STUBBED: list[str] = []


def stubbed_modules() -> list[str]:
    """The top-level modules replaced by stand-ins during the last EasyEdit import."""
    return list(_STUBBED)


# The EasyEdit names the plugin uses -> the module that defines each. Looked up at every call, not bound once, so a
# patch of EasyEdit's own module (a test's spy, a user's fix) is what runs.
EASYEDIT_NAMES = {
    "BaseEditor": "easyeditor.editors.editor",
    "ALG_DICT": "easyeditor.util.alg_dict",
    "normalize_device": "easyeditor.util.device",
    "ROMEHyperParams": "easyeditor.models.rome.rome_hparams",
    "R_ROMEHyperParams": "easyeditor.models.r_rome.r_rome_hparams",
    "MEMITHyperParams": "easyeditor.models.memit.memit_hparams",
    "AlphaEditHyperParams": "easyeditor.models.alphaedit.AlphaEdit_hparams",
    "apply_rome_to_model": "easyeditor.models.rome.rome_main",
    "apply_r_rome_to_model": "easyeditor.models.r_rome.r_rome_main",
    "apply_memit_to_model": "easyeditor.models.memit.memit_main",
    "apply_AlphaEdit_to_model": "easyeditor.models.alphaedit.AlphaEdit_main",
    "get_project": "easyeditor.models.alphaedit.AlphaEdit_main",
    "_prepare_requests": "easyeditor.editors.utils",
}


def easyedit_module(name: str) -> types.ModuleType:
    """The EasyEdit module that defines `name` (one of EASYEDIT_NAMES), EasyEdit imported first if it is not."""
    import_easyedit()
    return importlib.import_module(EASYEDIT_NAMES[name])


def easyedit_name(name: str) -> Any:
    """EasyEdit's object `name` (one of EASYEDIT_NAMES) as its module holds it now."""
    return getattr(easyedit_module(name), name)
