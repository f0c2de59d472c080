"""The cost model of tracing's forwards: how many rows a forward takes, how many facts share a first run, whether
the clean rows ride along, and which restored sites share a forward (`plan`). Built from the config's FLOPs, so
every process chunks alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .models import input_device, model_dtype

# Rows per forward on an accelerator; on CPU see `CPU_CHUNK_BYTES`.
ACCELERATOR_MAX_BATCH = 1024
# Activation bytes of one forward that still stay in a CPU core's caches: on 1 thread, 24 layers d128,
# 30 tokens, 40-row chunks ran 1.6x faster than 256-row ones (4 MiB is 64 rows there). Larger models
# read more weight bytes per forward, which more rows share, so 64 rows is the least a chunk may hold.
CPU_CHUNK_BYTES = 4 << 20
CPU_MIN_ROWS = 64
# Bytes the first run of a batch may keep (block states and the key/value cache): bounds facts per batch.
KEPT_BYTES = {"cpu": 1 << 30, "accelerator": 4 << 30}


# ---- planning the restored runs ----------------------------------------------------


@dataclass(frozen=True)
class Costs:
    """Modelled seconds of a forward: a fixed part, a part per block run, and the arithmetic."""

    forward_s: float  # per forward, blocks aside (embedding, head, mask building, Python)
    block_s: float  # per block run, however small the batch (kernel launches, module calls)
    flops: float  # arithmetic rate, FLOP/s


# Fixed figures, not timings taken at run time, so that every process plans alike. Measured on this project's
# 2-core CPU, 1 thread (bench/peers.py machine): an 8-layer d64 fact model's forward of one row costs 1.9 ms,
# 0.2 ms of it per block; the arithmetic ran at about 30 GFLOP/s. On an accelerator (not measured here) kernel
# launches outweigh hundreds of rows, so its figures make chunks as large as `max_rows` allows.
CPU_COSTS = Costs(forward_s=3e-4, block_s=2e-4, flops=3e10)
ACCELERATOR_COSTS = Costs(forward_s=2e-3, block_s=5e-4, flops=1e14)


def costs_for(model: nn.Module) -> Costs:
    """The `Costs` the plan uses for `model`'s device."""
    return CPU_COSTS if input_device(model).type == "cpu" else ACCELERATOR_COSTS


def _dims(model: nn.Module) -> tuple[int, int, int]:
    """(hidden size, MLP inner size, vocabulary size) from the model's config."""
    cfg = getattr(model, "config", None)
    get = lambda *keys: next((getattr(cfg, k) for k in keys if isinstance(getattr(cfg, k, None), int)), None)  # noqa: E731
    d = get("hidden_size", "n_embd", "d_model") or 1024
    inner = get("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size") or 4 * d
    vocab = get("vocab_size") or 32000
    return int(d), int(inner), int(vocab)


def flops_per_position(model: nn.Module) -> tuple[float, float]:
    """(FLOPs of one position through one block, FLOPs of the LM head at one position), from the config."""
    d, inner, vocab = _dims(model)
    return 2.0 * (4 * d * d + 2 * d * inner), 2.0 * d * vocab


def clean_rides_along(model: nn.Module, n_layers: int, prompts: int, corrupt_rows: int, T: int, T1: int,
                      gradients: bool) -> bool:
    """Whether the clean rows (T1 positions) should run in the corrupted forward rather than in one of their own:
    when padding the corrupted rows to T1 (and, with `gradients`, back-propagating through the clean rows)
    costs less than a forward's fixed part (`Costs`)."""
    costs = costs_for(model)
    per_position, head = flops_per_position(model)
    passes = 3 if gradients else 1  # forward and backward
    extra = corrupt_rows * (T1 - T) * (n_layers * per_position + head) * passes
    if gradients:
        extra += prompts * T1 * n_layers * per_position * 2
    return extra / costs.flops < costs.forward_s + n_layers * costs.block_s


def max_rows(model: nn.Module, T: int) -> int:
    """Rows per forward: on CPU as many as keep one MLP's activations within `CPU_CHUNK_BYTES` (at least
    `CPU_MIN_ROWS`); `ACCELERATOR_MAX_BATCH` on an accelerator."""
    if input_device(model).type != "cpu":
        return ACCELERATOR_MAX_BATCH
    _, inner, _ = _dims(model)
    per_row = T * inner * torch.finfo(model_dtype(model)).bits // 8
    return max(CPU_MIN_ROWS, min(ACCELERATOR_MAX_BATCH, CPU_CHUNK_BYTES // max(per_row, 1)))


def batch_size(model: nn.Module, n_layers: int, samples: int, T: int, rows_per_forward: int,
               gradients: bool = False) -> int:
    """Facts per first run: as many as fill one forward's rows and keep what the run holds within `KEPT_BYTES`
    (block states and the key/value cache; with `gradients`, also the activations the backward reads)."""
    d, inner, _ = _dims(model)
    per_position = 3 * d + ((10 * d + 4 * inner) if gradients else 0)
    per_fact = (samples + 1) * T * n_layers * per_position * torch.finfo(model_dtype(model)).bits // 8
    budget = KEPT_BYTES["cpu" if input_device(model).type == "cpu" else "accelerator"]
    return max(1, min(rows_per_forward // (samples + 1), budget // max(per_fact, 1)))


@dataclass(frozen=True)
class PlannedSite:
    bottom: int  # the window's lowest layer
    token: int
    rows: int  # S of its prompt
    index: int  # position in the caller's site list


def plan(sites: Sequence[PlannedSite], L: int, T: int, costs: Costs, per_position: float, head: float, rows_max: int,
         use_prefix: bool) -> list[list[PlannedSite]]:
    """Split the sites into forwards: sorted by (bottom, token) or by (token, bottom), in chunks of k sites, the
    order and k that the cost model finds cheapest. A chunk runs from its lowest bottom and earliest token."""
    if not sites:
        return []
    largest = max(s.rows for s in sites)
    kmax = max(1, rows_max // largest)
    best: tuple[float, list[PlannedSite], int] | None = None
    for key in ((lambda s: (s.bottom, s.token)), (lambda s: (s.token, s.bottom))):
        order = sorted(sites, key=key)
        lo = np.array([s.bottom for s in order], dtype=float)
        tok = np.array([s.token if use_prefix else 0 for s in order], dtype=float)
        rows = np.array([s.rows for s in order], dtype=float)
        n = len(order)
        for k in range(1, min(kmax, n) + 1):
            m = -(-n // k)
            pad = m * k - n
            lo_c = np.concatenate([lo, np.full(pad, L)]).reshape(m, k).min(axis=1)
            tok_c = np.concatenate([tok, np.full(pad, T)]).reshape(m, k).min(axis=1)
            rows_c = np.concatenate([rows, np.zeros(pad)]).reshape(m, k).sum(axis=1)
            blocks = L - lo_c
            cost = float(np.sum(costs.forward_s + blocks * costs.block_s
                                + (blocks * rows_c * (T - tok_c) * per_position + rows_c * head) / costs.flops))
            if best is None or cost < best[0]:
                best = (cost, order, k)
    _, order, k = best
    return [list(order[i:i + k]) for i in range(0, len(order), k)]


