"""Everything that touches EasyEdit: its import (with stand-ins for what ROME never runs), its hyperparameters,
its request format, and its BaseEditor with the layer rule on every request. The only module that imports
`easyeditor`.

A user's EasyEdit ROME script gets each request edited at the layer rome-locate's rule
(`rome_locate.choose.layer_rule`, mode traced) decides by changing one line, its import:

    from easyeditor import BaseEditor, ROMEHyperParams          # before
    from rome_locate.easyedit import BaseEditor, ROMEHyperParams  # after

`ROMEHyperParams` here is EasyEdit's plus trace settings and the YAML's path (`LocatedROMEHyperParams`): the
validation record beside the YAML gives the rule, the YAML's layer is its fallback. `BaseEditor` is EasyEdit's with
the model's own tokenizer, right padding, and that rule on every request (`edit`, `edit_requests`,
`sequential_edit`). EasyEdit is found through `path`, `$EASYEDIT_PATH` or the import path (`import_easyedit`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import types
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .choose import LayerDecision, LayerRule
from .easyedit_requests import LAYER_KEY, easyedit_metrics, easyedit_request  # noqa: F401 (API)
from .facts import Fact
from .models import hidden_modules, hide_unloadable  # noqa: F401  (part of this module's API: EasyEdit users)
from .trace import TraceSettings

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


# ---- EasyEdit's BaseEditor, with the layer rule applied to every request ------------------------------

# A request's edit layer and the rule's decision (LayerDecision JSON), written into the editor's own copy of each
# request (so EasyEdit's "requested_rewrite" and logs/results.json show them) and each metrics entry, never into
# the caller's dicts. A request that comes with a "layer" is edited there (source "given").
DECISION_KEY = "layer_decision"
# The names a user's EasyEdit script imports, served lazily (importing EasyEdit has side effects).
_EXPORTS = {"BaseEditor": "_editor_class", "ROMEHyperParams": "_located_class"}
LOG = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    # `from rome_locate.easyedit import BaseEditor, ROMEHyperParams`: EasyEdit is imported on first use only.
    if name in _EXPORTS:
        return globals()[_EXPORTS[name]]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_CLASSES: dict[str, type] = {}


def _located_class() -> type:
    """EasyEdit's ROMEHyperParams plus trace settings and its YAML's path (the layer rule's record)."""
    if "hparams" not in _CLASSES:
        import_easyedit()
        from easyeditor.models.rome.rome_hparams import ROMEHyperParams

        @dataclasses.dataclass
        class LocatedROMEHyperParams(ROMEHyperParams):
            """ROME hyperparameters whose `layers[0]` is the fallback of the layer rule (`rome_locate.choose`).

            A request's "layer" key wins; one without is traced (MLP outputs at the last subject token, these
            settings) on the model as it is when it is edited, and edited where the rule decides: the validation
            record beside `hparams_path`, or the rule's documented defaults without one.
            """

            trace_samples: int = 10
            trace_window: int = 10
            trace_noise: Any = "3sigma"
            trace_seed: int = 0
            hparams_path: str | None = None  # the YAML read; its `<stem>.validation.json` gives the rule

            @classmethod
            def from_hparams(cls, hparams_name_or_path: str):
                """EasyEdit's from_hparams that remembers the YAML's path (the validation record beside it)."""
                path = str(hparams_name_or_path)
                path += "" if ".yaml" in path else ".yaml"  # as EasyEdit does
                if not Path(path).is_file():
                    raise FileNotFoundError(f"ROME hyperparameters not found: {path}")
                return dataclasses.replace(super().from_hparams(path), hparams_path=str(Path(path).resolve()))

            def trace_settings(self) -> TraceSettings:
                """The TraceSettings requests are located with."""
                return TraceSettings(kind="mlp", samples=int(self.trace_samples), window=int(self.trace_window),
                                     noise=self.trace_noise, seed=int(self.trace_seed))

        _CLASSES["hparams"] = LocatedROMEHyperParams
    return _CLASSES["hparams"]


def located_hparams(hparams: Any, **fields: Any) -> Any:
    """LocatedROMEHyperParams with the values of `hparams` (ours or EasyEdit's) and `fields` set."""
    # Field by field, not dataclasses.asdict: that would deep-copy a preloaded (model, tokenizer) model_name.
    values = {f.name: v if f.name == "model_name" else copy.deepcopy(v)
              for f in dataclasses.fields(hparams) for v in [getattr(hparams, f.name)]}
    return _located_class()(**{**values, **fields})


def request_rule(hparams: Any, n_layers: int) -> LayerRule:
    """The rule for requests edited with `hparams`: traced, fallback `layers[0]`, the record beside `hparams_path`."""
    from .choose import layer_rule

    return layer_rule("traced", int(hparams.layers[0]), n_layers, getattr(hparams, "hparams_path", None))


def trace_request(model: nn.Module, tok: Any, request: dict[str, Any], settings: TraceSettings) -> Any:
    """The trace (TraceResult) of one EasyEdit request on the model as it is now."""
    from .locate import locate

    if not request.get("subject"):
        raise ValueError(f"request {request.get('prompt')!r} has no subject: ROME needs one (edit(..., subject=...))")
    fact = Fact(prompt=request["prompt"], subject=request["subject"], target=request.get("ground_truth") or None,
                target_new=request.get("target_new"), id=str(request.get("case_id", "")))
    [(result, _)] = locate(model, tok, [fact], settings, progress=False)
    return result


def decide_request(model: nn.Module, tok: Any, request: dict[str, Any], hparams: Any, rule: LayerRule) -> LayerDecision:
    """Where one request is edited: its own "layer" (source given), else `rule` on its trace on the model now."""
    from .arch import arch_for, check_layer

    if request.get(LAYER_KEY) is not None:
        layer = check_layer(request[LAYER_KEY], arch_for(model).n_layers, f"layer of request {request['prompt']!r}")
        return LayerDecision(layer, "given", "the request's own layer")
    return rule.decide(trace_request(model, tok, request, hparams.trace_settings()).effects)


def apply_located_rome(model: nn.Module, tok: Any, requests: Sequence[dict[str, Any]], hparams: Any,
                       rule: LayerRule | None = None, **kwargs: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """EasyEdit's ALG_DICT entry for ROME at the layer `rule` decides (`decide_request`): `apply_rome_to_model` with
    that layer in `layers`. The layer and the decision are written into the request (BaseEditor passes a copy)."""
    from easyeditor.models.rome.rome_hparams import ROMEHyperParams
    from easyeditor.models.rome.rome_main import apply_rome_to_model

    from .arch import arch_for

    if len(requests) != 1:
        raise ValueError(f"apply_located_rome edits one request a call, as EasyEdit's ROME; got {len(requests)}")
    request = requests[0]
    if request.get(DECISION_KEY) is None:
        decision = decide_request(model, tok, request, hparams, rule or request_rule(hparams, arch_for(model).n_layers))
        # JSON, not the record: EasyEdit dumps its requests into logs/results.json.
        request[LAYER_KEY], request[DECISION_KEY] = decision.layer, decision.to_json()
    plain = {f.name: getattr(hparams, f.name) for f in dataclasses.fields(ROMEHyperParams)}
    layers = [int(request[DECISION_KEY]["layer"])]
    return apply_rome_to_model(model, tok, [request], ROMEHyperParams(**{**plain, "layers": layers}), **kwargs)


def load_for_hparams(hparams: Any) -> tuple[nn.Module, Any]:
    """(model, the model's own tokenizer) of `hparams.model_name` as EasyEdit loads it: float16 with `fp16`, spread
    by device_map "auto" with `model_parallel`, else on `device` (EasyEdit's reading: an int is a CUDA index)."""
    from easyeditor.util.device import normalize_device

    from .models import load_model

    name, dtype = str(hparams.model_name), "float16" if getattr(hparams, "fp16", False) else "float32"
    where: dict[str, Any] = {"device_map": "auto"}
    if not getattr(hparams, "model_parallel", False):
        device = normalize_device(getattr(hparams, "device", None))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"hyperparameters device: {hparams.device!r} is a CUDA device, but this torch sees "
                             f"none; set device: cpu")
        where = {"device": str(device)}
    try:
        return load_model(name, dtype=dtype, **where)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"model_name {name!r} of the hyperparameters: {exc}") from None


def _as_located(hparams: Any) -> tuple[Any, str | None]:
    """ROME hyperparameters of another class (EasyEdit's own) as LocatedROMEHyperParams, and that class's name."""
    if getattr(hparams, "alg_name", None) != "ROME" or isinstance(hparams, _located_class()):
        return hparams, None
    return located_hparams(hparams), f"{type(hparams).__module__}.{type(hparams).__name__}"


def _editor_class() -> type:
    """EasyEdit's BaseEditor that keeps the model's own tokenizer and applies the layer rule to every request."""
    if "editor" not in _CLASSES:
        import_easyedit()
        from easyeditor import BaseEditor as EasyEditBaseEditor

        from .arch import arch_for

        class BaseEditor(EasyEditBaseEditor):
            """EasyEdit's BaseEditor, for ROME with the layer rule of `rome_locate.choose` on every request.

            A model path is loaded with the model's own tokenizer (EasyEdit loads GPT2Tokenizer for any path with
            "gpt"), honouring `fp16`, `model_parallel` and `device`; a preloaded `(model, tokenizer)` works as in
            EasyEdit. For ROME the tokenizer pads on the right (EasyEdit's rule), a preloaded one too: its
            `padding_side` is set to "right". Every request of `edit` and `edit_requests` (sequential or not) is
            edited, on a copy, at the layer the rule decides (`apply_located_rome`); each metrics entry carries
            "layer" and "layer_decision". EasyEdit's own ROMEHyperParams are converted (no YAML path: the rule's
            defaults), which one logged warning says. `hparams.layers` is the YAML's until the first edit call,
            then the layers that call applied (sorted); the rule (`layer_rule`) keeps the YAML's as its fallback.
            Parameters keep their `requires_grad` flags (EasyEdit's ROME clears them).
            """

            def __init__(self, hparams: Any, name: str | None = None):
                hparams, converted = _as_located(hparams)
                if isinstance(hparams.model_name, (str, Path)):
                    name = str(hparams.model_name)
                    model, tok = load_for_hparams(hparams)
                    hparams = dataclasses.replace(hparams, model_name=(model, tok))
                else:
                    model, tok = hparams.model_name
                    name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
                if tok.pad_token_id is None:  # as EasyEdit does for the families it loads itself
                    tok.pad_token_id = tok.eos_token_id
                if getattr(hparams, "alg_name", None) == "ROME":
                    tok.padding_side = "right"  # EasyEdit's rule for ROME, whatever the tokenizer's default
                super().__init__(hparams)
                # EasyEdit reads model_name as a string ('t5' in model_name.lower(), ...).
                self.model_name = name
                self.hparams = dataclasses.replace(hparams, model_name=name)
                self.layer_rule: LayerRule | None = None
                if isinstance(hparams, _located_class()):
                    self.layer_rule = request_rule(hparams, arch_for(self.model).n_layers)
                    self.apply_algo = functools.partial(apply_located_rome, rule=self.layer_rule)
                if converted:
                    LOG.warning(f"rome_locate.easyedit.BaseEditor got {converted}, which does not know its YAML's "
                                f"path: no validation record is read, each request is edited by the rule "
                                f"{self.layer_rule.describe()}; import ROMEHyperParams from rome_locate.easyedit "
                                f"to apply the YAML's record")

            def edit_requests(self, requests, sequential_edit=False, verbose=True, test_generation=False, **kwargs):
                """EasyEdit's edit_requests on copies of `requests`, each at the rule's layer, with "layer" and
                "layer_decision" in its metrics entry; the caller's dicts and requires_grad flags are left as they
                were."""
                if self.layer_rule is None:
                    return super().edit_requests(requests, sequential_edit, verbose, test_generation, **kwargs)
                # A decision in a request (EasyEdit's returned "requested_rewrite" passed back) is decided anew.
                copies = [{k: v for k, v in copy.deepcopy(r).items() if k != DECISION_KEY} for r in requests]
                flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
                try:
                    metrics, model, weights = super().edit_requests(copies, sequential_edit, verbose,
                                                                    test_generation=test_generation, **kwargs)
                finally:
                    for n, p in self.model.named_parameters():
                        p.requires_grad_(flags.get(n, p.requires_grad))
                for entry, request in zip(metrics, copies):
                    entry[LAYER_KEY], entry[DECISION_KEY] = request.get(LAYER_KEY), request.get(DECISION_KEY)
                applied = sorted({r[LAYER_KEY] for r in copies if r.get(LAYER_KEY) is not None})
                if applied:
                    self.hparams = dataclasses.replace(self.hparams, layers=applied)
                return metrics, model, weights

        _CLASSES["editor"] = BaseEditor
    return _CLASSES["editor"]


def easyedit_device(model: nn.Module) -> int | str:
    """EasyEdit's `device` field for where the model is: "cpu" or a CUDA index."""
    from .models import input_device

    device = input_device(model)
    return device.index or 0 if device.type == "cuda" else device.type


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
