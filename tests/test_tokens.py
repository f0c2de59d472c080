"""Tokens: continuation positions, right padding; files: atomic writes."""

import pytest
import torch

from rome_locate.files import atomic_path, write_json, write_text
from rome_locate.tokens import continuation, find_subject_range, pad_id, right_pad


def test_continuation_reads_target_after_prompt(tiny_tokenizer):
    prompt = "Dorven Kaltmoor was born in the city of"
    ids, pos = continuation(tiny_tokenizer, prompt, "Paris")
    assert ids[: pos[0]] == tiny_tokenizer(prompt)["input_ids"]
    assert tiny_tokenizer.decode(ids[pos[0]:]) == " Paris"
    assert pos == list(range(pos[0], len(ids)))
    # A target given with its space is not given a second one.
    assert continuation(tiny_tokenizer, prompt, " Paris") == (ids, pos)
    with pytest.raises(ValueError, match="empty target"):
        continuation(tiny_tokenizer, prompt, "")


def test_subject_search_from_skips_earlier_occurrences(tiny_tokenizer):
    text = "Paris. The Eiffel Tower is in Paris"
    (b, e), occ, ids = find_subject_range(tiny_tokenizer, text, "Paris", search_from=1)
    assert occ == 0 and tiny_tokenizer.decode(ids[b:e]).strip() == "Paris" and b > 3


def test_right_pad_keeps_rows_and_masks(tiny_tokenizer):
    ids, mask = right_pad([[5, 6, 7], [8]], pad_id(tiny_tokenizer))
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == torch.long
    with pytest.raises(ValueError, match="no rows"):
        right_pad([], 0)


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = write_text(tmp_path / "out.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
