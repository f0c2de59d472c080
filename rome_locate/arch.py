"""The architecture map: module names, as EasyEdit templates, for every model family we know."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Mapping

from torch import nn

from .hooks import get_module
from .records import Record

Kind = Literal["hidden", "mlp", "attn"]
KINDS: tuple[Kind, ...] = ("hidden", "mlp", "attn")


class LayerRangeError(ValueError, IndexError):
    """A layer index outside the model's 0..L-1."""


def check_layer(layer: int, n_layers: int | None, what: str = "layer") -> int:
    """`layer` as an int when 0 <= layer < n_layers; otherwise a LayerRangeError that says the valid range.

    With `n_layers=None` (the depth is not known here) only `layer >= 0` is checked.
    """
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise LayerRangeError(f"{what} must be an integer, got {layer!r}")
    if n_layers is None:
        if layer < 0:
            raise LayerRangeError(f"{what} must be >= 0, got {layer}")
        return layer
    if not 0 <= layer < n_layers:
        raise LayerRangeError(f"{what} {layer} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return layer


@dataclass(frozen=True)
class Arch(Record):
    """Module names of one model; field names match ROMEHyperParams so hand-off is a plain copy."""

    embed: str
    layer_module_tmp: str
    mlp_module_tmp: str
    attn_module_tmp: str
    rewrite_module_tmp: str
    ln_f_module: str
    lm_head_module: str
    n_layers: int = 0  # filled in by arch_for from the loaded model

    def module(self, kind: Kind, layer: int) -> str:
        """Name of the module whose output is the site `(kind, layer)`."""
        tmp = {"hidden": self.layer_module_tmp, "mlp": self.mlp_module_tmp, "attn": self.attn_module_tmp}.get(kind)
        if tmp is None:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if self.n_layers:
            check_layer(layer, self.n_layers)
        return tmp.format(layer)

    def rewrite_module(self, layer: int) -> str:
        """Name of the MLP output projection ROME rewrites at `layer`."""
        if self.n_layers:
            check_layer(layer, self.n_layers)
        return self.rewrite_module_tmp.format(layer)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], *, strict: bool = True) -> "Arch":
        """Inverse of `to_json`; strict by default (an --arch file is written by hand, so typos are caught)."""
        return super().from_json(obj, strict=strict)


def _decoder(prefix: str, attn: str = "self_attn", mlp: str = "mlp", down: str = "down_proj",
             norm: str = "norm", embed: str = "embed_tokens", head: str = "lm_head") -> Arch:
    return Arch(
        embed=f"{prefix}.{embed}",
        layer_module_tmp=f"{prefix}.layers.{{}}",
        mlp_module_tmp=f"{prefix}.layers.{{}}.{mlp}",
        attn_module_tmp=f"{prefix}.layers.{{}}.{attn}",
        rewrite_module_tmp=f"{prefix}.layers.{{}}.{mlp}.{down}",
        ln_f_module=f"{prefix}.{norm}",
        lm_head_module=head,
    )


def _transformer_h(embed: str, attn: str, down: str, mlp: str = "mlp") -> Arch:
    return Arch(
        embed=f"transformer.{embed}",
        layer_module_tmp="transformer.h.{}",
        mlp_module_tmp=f"transformer.h.{{}}.{mlp}",
        attn_module_tmp=f"transformer.h.{{}}.{attn}",
        rewrite_module_tmp=f"transformer.h.{{}}.{mlp}.{down}",
        ln_f_module="transformer.ln_f",
        lm_head_module="lm_head",
    )


_LLAMA = _decoder("model")

# Keyed by `config.model_type`. A new family is a new row (and a test case), never a branch.
# Every row is checked by tests/test_arch.py on a tiny model built with transformers 5.23.
# Sites are the outputs ROME's tracer restores: `mlp`/`attn` are each sublayer's contribution
# before it is added to the residual stream, and `hidden` is the block's output.
ARCH: dict[str, Arch] = {
    # GPT-2's projections are Conv1D (weight stored [in, out]), not nn.Linear.
    "gpt2": _transformer_h("wte", "attn", "c_proj"),
    "gpt_bigcode": _transformer_h("wte", "attn", "c_proj"),
    "gpt_neo": _transformer_h("wte", "attn", "c_proj"),
    # GPT-J runs attention and MLP in parallel off one layer norm; both outputs are still separate modules.
    "gptj": _transformer_h("wte", "attn", "fc_out"),
    # Falcon adds the attention output INTO the MLP output tensor in place (`mlp_output += attention_output`),
    # so a hook that keeps the MLP output without copying it sees MLP + attention after the block runs.
    "falcon": _transformer_h("word_embeddings", "self_attention", "dense_4h_to_h"),
    # BloomMLP and BloomAttention add the residual inside their forward, so their outputs are the residual
    # stream, not the sublayer's contribution: the sites are the output projections instead. Checkpoints with
    # pretraining_tp > 1 and slow_but_exact=True never call those modules, and then nothing is traced.
    "bloom": Arch(
        embed="transformer.word_embeddings",
        layer_module_tmp="transformer.h.{}",
        mlp_module_tmp="transformer.h.{}.mlp.dense_4h_to_h",
        attn_module_tmp="transformer.h.{}.self_attention.dense",
        rewrite_module_tmp="transformer.h.{}.mlp.dense_4h_to_h",
        ln_f_module="transformer.ln_f",
        lm_head_module="lm_head",
    ),
    # transformers 5 renamed GPT-NeoX's head from `embed_out` (EasyEdit's YAMLs still say so) to `lm_head`.
    "gpt_neox": _decoder("gpt_neox", attn="attention", down="dense_4h_to_h", norm="final_layer_norm",
                         embed="embed_in"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "ministral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    # Gemma's embedding module multiplies by sqrt(hidden) itself, so its output is what enters layer 0.
    "gemma": _LLAMA,
    # Gemma 2/3, OLMo 2/3, GLM-4 and EXAONE 4 norm each sublayer's output before the residual add, outside
    # the MLP/attention module; the sites are the pre-norm outputs. Gemma 2 soft-caps the final logits.
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "olmo": _LLAMA,
    "olmo2": _LLAMA,
    "olmo3": _LLAMA,
    "glm4": _LLAMA,
    "exaone4": _LLAMA,
    # Phi-3 and GLM fuse gate and up projections (gate_up_proj); down_proj is still the rewritten matrix.
    "phi3": _LLAMA,
    "glm": _LLAMA,
    # Cohere runs attention and MLP in parallel and scales the logits by `logit_scale` after lm_head.
    "cohere": _LLAMA,
    "cohere2": _LLAMA,
    # Granite multiplies embeddings, sublayer outputs and logits by config scalars outside the modules.
    "granite": _LLAMA,
    "smollm3": _LLAMA,
    "helium": _LLAMA,
    "stablelm": _LLAMA,
    "starcoder2": _decoder("model", down="c_proj"),
    # Phi(-1/2) runs attention and MLP in parallel off one layer norm.
    "phi": _decoder("model", down="fc2", norm="final_layernorm"),
    # OPT has no MLP container, and runs fc1/fc2 on tokens flattened to (batch*seq, d): fc2's output is
    # the MLP output once hooks are given `tokens=(batch, seq)` (dropout is off in eval).
    "opt": Arch(
        embed="model.decoder.embed_tokens",
        layer_module_tmp="model.decoder.layers.{}",
        mlp_module_tmp="model.decoder.layers.{}.fc2",
        attn_module_tmp="model.decoder.layers.{}.self_attn",
        rewrite_module_tmp="model.decoder.layers.{}.fc2",
        ln_f_module="model.decoder.final_layer_norm",
        lm_head_module="lm_head",
    ),
}

class UnknownArchitectureError(LookupError):
    """The model's family is not in ARCH, or its modules are not where the row says."""


def _how_to_pass() -> str:
    keys = [f.name for f in fields(Arch) if f.name != "n_layers"]
    return (f"Pass the module names explicitly (Python: arch_for(model, arch=Arch(...)); "
            f"CLI: --arch FILE.json with keys {keys})")


def count_layers(model: nn.Module, layer_module_tmp: str) -> int:
    """Number of blocks in the container that `layer_module_tmp` ("transformer.h.{}") indexes."""
    return len(get_module(model, layer_module_tmp.split(".{}")[0]))


def _check(model: nn.Module, arch: Arch) -> None:
    names = [arch.embed, arch.ln_f_module, arch.lm_head_module]
    for layer in {0, arch.n_layers - 1}:
        names += [t.format(layer) for t in (arch.layer_module_tmp, arch.mlp_module_tmp,
                                             arch.attn_module_tmp, arch.rewrite_module_tmp)]
    missing = []
    for name in names:
        try:
            get_module(model, name)
        except LookupError:
            missing.append(name)
    if missing:
        raise UnknownArchitectureError(
            f"{type(model).__name__}: modules not found: {missing}. {_how_to_pass()}"
        )


def read_arch(path: str | Path) -> Arch:
    """An architecture row from a hand-written JSON file; every error names the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"architecture file {path}: not valid JSON ({exc})") from None
    try:
        return Arch.from_json(obj)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"architecture file {path}: {exc}. {_how_to_pass()}") from None


def arch_for(model: nn.Module, arch: Arch | str | Path | dict | None = None) -> Arch:
    """Resolve and check the module names of a loaded model; `arch` overrides the table.

    An Arch that is already resolved (its `n_layers` set, as this function and `models.LoadedModel` leave it) is
    returned as it is: a model is resolved once and its Arch passed on, not re-derived at every stage.
    """
    if isinstance(arch, Arch) and arch.n_layers:
        return arch
    if isinstance(arch, (str, Path)):
        arch = read_arch(arch)
    elif isinstance(arch, dict):
        arch = Arch.from_json(arch)
    if arch is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ARCH:
            raise UnknownArchitectureError(
                f"unknown model_type {model_type!r} ({type(model).__name__}); supported: {sorted(ARCH)}. "
                f"{_how_to_pass()}"
            )
        arch = ARCH[model_type]
    try:
        n_layers = count_layers(model, arch.layer_module_tmp)
    except (LookupError, TypeError):
        raise UnknownArchitectureError(
            f"{type(model).__name__}: no layer list at {arch.layer_module_tmp.split('.{}')[0]!r}; "
            f"{_how_to_pass()}"
        ) from None
    arch = replace(arch, n_layers=n_layers)
    _check(model, arch)
    return arch
