"""MEMIT and AlphaEdit hyperparameters: EasyEdit's YAML formats (`MEMITHyperParams`, `AlphaEditHyperParams`),
checked by the same rules as ROME's, written so EasyEdit's own classes load them.

A MEMIT file names a window of layers (`layers`), not one layer: MEMIT spreads the
update of every fact in a batch over the window's MLP output projections. Neither
EasyEdit class has `fp16` or `context_template_length_params`, so these files carry
neither (EasyEdit's MEMIT samples its context templates itself: five texts of ten
tokens, `rome_locate.memit.MEMIT_TEMPLATES`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from .arch import Arch, arch_for
from .files import write_text
from .hparams import (_ARCH_FIELDS, HParamsError, check_common, check_fields, read_yaml, to_dict, yaml_text)
from .records import Record

# EasyEdit's shipped MEMIT YAMLs start with these and keep the dataclass order after them.
FIELD_ORDER = (
    "alg_name", "model_name", "stats_dir", "device", "layers", "clamp_norm_factor", "layer_selection", "fact_token",
    "v_num_grad_steps", "v_lr", "v_loss_layer", "v_weight_decay", "kl_factor", "mom2_adjustment",
    "mom2_update_weight", "nullspace_threshold", "L2", "P_loc", "rewrite_module_tmp", "layer_module_tmp",
    "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module", "mom2_dataset", "mom2_n_samples",
    "mom2_dtype", "max_length", "batch_size", "model_parallel",
)
_FLOATS = ("v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "mom2_update_weight", "nullspace_threshold",
           "L2")
_INTS = ("v_num_grad_steps", "v_loss_layer", "mom2_n_samples", "max_length", "batch_size")
LAYER_SELECTIONS = ("all", "random")

# MEMIT's published settings for GPT-2 XL / GPT-J as EasyEdit ships them (hparams/MEMIT/gpt2-xl.yaml), except
# `layers` and `v_loss_layer`, which are set from the model, and the statistics, which are rome-locate's.
DEFAULTS: dict[str, Any] = {
    "stats_dir": "./data/stats",
    "layer_selection": "all",
    "fact_token": "subject_last",
    "v_num_grad_steps": 20,
    "v_lr": 0.5,
    "v_weight_decay": 0.5,
    "clamp_norm_factor": 0.75,
    "kl_factor": 0.0625,
    "mom2_adjustment": True,
    "mom2_update_weight": 20000.0,
    "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000,
    "mom2_dtype": "float32",
    "max_length": 40,
    "batch_size": 1,
    "model_parallel": False,
}
# AlphaEdit's published additions (EasyEdit's hparams/AlphaEdit/*.yaml).
ALPHAEDIT_DEFAULTS: dict[str, Any] = {"nullspace_threshold": 2e-2, "L2": 10.0, "P_loc": "./null_space_project.pt"}


@dataclass(frozen=True)
class MemitHParams(Record):
    """The fields of EasyEdit's MEMITHyperParams, loadable without EasyEdit installed."""

    layers: list[int]
    layer_selection: str
    fact_token: str
    v_num_grad_steps: int
    v_lr: float
    v_loss_layer: int
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    mom2_adjustment: bool
    mom2_update_weight: float
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
    device: int | str
    model_name: str
    stats_dir: str
    max_length: int = 40
    batch_size: int = 1
    model_parallel: bool = False

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str | Path) -> "MemitHParams":
        """Load a MEMIT YAML (EasyEdit's format); `.yaml` is appended when missing, as EasyEdit does."""
        return load_memit_hparams(hparams_name_or_path, cls=cls)


@dataclass(frozen=True)
class AlphaEditHParams(MemitHParams):
    """The fields of EasyEdit's AlphaEditHyperParams: MEMIT's plus the null-space settings."""

    nullspace_threshold: float = ALPHAEDIT_DEFAULTS["nullspace_threshold"]
    L2: float = ALPHAEDIT_DEFAULTS["L2"]
    P_loc: str = ALPHAEDIT_DEFAULTS["P_loc"]


# alg_name -> the dataclass of its YAML.
CLASSES: dict[str, type[MemitHParams]] = {"MEMIT": MemitHParams, "AlphaEdit": AlphaEditHParams}


def _class_for(alg_name: Any, source: str) -> type[MemitHParams]:
    if alg_name not in CLASSES:
        raise HParamsError(f"{source}: alg_name must be one of {tuple(CLASSES)}, got {alg_name!r}")
    return CLASSES[alg_name]


def check_memit_config(config: dict[str, Any], source: str = "hyperparameters",
                       n_layers: int | None = None) -> dict[str, Any]:
    """Validate and coerce a dict of MEMIT or AlphaEdit hyperparameters; returns a new dict."""
    cls = _class_for(config.get("alg_name"), source)
    config = check_fields(config, config["alg_name"], cls, source)
    if cls is AlphaEditHParams:
        # EasyEdit's class requires P_loc; rome-locate keeps P in memory and reads the statistics instead.
        config.setdefault("P_loc", ALPHAEDIT_DEFAULTS["P_loc"])
    config = check_common(config, source, n_layers, _FLOATS, _INTS)
    for key in ("mom2_update_weight", "L2", "nullspace_threshold"):
        if key in config and not (math.isfinite(config[key]) and config[key] >= 0):
            raise HParamsError(f"{source}: {key} must be a finite number >= 0, got {config[key]!r}")
    if config.get("batch_size", 1) < 1:
        raise HParamsError(f"{source}: batch_size must be >= 1, got {config['batch_size']!r}")
    if config["layer_selection"] not in LAYER_SELECTIONS:
        raise HParamsError(f"{source}: layer_selection must be one of {LAYER_SELECTIONS}, "
                           f"got {config['layer_selection']!r}")
    if len(set(config["layers"])) != len(config["layers"]):
        raise HParamsError(f"{source}: layers {config['layers']} repeat a layer")
    if not config["mom2_adjustment"] and cls is AlphaEditHParams:
        raise HParamsError(f"{source}: AlphaEdit projects onto the null space of the mom2 statistics: "
                           f"mom2_adjustment must be true")
    config["layers"] = sorted(config["layers"])
    return config


def load_memit_hparams(path: str | Path, n_layers: int | None = None,
                       cls: type[MemitHParams] | None = None) -> MemitHParams:
    """Load a MEMIT or AlphaEdit YAML as `MemitHParams`/`AlphaEditHParams` (by its alg_name), checked."""
    path, config = read_yaml(path, "MEMIT")
    config = check_memit_config(config, source=str(path), n_layers=n_layers)
    klass = CLASSES[config["alg_name"]]
    if cls is not None and not issubclass(klass, cls):
        raise HParamsError(f"{path}: alg_name {config['alg_name']!r} is not {cls.__name__}'s")
    return klass(**config)


def memit_to_dict(hparams: Any) -> dict[str, Any]:
    """Plain dict in EasyEdit's field order (only the fields EasyEdit's class has)."""
    return to_dict(hparams, FIELD_ORDER)


def write_memit_hparams(hparams: MemitHParams, path: str | Path, header: str | None = None) -> Path:
    """Write `hparams` as an EasyEdit MEMIT/AlphaEdit YAML under a comment header; atomic."""
    path = Path(path)
    check_memit_config(memit_to_dict(hparams), source=f"hyperparameters for {path}")
    write_text(path, yaml_text(hparams, header, FIELD_ORDER))
    return path


def with_window(hparams: MemitHParams, layers: Sequence[int], n_layers: int | None = None) -> MemitHParams:
    """A copy of `hparams` editing the window `layers` (checked against the model's depth)."""
    config = memit_to_dict(dataclasses.replace(hparams, layers=[int(x) for x in layers]))
    return type(hparams)(**check_memit_config(config, source="window", n_layers=n_layers))


def memit_hparams_from_arch(arch: Arch, layers: Sequence[int], model_name: str, alg_name: str = "MEMIT",
                            device: int | str = "cpu", **overrides: Any) -> MemitHParams:
    """Complete MEMIT (or AlphaEdit) hyperparameters from an architecture row with `n_layers` filled in."""
    if not arch.n_layers:
        raise HParamsError("the architecture's n_layers is unknown; resolve it with arch_for(model) first")
    cls = _class_for(alg_name, f"generated hyperparameters for {model_name}")
    values: dict[str, Any] = dict(DEFAULTS)
    if cls is AlphaEditHParams:
        values.update(ALPHAEDIT_DEFAULTS)
    values.update({name: getattr(arch, name) for name in _ARCH_FIELDS})
    values.update(alg_name=alg_name, model_name=str(model_name), device=device, layers=[int(x) for x in layers],
                  v_loss_layer=arch.n_layers - 1)
    unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
    if unknown:
        raise HParamsError(f"unknown {alg_name} hyperparameters {unknown}")
    values.update(overrides)
    return cls(**check_memit_config(values, source=f"generated hyperparameters for {model_name}",
                                    n_layers=arch.n_layers))


def head_module(model: Any, name: str) -> str:
    """The module whose `.weight` is the LM head's weight as a named parameter. EasyEdit's MEMIT reads
    `{lm_head_module}.weight` among `named_parameters()`, which lists a tied head's weight once, under the input
    embedding: for a tied head (GPT-2) that embedding's name, else `name`."""
    params = dict(model.named_parameters())
    if f"{name}.weight" in params:
        return name
    weight = getattr(model.get_submodule(name), "weight", None)
    for pname, p in params.items():
        if p is weight and pname.endswith(".weight"):
            return pname[: -len(".weight")]
    return name


def generate_memit_hparams(model: Any, arch: Arch | str | Path | dict | None, layers: Sequence[int],
                           model_name: str, alg_name: str = "MEMIT", device: int | str = "cpu",
                           **overrides: Any) -> MemitHParams:
    """`memit_hparams_from_arch` for a loaded model (its architecture resolved here when not given resolved), with
    the LM head named as EasyEdit's MEMIT finds it (`head_module`)."""
    if not isinstance(arch, Arch) or not arch.n_layers:
        arch = arch_for(model, arch)
    overrides.setdefault("lm_head_module", head_module(model, arch.lm_head_module))
    return memit_hparams_from_arch(arch, layers, model_name, alg_name=alg_name, device=device, **overrides)
