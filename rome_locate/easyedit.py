"""Everything that touches EasyEdit: its import (with stand-ins for what ROME never runs), its hyperparameters,
its request format, and its BaseEditor with a layer per request. The only module that imports `easyeditor`.

A user's EasyEdit ROME script gets each request edited at its traced layer by
changing one line, its import:

    from easyeditor import BaseEditor, ROMEHyperParams          # before
    from rome_locate.easyedit import BaseEditor, ROMEHyperParams  # after

`ROMEHyperParams` here is EasyEdit's with each request's layer located when it is
edited (`LocatedROMEHyperParams`), `BaseEditor` EasyEdit's with the model's own
tokenizer and that per-request layer (`edit`, `edit_requests`, `sequential_edit`).

EasyEdit is found through `path`, the `EASYEDIT_PATH` environment variable (a
clone of its GitHub main) or the import path; see `import_easyedit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

import torch
from torch import nn

from .facts import Fact
from .hparams import to_dict
from .models import hidden_modules, hide_unloadable  # noqa: F401  (part of this module's API: EasyEdit users)
from .trace import TraceSettings

# Modules EasyEdit's package __init__ imports only for its multimodal, API and
# training methods; none is needed by ROME. On a CPU-only torch, torchvision's
# compiled ops fail to load, and other extras (higher, open_clip, ...) are often
# not installed, so `import easyeditor` fails. `import_easyedit(stub_missing=True)`
# puts empty stand-ins for exactly the modules that fail in sys.modules while
# EasyEdit's import runs, and removes them afterwards.
# Whatever else fails to import is stubbed too, except what ROME itself runs on.
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


# ---- EasyEdit's BaseEditor, with a layer per request ------------------------------------

# The request key that carries the layer a request is edited at. rome-locate sets it from its traced
# choices; a request without it is located when it is edited. It is left in the request, so EasyEdit's
# returned metrics ("requested_rewrite") show the layer each edit was made at.
LAYER_KEY = "layer"
# The names a user's EasyEdit script imports, served lazily (importing EasyEdit has side effects).
_EXPORTS = {"BaseEditor": "_editor_class", "ROMEHyperParams": "_located_class"}


def __getattr__(name: str) -> Any:
    # `from rome_locate.easyedit import BaseEditor, ROMEHyperParams`: EasyEdit is imported on first use only.
    if name in _EXPORTS:
        return globals()[_EXPORTS[name]]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_CLASSES: dict[str, type] = {}


def _located_class() -> type:
    """EasyEdit's ROMEHyperParams, plus trace settings: each request is edited at its own traced layer."""
    if "hparams" not in _CLASSES:
        import_easyedit()
        from easyeditor.models.rome.rome_hparams import ROMEHyperParams

        @dataclasses.dataclass
        class LocatedROMEHyperParams(ROMEHyperParams):
            """ROME hyperparameters whose `layers` is replaced, request by request, by the traced layer.

            A request's "layer" key wins; a request without one is traced on the
            model as it is when it is edited (ROME's causal tracing of MLP outputs at
            the last subject token, `rome_locate.locate`), with these settings.
            """

            trace_samples: int = 10
            trace_window: int = 10
            trace_noise: Any = "3sigma"
            trace_seed: int = 0

            def trace_settings(self) -> TraceSettings:
                """The TraceSettings requests are located with."""
                return TraceSettings(kind="mlp", samples=int(self.trace_samples), window=int(self.trace_window),
                                     noise=self.trace_noise, seed=int(self.trace_seed))

        _CLASSES["hparams"] = LocatedROMEHyperParams
    return _CLASSES["hparams"]


def located_hparams(hparams: Any, **fields: Any) -> Any:
    """LocatedROMEHyperParams with the values of `hparams` (ours or EasyEdit's) and `fields` set."""
    cls = _located_class()
    return cls(**{**to_dict(hparams), **fields})


def locate_request(model: nn.Module, tok: Any, request: dict[str, Any], settings: TraceSettings) -> int:
    """The traced layer of one EasyEdit request on the model as it is now."""
    from .locate import locate

    fact = Fact(prompt=request["prompt"], subject=request["subject"], target=request.get("ground_truth") or None,
                target_new=request.get("target_new"), id=str(request.get("case_id", "")))
    [(_, choice)] = locate(model, tok, [fact], settings, progress=False)
    return int(choice.layer)


def apply_located_rome(model: nn.Module, tok: Any, requests: Sequence[dict[str, Any]], hparams: Any,
                       **kwargs: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """EasyEdit's ALG_DICT entry for ROME at each request's own layer: same signature and result as
    `apply_rome_to_model`, which it calls with the request's layer in `layers`."""
    from easyeditor.models.rome.rome_hparams import ROMEHyperParams
    from easyeditor.models.rome.rome_main import apply_rome_to_model

    from .arch import arch_for, check_layer

    [request] = requests  # EasyEdit's ROME edits one request a call
    if request.get(LAYER_KEY) is None:
        request[LAYER_KEY] = locate_request(model, tok, request, hparams.trace_settings())
    layer = check_layer(request[LAYER_KEY], arch_for(model).n_layers, f"layer of request {request['prompt']!r}")
    plain = {f.name: getattr(hparams, f.name) for f in dataclasses.fields(ROMEHyperParams)}
    return apply_rome_to_model(model, tok, [request], ROMEHyperParams(**{**plain, "layers": [layer]}), **kwargs)


def _editor_class() -> type:
    """EasyEdit's BaseEditor that keeps the model's own tokenizer and edits each request at its own layer."""
    if "editor" not in _CLASSES:
        import_easyedit()
        from easyeditor import BaseEditor as EasyEditBaseEditor

        class BaseEditor(EasyEditBaseEditor):
            """EasyEdit's BaseEditor with two changes.

            - A model path is loaded with `AutoTokenizer` (the model's own tokenizer),
              not by model-name substring (EasyEdit loads GPT2Tokenizer for any path
              containing "gpt"); a preloaded `(model, tokenizer)` works as in EasyEdit,
              with `model_name` a string again afterwards.
            - With LocatedROMEHyperParams, each request is edited at its own layer
              (`apply_located_rome`), in `edit`, `edit_requests` and sequential editing.
            """

            def __init__(self, hparams: Any, name: str | None = None):
                model_name = hparams.model_name
                if isinstance(model_name, (str, Path)):
                    from .models import load_model

                    name = str(model_name)
                    model, tok = load_model(name, device="cpu")
                    hparams = dataclasses.replace(hparams, model_name=(model, tok))
                else:
                    model, tok = model_name
                    name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
                if tok.pad_token_id is None:  # as EasyEdit does for the families it loads itself
                    tok.pad_token_id = tok.eos_token_id
                super().__init__(hparams)
                # EasyEdit reads model_name as a string ('t5' in model_name.lower(), ...).
                self.model_name = name
                self.hparams = dataclasses.replace(hparams, model_name=name)
                if isinstance(hparams, _located_class()):
                    self.apply_algo = apply_located_rome

        _CLASSES["editor"] = BaseEditor
    return _CLASSES["editor"]


def easyedit_device(model: nn.Module) -> int | str:
    """EasyEdit's `device` field for where the model is: "cpu" or a CUDA index."""
    from .models import input_device

    device = input_device(model)
    return device.index or 0 if device.type == "cuda" else device.type


def _mean(values: Any) -> float | None:
    flat = []

    def walk(v: Any) -> None:
        if isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat.append(float(v))
        elif hasattr(v, "item"):
            flat.append(float(v.item()))

    walk(values)
    return sum(flat) / len(flat) if flat else None


def easyedit_metrics(metric: dict[str, Any]) -> dict[str, Any]:
    """EasyEdit's returned metrics of one request, reduced to plain numbers: pre/post rewrite_acc, rephrase_acc and
    locality (mean of its `*_acc` lists), and the layer EasyEdit edited at."""
    out: dict[str, Any] = {"layer": (metric.get("requested_rewrite") or {}).get(LAYER_KEY)}
    for stage in ("pre", "post"):
        m = metric.get(stage) or {}
        row = {key: _mean(m.get(key)) for key in ("rewrite_acc", "rephrase_acc") if key in m}
        loc = [v for k, v in (m.get("locality") or {}).items() if k.endswith("_acc")]
        if loc:
            row["locality"] = _mean([_mean(v) for v in loc])
        out[stage] = row
    return out


class EasyEditSession:
    """rome-locate's hand-off to EasyEdit: one BaseEditor over the loaded model and tokenizer, every fact at its
    own layer (carried in the request), EasyEdit's own metrics returned for each edit."""

    def __init__(self, model: nn.Module, tok: Any, hparams: Any, model_name: str, workdir: str | Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # EasyEdit runs inside workdir: a relative stats_dir would be read from there.
        h = located_hparams(hparams, model_name=(model, tok), device=easyedit_device(model),
                            stats_dir=str(Path(hparams.stats_dir).resolve()))
        with contextlib.chdir(self.workdir):  # EasyEdit's logs/ go into workdir
            self.editor = _editor_class()(h, name=model_name)

    @contextlib.contextmanager
    def edited(self, model: nn.Module, tok: Any, fact: Fact, hparams: Any, editor: str = "easyedit"):
        """Edit `fact` at `hparams.layers[0]` through BaseEditor.edit_requests; yield EasyEdit's metrics; restore."""
        if model is not self.editor.model:
            raise ValueError("EasyEditSession.edited: another model than the session's")
        request = {**easyedit_request(fact), LAYER_KEY: int(hparams.layers[0])}
        originals: dict[str, torch.Tensor] = {}
        try:
            with contextlib.chdir(self.workdir):
                # sequential_edit=True: EasyEdit keeps the edit; it is undone here, after rome-locate has measured.
                metrics, _, originals = self.editor.edit_requests([request], sequential_edit=True, verbose=False)
            yield easyedit_metrics(metrics[0])
        finally:
            from .rome import restore

            restore(model, originals or {})
