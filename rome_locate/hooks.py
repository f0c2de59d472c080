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
             tokens: tuple[int, int] | None = None, arity: dict[str, int | None] | None = None,
             rows: slice | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, the returned dict fills with each named module's main output.

    With `tokens=(batch, seq)`, an output flattened over tokens is stored as (batch, seq, d).
    With `arity`, it also fills with each module's output tuple length (None: a bare tensor).
    With `rows`, only those batch rows are kept.
    """
    cache: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            module = get_module(model, name)

            def hook(_mod, _inp, output, name=name):
                out = _per_token(_main(output), tokens)
                if rows is not None:
                    out = out[rows]
                # A copy, not a view: some blocks (Falcon) add into a sublayer's output in place.
                cache[name] = out.detach().clone() if detach else out
                if arity is not None:
                    arity[name] = len(output) if isinstance(output, tuple) else None

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


class _Relay(nn.Module):
    """Stands in for a block that is not run: hands on its input, or `state`, shaped as the block's output."""

    def __init__(self, block: nn.Module, state: torch.Tensor | None, arity: int | None):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: the model's module tree stays as it was
        self.state = state
        self.arity = arity

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        h = hidden_states if self.state is None else self.state
        return h if self.arity is None else (h,) + (None,) * (self.arity - 1)

    def __getattr__(self, name: str):
        # Decoder loops read per-block attributes (attention_type, layer_idx): answer with the block's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


@contextmanager
def started_at(model: nn.Module, blocks: list[str] | tuple[str, ...], start: int, state: torch.Tensor,
               arity: int | None) -> Iterator[None]:
    """Within the block, blocks[:start] are not run and blocks[start] receives `state` as its hidden states.

    `arity` is the blocks' output tuple length (None: they return a bare tensor), as `captured` records it.
    """
    swapped = []
    try:
        for i in range(start):
            parent_name, _, child = blocks[i].rpartition(".")
            parent = get_module(model, parent_name)
            block = parent._modules[child]
            parent._modules[child] = _Relay(block, state if i == start - 1 else None, arity)
            swapped.append((parent, child, block))
        yield
    finally:
        for parent, child, block in reversed(swapped):
            parent._modules[child] = block


def hook_count(model: nn.Module) -> int:
    """Number of forward (pre-)hooks attached anywhere in the model; 0 when clean."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
