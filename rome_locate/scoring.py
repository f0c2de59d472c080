"""Scoring: teacher-forced probabilities and top-1 tokens of targets after prompts, EasyEdit's accuracies, and the
short greedy continuations the generation-based metrics read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .models import input_device
from .tokens import continuation, pad_id, prompt_ids, right_pad


def token_accuracy(predicted: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> float | None:
    """EasyEdit's accuracy: per prompt the share of target tokens that are the teacher-forced top-1, averaged."""
    if len(predicted) != len(targets):
        raise ValueError(f"token_accuracy: {len(predicted)} predictions for {len(targets)} targets")
    per_prompt = []
    for pred, tgt in zip(predicted, targets):
        if len(pred) != len(tgt) or not tgt:
            raise ValueError(f"token_accuracy: prediction {list(pred)} does not match target {list(tgt)}")
        per_prompt.append(np.mean([p == t for p, t in zip(pred, tgt)]))
    return float(np.mean(per_prompt)) if per_prompt else None


def top1_agreement(before: Sequence[Sequence[int]], after: Sequence[Sequence[int]]) -> float | None:
    """EasyEdit's locality: per prompt the share of top-1 tokens unchanged by the edit, averaged."""
    return token_accuracy(after, before)



@dataclass(frozen=True)
class PairScore:
    """Teacher-forced scores of one target after one prompt (in memory only: it holds a tensor)."""

    nll: float  # mean per-token negative log-likelihood of the target
    target_ids: tuple[int, ...]
    predicted: tuple[int, ...]  # teacher-forced top-1 at each target position
    next_logp: torch.Tensor | None  # log-distribution of the token after the prompt

    @property
    def prob(self) -> float:
        """Per-token geometric-mean probability exp(-mean NLL)."""
        return math.exp(-self.nll)


def _encode_pair(tok, prompt: str, target: str | None, chat_template: bool) -> tuple[list[int], int]:
    """Token ids of the prompt followed by the target and the prompt's length; target None: the prompt only."""
    if not target:
        p_ids = prompt_ids(tok, prompt, chat_template)
        if not p_ids:
            raise ValueError(f"prompt {prompt!r} tokenizes to nothing")
        return p_ids, len(p_ids)
    ids, positions = continuation(tok, prompt, target, chat_template)
    return ids, positions[0]


@torch.no_grad()
def score_targets(model, tok, pairs: Sequence[tuple[str, str | None]], *, batch_size: int = 32,
                  keep_next: bool = False, chat_template: bool = False) -> list[PairScore]:
    """Teacher-forced scores of `(prompt, target)` pairs, batched with right padding (positions stay exact); with
    `chat_template` each prompt is a user turn of the chat template and the target the assistant's answer."""
    device = input_device(model)
    encoded = [_encode_pair(tok, p, t, chat_template) for p, t in pairs]
    pad = pad_id(tok)
    out: list[PairScore] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        input_ids, mask = right_pad([ids for ids, _ in chunk], pad, device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        for row, (ids, n_prompt) in enumerate(chunk):
            tgt = ids[n_prompt:]
            rows = logp[row, n_prompt - 1:len(ids) - 1]
            if tgt:
                tgt_t = torch.tensor(tgt)
                nll = float(-rows.gather(1, tgt_t[:, None]).sum() / len(tgt))
                predicted = tuple(int(i) for i in rows.argmax(-1))
            else:
                nll, predicted = float("nan"), (int(logp[row, n_prompt - 1].argmax()),)
            nxt = logp[row, n_prompt - 1].clone() if keep_next else None
            out.append(PairScore(nll=nll, target_ids=tuple(tgt), predicted=predicted, next_logp=nxt))
    return out


@torch.no_grad()
def greedy_continuations(model, tok, prompts: Sequence[str], max_new: Sequence[int], *,
                         batch_size: int = 32, chat_template: bool = False) -> list[str]:
    """The greedy continuation of each prompt, at most `max_new[i]` new tokens, stopped early at the end-of-text
    token, decoded without special tokens.

    Rows are right-padded and each reads its next token at its own last position, so a prompt continues exactly
    as it would alone (up to float rounding), whatever it is batched with.
    """
    if len(max_new) != len(prompts):
        raise ValueError(f"greedy_continuations: {len(max_new)} lengths for {len(prompts)} prompts")
    device, pad = input_device(model), pad_id(tok)
    eos = getattr(tok, "eos_token_id", None)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [prompt_ids(tok, p, chat_template) for p in prompts[start:start + batch_size]]
        limits = list(max_new[start:start + batch_size])
        new: list[list[int]] = [[] for _ in rows]
        done = [n < 1 for n in limits]
        while not all(done):
            live = [i for i, d in enumerate(done) if not d]
            seqs = [rows[i] + new[i] for i in live]
            input_ids, mask = right_pad(seqs, pad, device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            last = torch.tensor([len(q) - 1 for q in seqs], device=logits.device)
            picked = logits[torch.arange(len(live), device=logits.device), last].argmax(-1).tolist()
            for i, token in zip(live, picked):
                if eos is not None and token == eos:
                    done[i] = True
                    continue
                new[i].append(int(token))
                done[i] = len(new[i]) >= limits[i]
        out += [tok.decode(ids, skip_special_tokens=True) for ids in new]
    return out
