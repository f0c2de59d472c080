"""Issue 20 (2): generation-based efficacy and paraphrase, portability and locality by key, in the records, the
summary (with 95% intervals) and the report."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from conftest import build_tiny_model
from rome_locate.evaluate import evaluate_fact, generate
from rome_locate.facts import Fact, Probe, neighbours
from rome_locate.metrics import GEN_EXTRA_TOKENS, generation_metrics, generation_success
from rome_locate.outcome import GenerationSettings
from rome_locate.scoring import greedy_continuations, score_targets, token_accuracy
from rome_locate.summary import summarize
from test_evaluate import FACT, ContextEditor, FakeHParams, bias_edit


@pytest.mark.parametrize("continuation, target, says", [
    (" Paris", "Paris", True),
    ("  paris,  France", "Paris", True),  # whitespace and case normalised, a comma ends the word
    (" Parisian food", "Paris", False),  # not at a word boundary
    (" New\n York City", "New York", True),
    (" New Jersey", "New York", False),
    ("", "Paris", False),
    (" the U.S.A", "the U.S.", True),  # a target ending in punctuation needs no boundary after it
])
def test_generation_rule(continuation, target, says):
    assert generation_success(continuation, target) is says


def test_generation_metrics_share_of_prompts():
    before = {"edit": [" London"], "paraphrase": [" London", " Paris"]}
    after = {"edit": [" Paris is"], "paraphrase": [" Paris", " paris", " Rome"]}
    m = generation_metrics(before, after, "Paris")
    assert (m["gen_efficacy"], m["gen_efficacy_pre"]) == (1.0, 0.0)
    assert m["gen_paraphrase"] == pytest.approx(2 / 3) and m["gen_paraphrase_pre"] == 0.5
    assert generation_metrics({"edit": [" x"]}, {"edit": [" x"]}, "x")["gen_paraphrase"] is None


class Bigram(torch.nn.Module):
    """A test double of a causal LM: the next token depends on the last token only, read from `table`."""

    def __init__(self, vocab: int, table: dict[int, int], default: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 1)  # where inputs go (rome_locate.models.input_device)
        self.vocab, self.table, self.default = vocab, dict(table), default

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, **_):
        nxt = torch.tensor([[self.table.get(int(t), self.default) for t in row] for row in input_ids])
        logits = torch.full((*input_ids.shape, self.vocab), -10.0)
        logits.scatter_(-1, nxt[..., None], 10.0)
        return SimpleNamespace(logits=logits)


def test_teacher_forcing_says_success_where_generation_says_failure(tiny_tokenizer):
    """The first token of target_new becomes top-1 after the edit, but the continuation goes elsewhere."""
    tok = tiny_tokenizer
    ids = lambda text: tok(text)["input_ids"]  # noqa: E731
    fact = Fact(prompt="Miles Davis plays the", subject="Miles Davis", target="trumpet",
                target_new="city of Paris", id="m")
    last, city, of, paris, astray = ids(fact.prompt)[-1], ids(" city")[0], ids(" of")[0], ids(" Paris")[0], \
        ids(" the")[0]
    assert len(ids(" city of Paris")) == 3 and len(ids(" the")) == 1  # target_new's later tokens can go astray
    # After the edit: prompt -> " city" (target_new's first token), " city" -> " of", " of" -> " the".
    model = Bigram(len(tok), {last: ids(" trumpet")[0], city: of, of: astray}, default=astray)

    @contextmanager
    def edit(model, tok, fact, hparams):
        model.table[last] = city
        try:
            yield
        finally:
            model.table[last] = ids(" trumpet")[0]

    m = evaluate_fact(model, tok, fact, FakeHParams(), editor=ContextEditor(edit), generation=None).metrics
    assert (m["success_pre"], m["success"]) == (0.0, 1.0)  # teacher forcing: the first token is top-1
    assert m["rewrite_acc"] == pytest.approx(2 / 3)  # " city" and " of" right, " Paris" not
    assert (m["gen_efficacy_pre"], m["gen_efficacy"]) == (0.0, 0.0)  # generation: "city of the"
    assert paris not in model.table.values()
    # The continuation it judged: greedy, at most len(target tokens) + 2 new tokens.
    model.table[last] = city
    [text] = greedy_continuations(model, tok, [fact.prompt], [3 + GEN_EXTRA_TOKENS])
    assert text == " city of the city of"  # " the" is the prompt's last token too: the loop goes round


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_continuations_batched_equal_generate_alone(tiny_tokenizer, family):
    model = build_tiny_model(family, len(tiny_tokenizer), n_layers=2)
    prompts = ["The Space Needle is in the city of", "Miles Davis plays", "Alma Berridge speaks the language of"]
    batched = greedy_continuations(model, tiny_tokenizer, prompts, [4, 6, 5])
    alone = [generate(model, tiny_tokenizer, [p], GenerationSettings(max_new_tokens=n))[0]
             for p, n in zip(prompts, [4, 6, 5])]
    assert batched == alone


PORTABLE = Fact(prompt=FACT.prompt, subject=FACT.subject, target=FACT.target, target_new=FACT.target_new,
                rephrase_prompts=FACT.rephrase_prompts,
                locality=neighbours(("The Eiffel Tower is in",), ("Paris",))
                + (Probe("Relation_Specificity", "Miles Davis plays the", "trumpet"),
                   Probe("Relation_Specificity", "The Space Needle is in the city of", "Seattle")),
                portability=(Probe("Reasoning", "Dorven Kaltmoor's city is in the", "Paris"),
                             Probe("Reasoning", "Dorven Kaltmoor lives in the city of", None),
                             Probe("Subject_Aliasing", "Dorven K. was born in the city of", "Paris")),
                id="p0")


def _acc(model, tok, pairs):
    scores = score_targets(model, tok, pairs)
    return [token_accuracy([s.predicted], [s.target_ids]) for s in scores]


def test_portability_and_locality_by_key_as_easyedit_defines_them(tiny_tokenizer):
    model, tok = build_tiny_model("gpt2", len(tiny_tokenizer), n_layers=4), tiny_tokenizer
    rec = evaluate_fact(model, tok, PORTABLE, FakeHParams(), editor=ContextEditor(bias_edit), generation=None)
    m = rec.metrics
    # Portability: per probe, the share of the answer's tokens that are the teacher-forced top-1; per key the mean
    # over its probes (a probe without an answer has nothing to score); `portability`, the mean over the keys.
    with bias_edit(model, tok, PORTABLE, FakeHParams()):
        reasoning, aliasing = _acc(model, tok, [(PORTABLE.portability[0].prompt, "Paris"),
                                                (PORTABLE.portability[2].prompt, "Paris")])
    assert m["portability.Reasoning"] == pytest.approx(reasoning)
    assert m["portability.Subject_Aliasing"] == pytest.approx(aliasing)
    assert m["portability"] == pytest.approx((reasoning + aliasing) / 2)
    pre = _acc(model, tok, [(PORTABLE.portability[0].prompt, "Paris"), (PORTABLE.portability[2].prompt, "Paris")])
    assert m["portability.Reasoning_pre"] == pytest.approx(pre[0])
    # Locality: per key, the share of teacher-forced top-1 tokens the edit left unchanged; then the keys' mean.
    assert set(m) >= {"locality.neighborhood", "locality.Relation_Specificity"}
    assert m["locality"] == pytest.approx((m["locality.neighborhood"] + m["locality.Relation_Specificity"]) / 2)
    assert 0 <= m["gen_efficacy"] <= 1 and m["gen_paraphrase"] is not None

    s = summarize([rec, rec])
    iv = s["intervals"]
    assert set(iv) >= {"gen_efficacy", "gen_efficacy_pre", "gen_paraphrase", "gen_paraphrase_pre", "portability",
                       "portability_pre", "portability.Reasoning", "locality", "locality.Relation_Specificity"}
    assert iv["gen_efficacy"]["kind"] == "wilson" and iv["portability"]["kind"] == "bootstrap"
    low, high = iv["portability.Reasoning"]["interval"]
    assert iv["portability.Reasoning"]["mean"] == pytest.approx(reasoning) and low <= reasoning + 1e-9
    assert reasoning - 1e-9 <= high
    assert iv["gen_efficacy"]["n"] == 2


def test_report_shows_the_new_figures(tiny_tokenizer, tmp_path):
    from rome_locate.report import edit_summary_line, write_report

    model, tok = build_tiny_model("gpt2", len(tiny_tokenizer), n_layers=4), tiny_tokenizer
    rec = evaluate_fact(model, tok, PORTABLE, FakeHParams(), editor=ContextEditor(bias_edit), generation=None)
    paths = write_report([rec], tmp_path, {"model": "tiny"})
    md, html = paths["md"].read_text(), paths["html"].read_text()
    for text in (md, html):
        assert "Generation, portability and locality by key" in text
        assert "generation efficacy (the greedy continuation says target_new)" in text
        assert "EasyEdit portability [Reasoning]" in text and "EasyEdit locality [Relation_Specificity]" in text
    # The summary's interval table: metric | before | after | facts, each figure with its interval.
    rows = [l for l in md.splitlines() if l.startswith("| portability.Subject_Aliasing |") and l.count("|") == 5]
    assert len(rows) == 1 and rows[0].count("[") == 2 and rows[0].endswith("| 1 |")
    import json

    data = json.loads(paths["json"].read_text())
    assert "gen_paraphrase" in data["records"][0]["metrics"] and "gen_paraphrase" in data["summary"]["intervals"]
    assert "gen_efficacy" in edit_summary_line(data["summary"], "builtin", "fixed")
