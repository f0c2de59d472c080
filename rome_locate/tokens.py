"""Tokens: where a subject and a target sit in a tokenized prompt, and right-padded batches.

A prompt is tokenized as the text `prompts.model_input` makes of it (the prompt, or with `chat_template` the
prompt as a user turn of the tokenizer's chat template); character positions given here are the prompt's own,
and token positions those of the model's input.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .prompts import model_input


def token_offsets(tok: Any, text: str, special_tokens: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (with the tokenizer's special tokens unless `special_tokens` is False) and each token's
    character span.

    Added special tokens (a BOS) get the empty span (p, p), so they never overlap text.
    """
    try:
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=special_tokens)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        pass
    # Slow tokenizers have no offset mapping: grow the decoded prefix one token at a time.
    ids = list(tok(text, add_special_tokens=special_tokens)["input_ids"])
    # Without added special tokens every token comes from the text (a chat template writes its own), so none is skipped.
    special = set(getattr(tok, "all_special_ids", []) or []) if special_tokens else set()
    offsets, prev = [], 0
    for i, tid in enumerate(ids):
        if tid in special:
            offsets.append((prev, prev))
            continue
        end = len(tok.decode([t for t in ids[: i + 1] if t not in special]))
        offsets.append((prev, max(prev, end)))
        prev = max(prev, end)
    return ids, offsets


def char_range_tokens(tok: Any, prompt: str, cs: int, ce: int,
                      chat_template: bool = False) -> tuple[list[int], tuple[int, int] | None]:
    """Token ids of the model input of `prompt` and the half-open range of tokens overlapping the prompt's
    characters [cs, ce)."""
    mi = model_input(tok, prompt, chat_template)
    cs, ce = cs + mi.start, ce + mi.start
    ids, offsets = token_offsets(tok, mi.text, mi.special_tokens)
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < ce and e > cs]
    return ids, ((inside[0], inside[-1] + 1) if inside else None)


def prompt_ids(tok: Any, prompt: str, chat_template: bool = False, max_length: int | None = None) -> list[int]:
    """Token ids of the model input of `prompt` (truncated to `max_length` tokens, as the tokenizer truncates)."""
    mi = model_input(tok, prompt, chat_template)
    cut = {} if max_length is None else {"truncation": True, "max_length": max_length}
    return list(tok(mi.text, add_special_tokens=mi.special_tokens, **cut)["input_ids"])


def subject_starts(prompt: str, subject: str) -> list[int]:
    """Character positions of every occurrence of `subject` in `prompt` (overlaps included)."""
    return [i for i in range(len(prompt)) if prompt.startswith(subject, i)]


def find_subject_range(tok: Any, prompt: str, subject: str, occurrence: int = 0, search_from: int = 0,
                       chat_template: bool = False) -> tuple[tuple[int, int], int, list[int]]:
    """Half-open token range of `subject` in `prompt`, the occurrence used (0-based) and the prompt's ids (those
    of its model input: with `chat_template`, the range is the subject's tokens inside the templated prompt).

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
    ids, rng = char_range_tokens(tok, prompt, cs, cs + len(subject), chat_template)
    if rng is None:
        raise ValueError(f"no token of prompt {prompt!r} covers subject {subject!r}")
    return rng, starts.index(cs), ids


def continuation(tok: Any, prompt: str, target: str, chat_template: bool = False) -> tuple[list[int], list[int]]:
    """(ids of `prompt`'s model input followed by `target`, positions of the target's tokens in them).

    The whole string is tokenized and the target's tokens read from the offsets,
    which avoids the leading-space and BOS pitfalls of tokenizing the target alone
    (BPE and SentencePiece alike). A space is put between them unless one is there.
    With `chat_template` the target follows the template's generation prompt: it is the assistant's answer.
    """
    if not target:
        raise ValueError(f"empty target after prompt {prompt!r}")
    mi = model_input(tok, prompt, chat_template)
    text = mi.text
    sep = "" if (not text or text[-1].isspace() or target[:1].isspace()) else " "
    ids, offsets = token_offsets(tok, text + sep + target, mi.special_tokens)
    positions = [i for i, (a, b) in enumerate(offsets) if b > a and a >= len(text)]
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
