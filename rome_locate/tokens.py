"""Tokens: where a subject and a target sit in a tokenized prompt, and right-padded batches."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def token_offsets(tok: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (with the tokenizer's special tokens) and each token's character span.

    Special tokens (a BOS) get the empty span (p, p), so they never overlap text.
    """
    try:
        enc = tok(text, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        pass
    # Slow tokenizers have no offset mapping: grow the decoded prefix one token at a time.
    ids = list(tok(text)["input_ids"])
    special = set(getattr(tok, "all_special_ids", []) or [])
    offsets, prev = [], 0
    for i, tid in enumerate(ids):
        if tid in special:
            offsets.append((prev, prev))
            continue
        end = len(tok.decode([t for t in ids[: i + 1] if t not in special]))
        offsets.append((prev, max(prev, end)))
        prev = max(prev, end)
    return ids, offsets


def char_range_tokens(tok: Any, text: str, cs: int, ce: int) -> tuple[list[int], tuple[int, int] | None]:
    """Token ids of `text` and the half-open range of tokens overlapping characters [cs, ce)."""
    ids, offsets = token_offsets(tok, text)
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < ce and e > cs]
    return ids, ((inside[0], inside[-1] + 1) if inside else None)


def subject_starts(prompt: str, subject: str) -> list[int]:
    """Character positions of every occurrence of `subject` in `prompt` (overlaps included)."""
    return [i for i in range(len(prompt)) if prompt.startswith(subject, i)]


def find_subject_range(tok: Any, prompt: str, subject: str, occurrence: int = 0,
                       search_from: int = 0) -> tuple[tuple[int, int], int, list[int]]:
    """Half-open token range of `subject` in `prompt`, the occurrence used (0-based) and the prompt's ids.

    The default `occurrence=0` is the first occurrence at or after character
    `search_from`, as ROME's `find_token_range` uses; negative values count from
    the end (-1 = last). A token is part of the subject when its character span
    overlaps the subject's characters, so a subject ending inside a token
    includes that token.
    """
    if not subject:
        raise ValueError(f"empty subject for prompt {prompt!r}")
    starts = [s for s in subject_starts(prompt, subject) if s >= search_from]
    if not starts:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    try:
        cs = starts[occurrence]
    except IndexError:
        raise ValueError(
            f"subject {subject!r} occurs {len(starts)} time(s) in prompt {prompt!r}; occurrence {occurrence} asked"
        ) from None
    ids, rng = char_range_tokens(tok, prompt, cs, cs + len(subject))
    if rng is None:
        raise ValueError(f"no token of prompt {prompt!r} covers subject {subject!r}")
    return rng, starts.index(cs), ids


def continuation(tok: Any, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """(ids of `prompt` followed by `target`, positions of the target's tokens in them).

    The whole string is tokenized and the target's tokens read from the offsets,
    which avoids the leading-space and BOS pitfalls of tokenizing the target alone
    (BPE and SentencePiece alike). A space is put between them unless one is there.
    """
    if not target:
        raise ValueError(f"empty target after prompt {prompt!r}")
    sep = "" if (not prompt or prompt[-1].isspace() or target[:1].isspace()) else " "
    ids, offsets = token_offsets(tok, prompt + sep + target)
    positions = [i for i, (a, b) in enumerate(offsets) if b > a and a >= len(prompt)]
    if not positions or positions[0] == 0:
        raise ValueError(f"target {target!r} gives no tokens after prompt {prompt!r}")
    return ids[: positions[-1] + 1], positions


def pad_id(tok: Any) -> int:
    """The id used to pad: the tokenizer's pad token, else its EOS, else 0."""
    for value in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return 0


def right_pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `rows`, right-padded.

    Right padding keeps every row's positions 0..n-1, so causal models need no
    position ids and each row reads exactly as it would alone.
    """
    if not rows:
        raise ValueError("no rows to batch")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)
