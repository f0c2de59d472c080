"""The only code that registers hooks: read or rewrite named modules' outputs, always cleaned up."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

# An edit receives the module's main output tensor (the first element when the
# module returns a tuple, as attention and blocks do) and returns its replacement.
Edit = Callable[[torch.Tensor], torch.Tensor]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called `name`, or raise LookupError naming it."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise LookupError(f"model {type(model).__name__} has no module named {name!r}") from None


def _main(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_main(output, new: torch.Tensor):
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    return new


def _per_token(t: torch.Tensor, tokens: tuple[int, int] | None) -> torch.Tensor:
    # Some MLPs (OPT) run on tokens flattened to (batch*seq, d); give every caller (batch, seq, d).
    if tokens is not None and t.dim() == 2 and t.shape[0] == tokens[0] * tokens[1]:
        return t.view(tokens[0], tokens[1], t.shape[-1])
    return t


@contextmanager
def patched(model: nn.Module, edits: Mapping[str, Edit], tokens: tuple[int, int] | None = None) -> Iterator[None]:
    """Within the block, each named module's output is replaced by `edit(output)`.

    With `tokens=(batch, seq)`, an output flattened over tokens is shown to `edit` as (batch, seq, d).
    """
    handles = []
    try:
        for name, edit in edits.items():
            module = get_module(model, name)

            def hook(_mod, _inp, output, edit=edit):
                main = _main(output)
                new = edit(_per_token(main, tokens)).reshape(main.shape)
                return _replace_main(output, new)

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


@contextmanager
def captured(model: nn.Module, names: list[str] | tuple[str, ...], detach: bool = True,
             tokens: tuple[int, int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, the returned dict fills with each named module's main output.

    With `tokens=(batch, seq)`, an output flattened over tokens is stored as (batch, seq, d).
    """
    cache: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            module = get_module(model, name)

            def hook(_mod, _inp, output, name=name):
                out = _per_token(_main(output), tokens)
                # A copy, not a view: some blocks (Falcon) add into a sublayer's output in place.
                cache[name] = out.detach().clone() if detach else out

            handles.append(module.register_forward_hook(hook))
        yield cache
    finally:
        for handle in reversed(handles):
            handle.remove()


@contextmanager
def captured_inputs(model: nn.Module, names: list[str] | tuple[str, ...],
                    tokens: tuple[int, int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, the returned dict fills with each named module's first positional input."""
    cache: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            module = get_module(model, name)

            def hook(_mod, inputs, name=name):
                cache[name] = _per_token(inputs[0].detach(), tokens).clone()

            handles.append(module.register_forward_pre_hook(hook))
        yield cache
    finally:
        for handle in reversed(handles):
            handle.remove()


def hook_count(model: nn.Module) -> int:
    """Number of forward (pre-)hooks attached anywhere in the model; 0 when clean."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
