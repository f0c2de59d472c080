"""rome-locate's hand-off to EasyEdit (`--editor easyedit`): one BaseEditor of the one-line change over the model and
tokenizer rome-locate loaded; inside a block, one fact or a batch of facts edited through it, EasyEdit's own metrics
yielded, and every weight the edit changed restored bit-identically when the block ends (also on an exception).

A batch (`edited_batch`) of MEMIT or AlphaEdit facts is ONE EasyEdit `batch_edit` over all of them, with EasyEdit's
own hyperparameter class and `batch_size` the number of facts (one update in the window); a batch of ROME or R-ROME
facts is edited one fact after another at the hyperparameters' layer, each edit kept until the block ends. EasyEdit
measures each request right after the update that contains it: for ROME and R-ROME, before the later facts of the
batch are edited.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .easyedit_alphaedit import fresh_key_cache, is_default_p_loc
from .easyedit_editor import editor_class, kept_requires_grad
from .easyedit_hparams import easyedit_hparams, is_located, located_hparams
from .easyedit_requests import LAYER_KEY, batch_edit_kwargs, easyedit_metrics, easyedit_request
from .facts import Fact


def easyedit_device(model: nn.Module) -> int | str:
    """EasyEdit's `device` field for where the model is: "cpu" or a CUDA index."""
    from .models import input_device

    device = input_device(model)
    return device.index or 0 if device.type == "cuda" else device.type


def _one_after_another(editor: Any, requests: list[dict], hparams: Any) -> list[dict]:
    """ROME, R-ROME: each request at the hyperparameters' layer, in order, every edit kept (edit_requests)."""
    layer = int(hparams.layers[0])
    metrics, _, _ = editor.edit_requests([{**r, LAYER_KEY: layer} for r in requests], sequential_edit=True,
                                         verbose=False)
    return metrics


def _all_at_once(editor: Any, requests: list[dict], hparams: Any) -> list[dict]:
    """MEMIT, AlphaEdit: one batch_edit, all requests in one chunk (batch_size: their number), the edit kept."""
    editor.hparams = dataclasses.replace(editor.hparams, batch_size=len(requests))
    metrics, _, _ = editor.batch_edit(**batch_edit_kwargs(requests), sequential_edit=True, verbose=False)
    return metrics


# alg_name -> how a batch of requests is edited.
BATCH_RUNS: dict[str, Callable[[Any, list[dict], Any], list[dict]]] = {
    "ROME": _one_after_another, "R-ROME": _one_after_another, "MEMIT": _all_at_once, "AlphaEdit": _all_at_once}
# alg_name -> the EasyEdit state a batch gets for itself: AlphaEdit's cache of earlier keys starts empty (the batch
# is edited on the unedited model) and is put back afterwards.
BATCH_STATE: dict[str, Callable[[], contextlib.AbstractContextManager]] = {"AlphaEdit": fresh_key_cache}


def edited_weights(hparams: Any) -> list[str]:
    """The weights an edit with `hparams` writes: the rewrite module of its layer (ROME, R-ROME) or of every layer
    of its window (MEMIT, AlphaEdit; memit_main and AlphaEdit_main write exactly these)."""
    layers = list(hparams.layers)[:1] if is_located(hparams) else list(hparams.layers)
    return sorted({f"{hparams.rewrite_module_tmp.format(layer)}.weight" for layer in layers})


class EasyEditSession:
    """rome-locate's hand-off to EasyEdit: one BaseEditor over the loaded model and tokenizer, each ROME fact at its
    own layer (carried in the request), MEMIT and AlphaEdit batches in their window, EasyEdit's own metrics
    returned for each edit. EasyEdit runs inside `workdir` (its logs/, AlphaEdit's projection files)."""

    def __init__(self, model: nn.Module, tok: Any, hparams: Any, model_name: str, workdir: str | Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        own = self._own(model, tok, hparams)
        with contextlib.chdir(self.workdir):  # EasyEdit's logs/ go into workdir
            self.editor = editor_class()(own, name=model_name)

    @staticmethod
    def _own(model: nn.Module, tok: Any, hparams: Any) -> Any:
        """`hparams` for the editor: the plugin's class (ROME, R-ROME) or EasyEdit's own (MEMIT, AlphaEdit), the
        loaded model, its device, and paths absolute (EasyEdit runs inside workdir; a relative path is the
        caller's)."""
        fields: dict[str, Any] = {"model_name": (model, tok), "device": easyedit_device(model),
                                  "stats_dir": str(Path(hparams.stats_dir).resolve())}
        if not is_default_p_loc(getattr(hparams, "P_loc", None)):
            fields["P_loc"] = str(Path(hparams.P_loc).resolve())
        return (located_hparams if is_located(hparams) else easyedit_hparams)(hparams, **fields)

    def _check(self, model: nn.Module, what: str) -> None:
        if model is not self.editor.model:
            raise ValueError(f"EasyEditSession.{what}: another model than the session's")

    @contextlib.contextmanager
    def edited(self, model: nn.Module, tok: Any, fact: Fact, hparams: Any, editor: str = "easyedit"):
        """Edit `fact` at `hparams.layers[0]` through BaseEditor.edit_requests; yield EasyEdit's metrics; restore.
        MEMIT and AlphaEdit hyperparameters: a batch of one (`edited_batch`) in their window."""
        if not is_located(hparams):
            with self.edited_batch(model, tok, [fact], hparams) as batch:
                yield {**batch["metrics"][0], "layers": batch["layers"]}
            return
        self._check(model, "edited")
        request = {**easyedit_request(fact), LAYER_KEY: int(hparams.layers[0])}
        originals: dict[str, torch.Tensor] = {}
        try:
            with contextlib.chdir(self.workdir):
                self.editor.configure(self._own(model, tok, hparams))
                # sequential_edit=True: EasyEdit keeps the edit; it is undone here, after rome-locate has measured.
                metrics, _, originals = self.editor.edit_requests([request], sequential_edit=True, verbose=False)
            yield easyedit_metrics(metrics[0])
        finally:
            from .rome import restore

            restore(model, originals or {})

    @contextlib.contextmanager
    def edited_batch(self, model: nn.Module, tok: Any, facts: Sequence[Fact], hparams: Any) -> Iterator[Mapping]:
        """Edit all `facts` together (see the module's docstring); yield {"alg_name", "layers", "metrics": EasyEdit's
        metrics of each fact, in the facts' order (`easyedit_metrics`)}; restore every changed weight and the
        requires_grad flags bit-identically when the block ends."""
        from .models import weight_value
        from .rome import restore

        self._check(model, "edited_batch")
        own = self._own(model, tok, hparams)
        run = BATCH_RUNS[own.alg_name]
        layers = list(own.layers)[:1] if is_located(own) else list(own.layers)
        requests = [easyedit_request(f) for f in facts]
        with contextlib.chdir(self.workdir):
            self.editor.configure(own)  # the window is checked here, before any weight is read
        originals = {name: weight_value(model, name) for name in edited_weights(own)}
        try:
            metrics: list[dict] = []
            if requests:
                with kept_requires_grad(model), contextlib.chdir(self.workdir), \
                        BATCH_STATE.get(own.alg_name, contextlib.nullcontext)():
                    metrics = run(self.editor, requests, own)
            yield {"alg_name": own.alg_name, "layers": layers, "metrics": [easyedit_metrics(m) for m in metrics]}
        finally:
            restore(model, originals)
