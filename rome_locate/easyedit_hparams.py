"""EasyEdit's hyperparameter classes for the algorithms of the hand-off (ROME, R-ROME, MEMIT, AlphaEdit): the
plugin's versions that remember their YAML, conversion to EasyEdit's own class by its field names, the layer rule of
a request and the check of a layer window against the model.

ROME and R-ROME edit one layer a request: their plugin class adds the trace settings a request is located with,
and the validation record `<yaml stem>.validation.json` beside the YAML gives the layer rule (the YAML's layer is
its fallback). MEMIT and AlphaEdit edit a window of layers, the YAML's: their plugin class only remembers the YAML's
path, so that a window the model does not have is an error naming the file.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple

from .arch import LayerRangeError
from .choose import LayerRule
from .easyedit_import import easyedit_name
from .trace import TraceSettings


class Algorithm(NamedTuple):
    """How the hand-off treats one EasyEdit algorithm."""

    easyedit_class: str  # EasyEdit's hyperparameter class (a name of easyedit_import.EASYEDIT_NAMES)
    located: bool  # one layer a request, decided by the layer rule; else the YAML's window for every request


ALGORITHMS = {
    "ROME": Algorithm("ROMEHyperParams", located=True),
    "R-ROME": Algorithm("R_ROMEHyperParams", located=True),
    "MEMIT": Algorithm("MEMITHyperParams", located=False),
    "AlphaEdit": Algorithm("AlphaEditHyperParams", located=False),
}
# EasyEdit pads these algorithms' tokenizers on the right (easyeditor/editors/editor.py, BaseEditor.__init__): their
# key and value positions are read as if padding were on the right.
RIGHT_PADDING_ALGS = ("ROME", "MEMIT", "EMMET", "EAMET", "R-ROME", "AlphaEdit", "CORE", "SPHERE")
# The plugin's fields beyond EasyEdit's: the trace a located request gets, and the YAML read.
_TRACE_FIELDS = (("trace_samples", int, 10), ("trace_window", int, 10), ("trace_noise", Any, "3sigma"),
                 ("trace_seed", int, 0))


def algorithm(alg_name: Any) -> Algorithm:
    """The hand-off's entry for `alg_name`; a ValueError naming the ones it knows otherwise."""
    if alg_name not in ALGORITHMS:
        raise ValueError(f"alg_name {alg_name!r}: the rome-locate hand-off knows {tuple(ALGORITHMS)}")
    return ALGORITHMS[alg_name]


def is_located(hparams: Any) -> bool:
    """Whether requests edited with `hparams` get a layer each (ROME, R-ROME) rather than the YAML's window."""
    entry = ALGORITHMS.get(getattr(hparams, "alg_name", None))
    return bool(entry and entry.located)


class _FromYaml:
    """from_hparams that remembers the YAML's path (mixed in before EasyEdit's class)."""

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str):
        """EasyEdit's from_hparams that remembers the YAML's path (its validation record, its name in errors)."""
        path = str(hparams_name_or_path)
        path += "" if ".yaml" in path else ".yaml"  # as EasyEdit does
        if not Path(path).is_file():
            raise FileNotFoundError(f"{cls.alg} hyperparameters not found: {path}")
        return dataclasses.replace(super().from_hparams(path), hparams_path=str(Path(path).resolve()))


class _Located(_FromYaml):
    """The trace settings of a located request."""

    def trace_settings(self) -> TraceSettings:
        """The TraceSettings requests are located with."""
        return TraceSettings(kind="mlp", samples=int(self.trace_samples), window=int(self.trace_window),
                             noise=self.trace_noise, seed=int(self.trace_seed))


_LOCATED_DOC = """EasyEdit's {base} whose `layers[0]` is the fallback of the layer rule (`rome_locate.choose`).

A request's "layer" key wins; one without is traced (MLP outputs at the last subject token, these settings) on the
model as it is when it is edited, and edited where the rule decides: the validation record beside `hparams_path`,
or the rule's documented defaults without one."""
_WINDOW_DOC = """EasyEdit's {base} that remembers its YAML (`hparams_path`): every request is edited in the YAML's
window `layers`, exactly as EasyEdit edits it."""


@functools.cache
def plugin_class(alg_name: str) -> type:
    """The plugin's hyperparameter class of `alg_name`: EasyEdit's plus `hparams_path` (and trace settings for
    ROME and R-ROME); EasyEdit is imported on first use."""
    entry = algorithm(alg_name)
    base = easyedit_name(entry.easyedit_class)
    extra = [("hparams_path", "str | None", dataclasses.field(default=None))]
    if entry.located:
        extra = [(name, kind, dataclasses.field(default=value)) for name, kind, value in _TRACE_FIELDS] + extra
    name = ("Located" if entry.located else "Yaml") + base.__name__
    doc = (_LOCATED_DOC if entry.located else _WINDOW_DOC).format(base=base.__name__)
    return dataclasses.make_dataclass(name, extra, bases=(_Located if entry.located else _FromYaml, base),
                                      namespace={"alg": alg_name, "__doc__": doc, "__module__": __name__})


def _values(hparams: Any, cls: type, fields: dict[str, Any]) -> dict[str, Any]:
    """`cls`'s fields from `hparams` (by name, any class) and `fields`; a ValueError naming what is missing."""
    # Field by field, not dataclasses.asdict: that would deep-copy a preloaded (model, tokenizer) model_name.
    values = {f.name: getattr(hparams, f.name) if f.name == "model_name" else copy.deepcopy(getattr(hparams, f.name))
              for f in dataclasses.fields(cls) if hasattr(hparams, f.name)}
    values.update(fields)
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(values))
    if missing:
        raise ValueError(f"{hparams.alg_name} hyperparameters ({type(hparams).__name__}) lack {missing}, fields of "
                         f"EasyEdit's {cls.__name__}")
    return values


def located_hparams(hparams: Any, **fields: Any) -> Any:
    """The plugin's class (`plugin_class`) with the values of `hparams` (ours or EasyEdit's) and `fields` set."""
    cls = plugin_class(fields.get("alg_name", hparams.alg_name))
    return cls(**_values(hparams, cls, fields))


def easyedit_hparams(hparams: Any, **fields: Any) -> Any:
    """EasyEdit's own class of `hparams.alg_name` with the values of `hparams` (ours or EasyEdit's), through its
    field names, and `fields` set."""
    cls = easyedit_name(algorithm(fields.get("alg_name", hparams.alg_name)).easyedit_class)
    return cls(**_values(hparams, cls, fields))


def as_located(hparams: Any) -> tuple[Any, str | None]:
    """ROME or R-ROME hyperparameters of another class (EasyEdit's own) as the plugin's, and that class's name;
    any other hyperparameters as they are."""
    if not is_located(hparams) or isinstance(hparams, plugin_class(hparams.alg_name)):
        return hparams, None
    return located_hparams(hparams), f"{type(hparams).__module__}.{type(hparams).__name__}"


def request_rule(hparams: Any, n_layers: int) -> LayerRule:
    """The rule for requests edited with `hparams`: traced, fallback `layers[0]`, the record beside `hparams_path`."""
    from .choose import layer_rule

    return layer_rule("traced", int(hparams.layers[0]), n_layers, getattr(hparams, "hparams_path", None))


def source_of(hparams: Any) -> str:
    """Where `hparams` come from, for errors: the YAML's path, or the class when it does not know its file."""
    path = getattr(hparams, "hparams_path", None)
    return str(path) if path else f"{hparams.alg_name} hyperparameters ({type(hparams).__name__}, file unknown)"


def check_window(hparams: Any, n_layers: int) -> None:
    """A one-line LayerRangeError naming the YAML when its window `layers` (or `v_loss_layer`, which MEMIT and
    AlphaEdit read at max(v_loss_layer, layer)) has a layer the model does not have: EasyEdit would fail mid-edit."""
    layers = list(hparams.layers)
    outside = [l for l in layers if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n_layers]
    if not layers or outside:
        what = f"layer {outside[0]!r}" if outside else "no layer"
        raise LayerRangeError(f"{source_of(hparams)}: layers {layers} has {what}, but the model has {n_layers} "
                              f"layers (0..{n_layers - 1}): set a window inside 0..{n_layers - 1} (rome-locate "
                              f"hparams --alg {hparams.alg_name} writes a validated one)")
    loss = getattr(hparams, "v_loss_layer", None)
    if loss is not None and not 0 <= int(loss) < n_layers:
        raise LayerRangeError(f"{source_of(hparams)}: v_loss_layer {loss} is not a layer of the model, which has "
                              f"{n_layers} layers (0..{n_layers - 1}): set v_loss_layer: {n_layers - 1}")
