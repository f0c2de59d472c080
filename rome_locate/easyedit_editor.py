"""EasyEdit's BaseEditor of the one-line change: the model's own tokenizer, right padding for the ROME family,
every ROME and R-ROME request edited at the layer rome-locate's rule decides, MEMIT and AlphaEdit as EasyEdit edits
them in the YAML's window (checked against the model first; AlphaEdit's projection file kept per model).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .choose import LayerDecision, LayerRule
from .easyedit_alphaedit import apply_alphaedit, model_identity, projection_path
from .easyedit_hparams import (ALGORITHMS, RIGHT_PADDING_ALGS, as_located, check_window, easyedit_hparams,
                               is_located, request_rule)
from .easyedit_import import easyedit_name
from .easyedit_requests import LAYER_KEY
from .facts import Fact
from .trace import TraceSettings

# A request's edit layer and the rule's decision (LayerDecision JSON), written into the editor's own copy of each
# request (so EasyEdit's "requested_rewrite" and logs/results.json show them) and each metrics entry, never into
# the caller's dicts. A request that comes with a "layer" is edited there (source "given").
DECISION_KEY = "layer_decision"
# The EasyEdit function that edits one request at the layers it is given, for each located algorithm.
LOCATED_APPLY = {"ROME": "apply_rome_to_model", "R-ROME": "apply_r_rome_to_model"}
LOG = logging.getLogger("rome_locate.easyedit")  # the name users know: the one-line change's module


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


def apply_located(model: nn.Module, tok: Any, requests: Sequence[dict[str, Any]], hparams: Any,
                  rule: LayerRule | None = None, **kwargs: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """EasyEdit's ALG_DICT entry for ROME or R-ROME (`LOCATED_APPLY`) at the layer `rule` decides
    (`decide_request`), given to EasyEdit's own hyperparameters as `layers`. The layer and the decision are written
    into the request (BaseEditor passes a copy)."""
    from .arch import arch_for

    if len(requests) != 1:
        raise ValueError(f"{hparams.alg_name} edits one request a call in EasyEdit; got {len(requests)}")
    request = requests[0]
    if request.get(DECISION_KEY) is None:
        decision = decide_request(model, tok, request, hparams, rule or request_rule(hparams, arch_for(model).n_layers))
        # JSON, not the record: EasyEdit dumps its requests into logs/results.json.
        request[LAYER_KEY], request[DECISION_KEY] = decision.layer, decision.to_json()
    own = easyedit_hparams(hparams, layers=[int(request[DECISION_KEY]["layer"])])
    return easyedit_name(LOCATED_APPLY[hparams.alg_name])(model, tok, [request], own, **kwargs)


apply_located_rome = apply_located  # its name from before R-ROME


def load_for_hparams(hparams: Any) -> tuple[nn.Module, Any]:
    """(model, the model's own tokenizer) of `hparams.model_name` as EasyEdit loads it: float16 with `fp16`, spread
    by device_map "auto" with `model_parallel`, else on `device` (EasyEdit's reading: an int is a CUDA index)."""
    from .models import load_model

    name, dtype = str(hparams.model_name), "float16" if getattr(hparams, "fp16", False) else "float32"
    where: dict[str, Any] = {"device_map": "auto"}
    if not getattr(hparams, "model_parallel", False):
        device = easyedit_name("normalize_device")(getattr(hparams, "device", None))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"hyperparameters device: {hparams.device!r} is a CUDA device, but this torch sees "
                             f"none; set device: cpu")
        where = {"device": str(device)}
    try:
        return load_model(name, dtype=dtype, **where)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"model_name {name!r} of the hyperparameters: {exc}") from None


@contextlib.contextmanager
def kept_requires_grad(model: nn.Module) -> Iterator[None]:
    """Every parameter's requires_grad as it was after the block (EasyEdit's ROME family clears them all)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))


def _by_rule(editor: Any) -> Callable:
    return functools.partial(apply_located, rule=editor.layer_rule)


def _alphaedit(editor: Any) -> Callable:
    return apply_alphaedit


def _easyedit_own(editor: Any) -> Callable:
    return easyedit_name("ALG_DICT")[editor.alg_name]


# alg_name -> the editor's apply_algo; MEMIT (and any other algorithm) keeps EasyEdit's ALG_DICT entry.
APPLIERS: dict[str, Callable[[Any], Callable]] = {"ROME": _by_rule, "R-ROME": _by_rule, "AlphaEdit": _alphaedit}


def _configure(editor: Any, hparams: Any) -> None:
    """Make `editor` edit with `hparams`: its alg_name, apply_algo, layer rule (ROME, R-ROME), the window checked
    against the model (MEMIT, AlphaEdit), AlphaEdit's P_loc per model, right padding for the ROME family."""
    from .arch import arch_for

    # Only for the hand-off's algorithms: another method's model (T5, ...) may have no row in the architecture map.
    n_layers = arch_for(editor.model).n_layers if hparams.alg_name in ALGORITHMS else None
    if not is_located(hparams) and n_layers is not None:
        check_window(hparams, n_layers)
    if hparams.alg_name == "AlphaEdit":
        editor.identity = editor.identity or model_identity(editor.model)  # once: an edited model keeps its file
        hparams = dataclasses.replace(hparams, P_loc=str(projection_path(hparams, editor.identity, editor.workdir)))
    editor.hparams, editor.alg_name = dataclasses.replace(hparams, model_name=editor.model_name), hparams.alg_name
    editor.layer_rule = request_rule(hparams, n_layers) if is_located(hparams) else None
    editor.apply_algo = APPLIERS.get(hparams.alg_name, _easyedit_own)(editor)
    if hparams.alg_name in RIGHT_PADDING_ALGS:
        editor.tok.padding_side = "right"  # EasyEdit's rule for these, whatever the tokenizer's default


@functools.cache
def editor_class() -> type:
    """EasyEdit's BaseEditor that keeps the model's own tokenizer and applies the layer rule to every ROME and
    R-ROME request (`_configure`)."""
    base = easyedit_name("BaseEditor")

    class BaseEditor(base):
        """EasyEdit's BaseEditor, with the layer rule of `rome_locate.choose` on every ROME and R-ROME request.

        A model path is loaded with the model's own tokenizer (EasyEdit loads GPT2Tokenizer for any path with
        "gpt"), honouring `fp16`, `model_parallel` and `device`; a preloaded `(model, tokenizer)` works as in
        EasyEdit. For ROME, R-ROME, MEMIT and AlphaEdit the tokenizer pads on the right (EasyEdit's rule), a
        preloaded one too. Every request of `edit` and `edit_requests` (sequential or not) is edited, on a copy, at
        the layer the rule decides (`apply_located`); each metrics entry carries "layer" and "layer_decision".
        EasyEdit's own ROMEHyperParams (or R_ROMEHyperParams) are converted (no YAML path: the rule's defaults),
        which one logged warning says. `hparams.layers` is the YAML's until the first edit call, then the layers
        that call applied (sorted); the rule (`layer_rule`) keeps the YAML's as its fallback. MEMIT and AlphaEdit
        edit as EasyEdit does, in the YAML's window, which must be layers of the model (else a one-line error
        naming the YAML, before any edit); AlphaEdit's `P_loc` is a per-model file under `logs/alphaedit` of the
        folder the editor was made in unless the YAML sets another (`rome_locate.easyedit_alphaedit`).
        Parameters keep their `requires_grad` flags (EasyEdit's ROME family clears them).
        """

        def __init__(self, hparams: Any, name: str | None = None):
            hparams, converted = as_located(hparams)
            if isinstance(hparams.model_name, (str, Path)):
                name = str(hparams.model_name)
                model, tok = load_for_hparams(hparams)
                hparams = dataclasses.replace(hparams, model_name=(model, tok))
            else:
                model, tok = hparams.model_name
                name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
            if tok.pad_token_id is None:  # as EasyEdit does for the families it loads itself
                tok.pad_token_id = tok.eos_token_id
            super().__init__(hparams)
            # EasyEdit reads model_name as a string ('t5' in model_name.lower(), ...).
            self.model_name = name
            self.workdir = Path("logs").resolve()  # EasyEdit's own folder (make_logs), for AlphaEdit's P
            self.identity: tuple[str, str] | None = None
            self.layer_rule: LayerRule | None = None
            self.configure(hparams)
            if converted:
                LOG.warning(f"rome_locate.easyedit.BaseEditor got {converted}, which does not know its YAML's "
                            f"path: no validation record is read, each request is edited by the rule "
                            f"{self.layer_rule.describe()}; import {ALGORITHMS[self.alg_name].easyedit_class} from "
                            f"rome_locate.easyedit to apply the YAML's record")

        def configure(self, hparams: Any) -> None:
            """Edit with `hparams` from now on (same model): see `_configure`."""
            _configure(self, hparams)

        def edit_requests(self, requests, sequential_edit=False, verbose=True, test_generation=False, **kwargs):
            """EasyEdit's edit_requests; ROME and R-ROME on copies of `requests`, each at the rule's layer, with
            "layer" and "layer_decision" in its metrics entry; the caller's dicts and requires_grad flags are left
            as they were."""
            if self.layer_rule is None:
                with kept_requires_grad(self.model):
                    return super().edit_requests(requests, sequential_edit, verbose, test_generation, **kwargs)
            # A decision in a request (EasyEdit's returned "requested_rewrite" passed back) is decided anew.
            copies = [{k: v for k, v in copy.deepcopy(r).items() if k != DECISION_KEY} for r in requests]
            with kept_requires_grad(self.model):
                metrics, model, weights = super().edit_requests(copies, sequential_edit, verbose,
                                                                test_generation=test_generation, **kwargs)
            for entry, request in zip(metrics, copies):
                entry[LAYER_KEY], entry[DECISION_KEY] = request.get(LAYER_KEY), request.get(DECISION_KEY)
            applied = sorted({r[LAYER_KEY] for r in copies if r.get(LAYER_KEY) is not None})
            if applied:
                self.hparams = dataclasses.replace(self.hparams, layers=applied)
            return metrics, model, weights

        def batch_edit(self, *args, **kwargs):
            """EasyEdit's batch_edit (MEMIT, AlphaEdit: the YAML's window), requires_grad flags left as they were."""
            with kept_requires_grad(self.model):
                return super().batch_edit(*args, **kwargs)

    return BaseEditor
