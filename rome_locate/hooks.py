"""The only code that registers hooks or stands in for modules: read or rewrite named modules' outputs, read their
inputs, skip blocks (`started_at`); always cleaned up."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

# A rewrite receives the module's main output tensor (the first element when the
# module returns a tuple, as attention and blocks do) and returns its replacement.
# ("Edit" means only ROME's weight edit; this changes activations for one forward.)
Rewrite = Callable[[torch.Tensor], torch.Tensor]


class UnknownModuleError(LookupError):
    """The model has no module of the given name (a wrong architecture row or --arch file)."""


class StopForward(Exception):
    """Raised by a hook to end the forward pass early, once everything wanted is captured (as baukit's nethook)."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called `name`, or raise UnknownModuleError (a LookupError) naming it."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UnknownModuleError(f"model {type(model).__name__} has no module named {name!r}") from None


@contextmanager
def hooked(model: nn.Module, hooks: Mapping[str, Callable], *, pre: bool = False) -> Iterator[None]:
    """Within the block, each named module runs its hook: a forward hook, or with `pre` a forward pre-hook.

    Every module is looked up before the first hook is registered, and every hook
    is removed in `finally`, so a bad name or a failing forward leaves nothing attached.
    """
    modules = {name: get_module(model, name) for name in hooks}
    handles = []
    try:
        for name, fn in hooks.items():
            register = modules[name].register_forward_pre_hook if pre else modules[name].register_forward_hook
            handles.append(register(fn))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


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


def _rewriting(rewrite: Rewrite, tokens: tuple[int, int] | None) -> Callable:
    def hook(_mod, _inp, output):
        main = _main(output)
        return _replace_main(output, rewrite(_per_token(main, tokens)).reshape(main.shape))

    return hook


@contextmanager
def patched(model: nn.Module, rewrites: Mapping[str, Rewrite], tokens: tuple[int, int] | None = None
            ) -> Iterator[None]:
    """Within the block, each named module's output is replaced by `rewrite(output)`.

    With `tokens=(batch, seq)`, an output flattened over tokens is shown to `rewrite` as (batch, seq, d).
    """
    with hooked(model, {name: _rewriting(fn, tokens) for name, fn in rewrites.items()}):
        yield


@contextmanager
def captured(model: nn.Module, names: Sequence[str], detach: bool = True,
             tokens: tuple[int, int] | None = None, arity: dict[str, int | None] | None = None,
             rows: slice | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, the returned dict fills with each named module's main output.

    With `tokens=(batch, seq)`, an output flattened over tokens is stored as (batch, seq, d).
    With `arity`, it also fills with each module's output tuple length (None: a bare tensor).
    With `rows`, only those batch rows are kept.
    """
    cache: dict[str, torch.Tensor] = {}

    def keeper(name: str) -> Callable:
        def hook(_mod, _inp, output):
            out = _per_token(_main(output), tokens)
            if rows is not None:
                out = out[rows]
            # A copy, not a view: some blocks (Falcon) add into a sublayer's output in place.
            cache[name] = out.detach().clone() if detach else out
            if arity is not None:
                arity[name] = len(output) if isinstance(output, tuple) else None

        return hook

    with hooked(model, {name: keeper(name) for name in names}):
        yield cache


@contextmanager
def captured_inputs(model: nn.Module, names: Sequence[str], tokens: tuple[int, int] | None = None,
                    stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, the returned dict fills with each named module's first positional input.

    With `stop=True` the forward pass ends (StopForward, swallowed at the end of
    the block) as soon as every named input is captured, so the rest of the
    model and its head never run; the forward call must then be the block's last statement.
    """
    cache: dict[str, torch.Tensor] = {}
    wanted = set(names)

    def keeper(name: str) -> Callable:
        def hook(_mod, inputs):
            cache[name] = _per_token(inputs[0].detach(), tokens).clone()
            if stop and wanted <= cache.keys():
                raise StopForward

        return hook

    with hooked(model, {name: keeper(name) for name in names}, pre=True):
        try:
            yield cache
        except StopForward:
            pass


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
def started_at(model: nn.Module, blocks: Sequence[str], start: int, state: torch.Tensor,
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
