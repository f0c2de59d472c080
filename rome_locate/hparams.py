"""ROME hyperparameters: EasyEdit's YAML format, writing a chosen layer into it, generating it for any model."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import yaml

from .arch import Arch, LayerRangeError, arch_for, check_layer
from .files import check_output_file, write_text
from .models import model_dtype
from .records import Record

# EasyEdit's ROMEHyperParams (easyeditor/models/rome/rome_hparams.py) field order,
# so a written file reads like the YAMLs EasyEdit ships.
FIELD_ORDER = (
    "alg_name", "model_name", "stats_dir", "device", "layers", "fact_token", "v_num_grad_steps", "v_lr",
    "v_loss_layer", "v_weight_decay", "clamp_norm_factor", "kl_factor", "mom2_adjustment",
    "context_template_length_params", "rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp",
    "attn_module_tmp", "ln_f_module", "lm_head_module", "mom2_dataset", "mom2_n_samples", "mom2_dtype",
    "max_length", "model_parallel", "fp16",
)
_FLOAT_FIELDS = ("v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor")
_INT_FIELDS = ("v_num_grad_steps", "v_loss_layer", "mom2_n_samples", "max_length")
FACT_TOKENS = ("subject_last", "subject_first", "last")
# ROME's context-template prefixes ("The", "Therefore", "Because", "I", "You"; rome.TEMPLATE_PREFIXES).
_TEMPLATE_PREFIXES = 5
# The rewrite-module template fields a `generate_hparams` call copies from the architecture map.
_ARCH_FIELDS = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp",
                "ln_f_module", "lm_head_module")

# Defaults from the ROME paper (Meng et al. 2022, appendix E: 20 Adam steps at lr 0.5,
# clamp 4x the original norm, KL weight 0.0625, context templates of 5 and 10 tokens)
# and from EasyEdit's shipped hparams/ROME/*.yaml for the rest. Only `layers` and
# `v_loss_layer` scale with depth; both are set from the model in `generate_hparams`.
DEFAULTS: dict[str, Any] = {
    "alg_name": "ROME",
    "stats_dir": "./data/stats",
    "fact_token": "subject_last",
    "v_num_grad_steps": 20,
    "v_lr": 0.5,
    "v_weight_decay": 0.5,
    "clamp_norm_factor": 4.0,
    "kl_factor": 0.0625,
    "mom2_adjustment": False,
    "context_template_length_params": [[5, 10], [10, 10]],
    "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000,
    "mom2_dtype": "float32",
    "max_length": 40,
    "model_parallel": False,
    "fp16": False,
}


class HParamsError(ValueError):
    """A hyperparameter file or value that ROME cannot use; the message names it."""


class RomeParams(Protocol):
    """The ROME hyperparameters the code reads; EasyEdit's ROMEHyperParams and our RomeHParams both satisfy it."""

    # What the edit is and where it writes (rome.apply_rome).
    alg_name: str
    layers: Sequence[int]
    rewrite_module_tmp: str
    mlp_module_tmp: str
    layer_module_tmp: str
    fact_token: str
    context_template_length_params: Sequence[Sequence[int]]
    # The optimisation of v* (rome.compute_value).
    v_lr: float
    v_num_grad_steps: int
    v_weight_decay: float
    kl_factor: float
    clamp_norm_factor: float
    # The mom2 statistics file (stats.mom2_for).
    mom2_adjustment: bool
    model_name: str
    stats_dir: str
    mom2_dataset: str
    mom2_n_samples: int
    mom2_dtype: str


@dataclass(frozen=True)
class RomeHParams(Record):
    """The fields of EasyEdit's ROMEHyperParams, loadable without EasyEdit installed."""

    layers: list[int]
    fact_token: str
    v_num_grad_steps: int
    v_lr: float
    v_loss_layer: int
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    mom2_adjustment: bool
    context_template_length_params: list[list[int]]
    rewrite_module_tmp: str
    layer_module_tmp: str
    mlp_module_tmp: str
    attn_module_tmp: str
    ln_f_module: str
    lm_head_module: str
    mom2_dataset: str
    mom2_n_samples: int
    mom2_dtype: str
    alg_name: str
    device: int | str  # EasyEdit: an int is a CUDA index; "cpu" also works
    model_name: str
    stats_dir: str
    max_length: int = 40
    model_parallel: bool = False
    fp16: bool = False

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str | Path) -> "RomeHParams":
        """Load a ROME YAML (EasyEdit's format); `.yaml` is appended when missing, as EasyEdit does."""
        return cls(**read_config(hparams_name_or_path))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in EasyEdit's field order."""
        return to_dict(self)


def _path(hparams_name_or_path: str | Path) -> Path:
    p = str(hparams_name_or_path)
    if not p.endswith((".yaml", ".yml")):
        p += ".yaml"
    return Path(p)


def read_config(hparams_name_or_path: str | Path, n_layers: int | None = None) -> dict[str, Any]:
    """Read and check a ROME YAML into a dict of typed values; errors name the file and the field."""
    path, config = read_yaml(hparams_name_or_path, "ROME")
    return check_config(config, source=str(path), n_layers=n_layers)


def read_yaml(hparams_name_or_path: str | Path, what: str = "ROME") -> tuple[Path, dict[str, Any]]:
    """(the path, `.yaml` appended as EasyEdit does; its mapping), unchecked; errors name the file."""
    path = _path(hparams_name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} hyperparameters not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise HParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise HParamsError(f"{path}: expected a mapping of hyperparameters, got {type(config).__name__}")
    return path, config


def check_config(config: dict[str, Any], source: str = "hyperparameters", n_layers: int | None = None) -> dict[str, Any]:
    """Validate and coerce a dict of ROME hyperparameters; returns a new dict."""
    config = check_fields(config, "ROME", RomeHParams, source)
    config = check_common(config, source, n_layers, _FLOAT_FIELDS, _INT_FIELDS)
    ctp = config["context_template_length_params"]
    # ROME splits each count over its 5 template prefixes (count // 5 texts each): below 5 the sampler gets none.
    if (not isinstance(ctp, list)
            or not all(isinstance(p, (list, tuple)) and len(p) == 2
                       and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
                       and p[0] >= 1 and p[1] >= _TEMPLATE_PREFIXES for p in ctp)):
        raise HParamsError(f"{source}: context_template_length_params must be a list of [length >= 1, count >= "
                           f"{_TEMPLATE_PREFIXES}] pairs (tokens per sampled text, texts split over ROME's "
                           f"{_TEMPLATE_PREFIXES} template prefixes), got {ctp!r}")
    config["context_template_length_params"] = [list(p) for p in ctp]
    return config


def check_fields(config: dict[str, Any], alg_name: str, cls: type, source: str) -> dict[str, Any]:
    """A copy of `config` after checking its alg_name and that it has exactly `cls`'s fields (the optional ones
    may be absent); an HParamsError names the file and the fields."""
    config = dict(config)
    if config.get("alg_name") != alg_name:
        raise HParamsError(f"{source}: alg_name must be {alg_name!r}, got {config.get('alg_name')!r}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise HParamsError(f"{source}: unknown {alg_name} hyperparameters {unknown}")
    required = {f.name for f in fields(cls) if f.default is dataclasses.MISSING}
    missing = sorted(required - set(config))
    if missing:
        raise HParamsError(f"{source}: missing {alg_name} hyperparameters {missing}")
    return config


def _coerce_numbers(config: dict[str, Any], source: str, floats: Sequence[str], ints: Sequence[str]) -> None:
    # YAML 1.1 reads "5e-1" (no dot) as a string; EasyEdit converts such strings too.
    for key in floats:
        if key not in config:
            continue
        try:
            config[key] = float(config[key])
        except (TypeError, ValueError):
            raise HParamsError(f"{source}: {key} must be a number, got {config[key]!r}") from None
    for key in ints:
        if key in config:
            value = config[key]
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or int(value) != value):
                raise HParamsError(f"{source}: {key} must be an integer, got {config[key]!r}")
            config[key] = int(value)


def check_common(config: dict[str, Any], source: str, n_layers: int | None, floats: Sequence[str],
                 ints: Sequence[str]) -> dict[str, Any]:
    """The checks every ROME-family YAML (ROME, MEMIT, AlphaEdit) shares: numbers, layers, the v* settings'
    ranges, fact_token, flags, module templates, statistics; returns `config` coerced in place."""
    _coerce_numbers(config, source, floats, ints)
    layers = config["layers"]
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if (not isinstance(layers, list) or not layers
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers)):
        raise HParamsError(f"{source}: layers must be a non-empty list of layer indices >= 0, got {config['layers']!r}")
    for layer in layers:
        try:
            check_layer(layer, n_layers, what=f"layers {layers}: layer")
        except LayerRangeError as exc:
            raise HParamsError(f"{source}: {exc}") from None
    config["layers"] = list(layers)
    _check_ranges(config, source, n_layers)
    if config["fact_token"] not in FACT_TOKENS:
        raise HParamsError(f"{source}: fact_token must be one of {FACT_TOKENS}, got {config['fact_token']!r}")
    for key in ("mom2_adjustment", "model_parallel", "fp16"):
        if key in config and not isinstance(config[key], bool):
            raise HParamsError(f"{source}: {key} must be true or false, got {config[key]!r}")
    for key in _ARCH_FIELDS:
        if not isinstance(config[key], str) or not config[key]:
            raise HParamsError(f"{source}: {key} must be a module name, got {config[key]!r}")
    for key in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp"):
        if "{}" not in config[key]:
            raise HParamsError(f"{source}: {key} must contain '{{}}' for the layer, got {config[key]!r}")
    if config["mom2_dtype"] not in ("float16", "float32", "float64"):
        raise HParamsError(f"{source}: mom2_dtype must be float16, float32 or float64, got {config['mom2_dtype']!r}")
    config["model_name"] = str(config["model_name"])
    config["stats_dir"] = str(config["stats_dir"])
    return config


def _check_ranges(config: dict[str, Any], source: str, n_layers: int | None) -> None:
    """Numbers of the right type but outside what ROME can use (a NaN learning rate, zero steps, a loss layer
    below the model): an HParamsError naming the field and the value."""
    for key in ("v_lr", "clamp_norm_factor"):
        if not (math.isfinite(config[key]) and config[key] > 0):
            raise HParamsError(f"{source}: {key} must be a finite number > 0, got {config[key]!r}")
    for key in ("kl_factor", "v_weight_decay"):
        if not (math.isfinite(config[key]) and config[key] >= 0):
            raise HParamsError(f"{source}: {key} must be a finite number >= 0, got {config[key]!r}")
    for key in ("v_num_grad_steps", "mom2_n_samples", "max_length"):
        if key in config and config[key] < 1:
            raise HParamsError(f"{source}: {key} must be >= 1, got {config[key]!r}")
    loss_layer = config["v_loss_layer"]
    if n_layers is not None and not 0 <= loss_layer < n_layers:
        raise HParamsError(f"{source}: v_loss_layer must be a layer index in 0..{n_layers - 1}, got {loss_layer!r} "
                           f"(the model has {n_layers} layers)")
    if loss_layer < 0:
        raise HParamsError(f"{source}: v_loss_layer must be a layer index >= 0, got {loss_layer!r}")


def to_dict(hparams: RomeParams, order: Sequence[str] = FIELD_ORDER) -> dict[str, Any]:
    """EasyEdit's or our hyperparameters as a plain dict in EasyEdit's field order."""
    data = dataclasses.asdict(hparams)
    ordered = {k: data[k] for k in order if k in data}
    ordered.update({k: v for k, v in data.items() if k not in ordered})
    return ordered


def easyedit_hparams_class() -> type | None:
    """EasyEdit's ROMEHyperParams if EasyEdit is already imported in this process, else None.

    Importing EasyEdit has side effects (it seeds the global RNGs and configures
    logging), so this never imports it: `rome_locate.easyedit.import_easyedit()` does.
    """
    module = sys.modules.get("easyeditor.models.rome.rome_hparams")
    return getattr(module, "ROMEHyperParams", None)


def load_hparams(path: str | Path, n_layers: int | None = None, easyedit: bool | None = None) -> RomeParams:
    """Load a ROME YAML as EasyEdit's ROMEHyperParams when EasyEdit is imported, else as RomeHParams.

    The file is checked by our rules first, so a bad file gives the same clear
    error either way. `easyedit=True` requires EasyEdit's class, False forces ours.
    """
    config = read_config(path, n_layers=n_layers)
    cls = easyedit_hparams_class() if easyedit is not False else None
    if easyedit and cls is None:
        raise RuntimeError("easyedit=True but EasyEdit is not imported; call rome_locate.easyedit.import_easyedit() first")
    if cls is None:
        return RomeHParams(**config)
    return cls(**config)


def with_layer(hparams: RomeParams, layer: int, n_layers: int | None = None) -> RomeParams:
    """A copy of `hparams` (ours or EasyEdit's) with `layers: [layer]`; the caller's object is untouched."""
    if not isinstance(layer, (bool, int)):
        try:
            if int(layer) == layer:  # an integral float such as 3.0
                layer = int(layer)
        except (TypeError, ValueError, OverflowError):
            pass
    try:
        check_layer(layer, n_layers)
    except LayerRangeError as exc:
        raise HParamsError(str(exc)) from None
    return dataclasses.replace(hparams, layers=[layer])


def bind_model(hparams: RomeParams, model_path: str | Path) -> RomeParams:
    """A copy with `model_name` the absolute model path (a hub name as given) and `stats_dir` absolute.

    A relative `stats_dir` is read from the working directory, as EasyEdit does;
    when it does not exist there, `model_path/stats_dir` and then `model_path/stats`
    (where the shipped fact models keep their statistics) are used if present.
    """
    model_path = Path(model_path)
    stats_dir = Path(hparams.stats_dir)
    if not stats_dir.exists():
        if not stats_dir.is_absolute() and (model_path / stats_dir).is_dir():
            stats_dir = model_path / stats_dir
        elif (model_path / "stats").is_dir():
            # The shipped fact models keep their statistics in stats/ next to the weights.
            stats_dir = model_path / "stats"
    # Absolute, so that the file means the same from any working directory (EasyEdit reads both relative to its
    # own); a hub name is not a path and stays as given.
    name = str(model_path.resolve()) if model_path.exists() else str(model_path)
    return dataclasses.replace(hparams, model_name=name, stats_dir=str(stats_dir.resolve()))


def yaml_text(hparams: Any, header: str | None, order: Sequence[str] = FIELD_ORDER) -> str:
    """The YAML of `hparams` in `order`, under `header` as comment lines."""
    lines = []
    if header:
        lines += [("# " + line).rstrip() for line in header.rstrip("\n").split("\n")]
    body = yaml.safe_dump(to_dict(hparams, order), default_flow_style=None, sort_keys=False, width=1000)
    return "\n".join(lines + [body]) if lines else body


def check_hparams_output(path: str | Path, flag: str = "-o") -> Path:
    """Fail before any work when `path` cannot be written, or holds a file `rome-locate hparams` did not write."""
    path = check_output_file(path, flag)
    if path.exists():
        try:
            first = path.read_text(encoding="utf-8").split("\n", 1)[0]
        except UnicodeDecodeError:
            first = ""
        if not (first.startswith("# ") and "`rome-locate hparams`" in first):
            raise FileExistsError(f"{flag} {path} exists and was not written by rome-locate (its first line is not "
                                  f"a rome-locate header); rome-locate never writes over it: choose another path")
    return path


def write_hparams(hparams: RomeParams, path: str | Path, header: str | None = None) -> Path:
    """Write `hparams` as an EasyEdit ROME YAML with a comment header; atomic (temp file, then os.replace)."""
    path = Path(path)
    check_config(to_dict(hparams), source=f"hyperparameters for {path}")
    text = yaml_text(hparams, header)
    write_text(path, text)
    return path


def hparams_from_arch(arch: Arch, layer: int, model_name: str, device: int | str = "cpu",
                      **overrides: Any) -> RomeHParams:
    """Complete ROME hyperparameters from an architecture row with `n_layers` filled in."""
    if not arch.n_layers:
        raise HParamsError("the architecture's n_layers is unknown; resolve it with arch_for(model) first")
    values: dict[str, Any] = dict(DEFAULTS)
    values.update({name: getattr(arch, name) for name in _ARCH_FIELDS})
    values.update(model_name=str(model_name), device=device, layers=[layer], v_loss_layer=arch.n_layers - 1)
    unknown = sorted(set(overrides) - {f.name for f in fields(RomeHParams)})
    if unknown:
        raise HParamsError(f"unknown ROME hyperparameters {unknown}")
    values.update(overrides)
    if isinstance(values["layers"], int):
        values["layers"] = [values["layers"]]
    return RomeHParams(**check_config(values, source=f"generated hyperparameters for {model_name}",
                                      n_layers=arch.n_layers))


def generate_hparams(model: Any, arch: Arch | str | Path | dict | None, layer: int, model_name: str,
                     device: int | str = "cpu", **overrides: Any) -> RomeHParams:
    """Complete ROME hyperparameters for `model` editing `layer`: templates from the architecture map,
    `v_loss_layer = L - 1`, the rest from `DEFAULTS`; `overrides` win over everything."""
    if not isinstance(arch, Arch) or not arch.n_layers:
        arch = arch_for(model, arch)
    overrides.setdefault("fp16", model_dtype(model) == torch.float16)
    return hparams_from_arch(arch, layer, model_name, device=device, **overrides)


def dataset_header(facts_file: str | Path, n_facts: int, trace_settings: dict[str, Any],
                   mean_effects: tuple[float, ...] | list[float], histogram: tuple[int, ...] | list[int],
                   layer: int, kind: str = "mlp") -> str:
    """The comment header recording how `layers` was chosen."""
    lines = [
        "Generated by `rome-locate hparams`: layers is the layer with the largest mean",
        f"indirect effect of restoring the {kind} output at the last subject token (ROME causal tracing).",
        f"facts: {facts_file} ({n_facts} facts)",
        "trace: " + ", ".join(f"{k}={v}" for k, v in trace_settings.items()),
        f"chosen layer: {layer}",
        "mean effect per layer: " + " ".join(f"{i}:{e:.4f}" for i, e in enumerate(mean_effects)),
        "per-fact argmax histogram: " + " ".join(f"{i}:{n}" for i, n in enumerate(histogram)),
    ]
    return "\n".join(lines)


def fixed_layer(hparams: Any) -> int:
    """The one edit layer the hyperparameters name (ROME edits one layer): the layer rule's fallback."""
    layers = list(getattr(hparams, "layers", None) or [])
    if len(layers) != 1:
        raise ValueError(f"hyperparameters must name exactly one edit layer (ROME edits one), got layers={layers}")
    return int(layers[0])
