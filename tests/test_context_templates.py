"""ROME's context templates: the count asked for is the count sampled, also below one per prefix."""

from __future__ import annotations

import pytest

from conftest import build_tiny_model
from rome_locate.rome import TEMPLATE_PREFIXES, context_templates


@pytest.mark.parametrize("count", [1, 2, 7, 10])
def test_every_asked_template_is_sampled(tiny_tokenizer, count):
    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    templates = context_templates(model, tiny_tokenizer, [[4, count]], seed=0)
    assert templates[0] == "{}" and len(templates) == 1 + count
    assert all(t.endswith(". {}") for t in templates[1:])
    # The first `count % 5` prefixes give one more; every prefix gives count // 5.
    # Longest prefix first: "The" also begins "Therefore".
    first = [max((p for p in TEMPLATE_PREFIXES if t.startswith(p)), key=len) for t in templates[1:]]
    starts = [first.count(p) for p in TEMPLATE_PREFIXES]
    per, extra = divmod(count, len(TEMPLATE_PREFIXES))
    assert starts == [per + (i < extra) for i in range(len(TEMPLATE_PREFIXES))]
