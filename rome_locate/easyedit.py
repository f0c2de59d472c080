"""Everything an EasyEdit user imports from rome-locate: the one-line change, EasyEdit's import, the hand-off.

A user's EasyEdit script gets each ROME or R-ROME request edited at the layer rome-locate's rule
(`rome_locate.choose.layer_rule`, mode traced) decides by changing one line, its import:

    from easyeditor import BaseEditor, ROMEHyperParams            # before
    from rome_locate.easyedit import BaseEditor, ROMEHyperParams  # after
    # also R_ROMEHyperParams, MEMITHyperParams, AlphaEditHyperParams

`ROMEHyperParams` (and `R_ROMEHyperParams`) here is EasyEdit's plus trace settings and the YAML's path: the
validation record `<yaml stem>.validation.json` beside the YAML gives the rule, the YAML's layer is its fallback.
`MEMITHyperParams` and `AlphaEditHyperParams` are EasyEdit's plus the YAML's path: their requests are edited as
EasyEdit edits them, in the YAML's window (`rome-locate hparams --alg MEMIT` writes a validated one). `BaseEditor`
is EasyEdit's with the model's own tokenizer, right padding for these four, the rule on every ROME and R-ROME
request (`edit`, `edit_requests`, `sequential_edit`), a window checked against the model before any edit, and
AlphaEdit's projection kept per model (`rome_locate.easyedit_alphaedit`). EasyEdit is found through `path`,
`$EASYEDIT_PATH` or the import path (`import_easyedit`).

The work lives below this module (each imports only those below it): `easyedit_import` (the only module that
imports `easyeditor`), `easyedit_requests`, `easyedit_hparams`, `easyedit_alphaedit`, `easyedit_editor`,
`easyedit_session` (rome-locate's `--editor easyedit`).
"""

from __future__ import annotations

import functools
from typing import Any

from .easyedit_alphaedit import apply_alphaedit, fresh_key_cache, projection_path  # noqa: F401 (API)
from .easyedit_editor import (DECISION_KEY, LOG, apply_located, apply_located_rome, decide_request,  # noqa: F401
                              editor_class, kept_requires_grad, load_for_hparams, trace_request)
from .easyedit_hparams import (ALGORITHMS, as_located, check_window, easyedit_hparams, located_hparams,  # noqa: F401
                               plugin_class, request_rule)
from .easyedit_import import EASYEDIT_NAMES, easyedit_name, import_easyedit, stubbed_modules  # noqa: F401 (API)
from .easyedit_requests import LAYER_KEY, batch_edit_kwargs, easyedit_metrics, easyedit_request  # noqa: F401
from .easyedit_session import EasyEditSession, easyedit_device, edited_weights  # noqa: F401 (API)
from .models import hidden_modules, hide_unloadable  # noqa: F401  (part of this module's API: EasyEdit users)

# The names a user's EasyEdit script imports, served lazily (importing EasyEdit has side effects).
_EXPORTS = {"BaseEditor": editor_class, **{ALGORITHMS[alg].easyedit_class: functools.partial(plugin_class, alg)
                                           for alg in ALGORITHMS}}


def __getattr__(name: str) -> Any:
    # `from rome_locate.easyedit import BaseEditor, ROMEHyperParams`: EasyEdit is imported on first use only.
    if name in _EXPORTS:
        return _EXPORTS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
