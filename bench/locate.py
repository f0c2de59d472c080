"""Benchmark: ROME notebook's full-table tracing procedure against rome_locate's fast last-subject-token path.

The reference procedure (written here from the method, as ROME's notebook
runs it): for every token and every layer, one forward of a batch of S+1 rows,
row 0 clean and rows 1..S noised with a fresh numpy RandomState(1), the clean
MLP outputs of row 0 copied into rows 1..S over the window, p(answer) averaged
over rows 1..S; the layer choice is read from the last subject token's row.
The fast path is `trace_fact(..., noise_draws="rome")`: only that row, several
layers' restorations batched in one forward. Both use the same noise draws,
so their layer choices must be identical.

    OMP_NUM_THREADS=1 python bench/locate.py [--facts 3] [--out bench/results/locate.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rome_locate.arch import arch_for  # noqa: E402
from rome_locate.choose import choose_layer  # noqa: E402
from rome_locate.facts import Fact  # noqa: E402
from rome_locate.files import write_json  # noqa: E402
from rome_locate.hooks import patched  # noqa: E402
from rome_locate.models import input_device  # noqa: E402
from rome_locate.tokens import find_subject_range  # noqa: E402
from rome_locate.runs import effective_window, window_layers  # noqa: E402
from rome_locate.trace import TraceSettings, noise_level, trace_fact  # noqa: E402

SAMPLES = 10
WORDS = ("north river stone garden silver market tower castle valley harbor forest bridge window mountain "
         "village station lantern meadow orchard island temple canyon desert glacier").split()
NAMES = ["Dorven Kaltmoor", "Alma Berridge", "Miles Davis", "Marta Lind", "Osric Vellan", "Teodor Halm"]


def reference_full_table(model, tok, fact: Fact, noise: float, samples: int, window: int) -> tuple[list, float, int]:
    """ROME notebook procedure: one (S+1)-row forward per (token, layer); returns (table, p_corrupt, answer)."""
    arch = arch_for(model)
    L = arch.n_layers
    (b, e), _, ids = find_subject_range(tok, fact.prompt, fact.subject)
    device = input_device(model)
    inp = torch.tensor([ids] * (samples + 1), device=device)
    with torch.no_grad():
        answer = int(model(inp[:1]).logits[0, -1].argmax())

    def corrupt(x):
        rs = np.random.RandomState(1)  # fresh per run, as ROME's trace_with_patch
        x = x.clone()
        x[1:, b:e] += noise * torch.from_numpy(rs.randn(samples, e - b, x.shape[2])).to(x.device)
        return x

    def run(token: int | None, layers) -> float:
        def restore(h):
            h = h.clone()
            h[1:, token] = h[0, token]
            return h

        edits = {arch.embed: corrupt}
        edits.update({arch.module("mlp", m): restore for m in layers})
        with torch.no_grad(), patched(model, edits):
            logits = model(inp).logits
        return float(torch.softmax(logits[1:, -1, :].float(), dim=1).mean(dim=0)[answer])

    low = run(None, [])
    table = [[run(t, window_layers(layer, window, L)) for layer in range(L)] for t in range(len(ids))]
    return table, low, answer


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_model(name: str, model, tok, facts: list[Fact]) -> dict:
    """Time both procedures on each fact; check the choices agree."""
    arch = arch_for(model)
    level = noise_level(model, tok, facts, arch)
    w = effective_window(10, arch.n_layers, "mlp")
    settings = TraceSettings(noise_draws="rome", samples=SAMPLES, window=10)
    ref_t, fast_t, full_t, same, diffs, tokens = [], [], [], [], [], []
    for fact in facts:
        (table, low, answer), t_ref = _timed(lambda: reference_full_table(model, tok, fact, level, SAMPLES, w))
        fast, t_fast = _timed(lambda: trace_fact(model, tok, fact, settings, arch=arch, noise_level=level))
        _, t_full = _timed(lambda: trace_fact(model, tok, fact, dataclasses.replace(settings, full=True), arch=arch,
                                              noise_level=level))
        assert fast.answer_id == answer
        e = fast.subject_range[1]
        row = table[e - 1]
        ref_layer = int(np.argmax(np.array(row) - low))
        same.append(ref_layer == choose_layer(fast).layer)
        diffs.append(float(np.max(np.abs(np.array(row) - np.array(fast.scores)))))
        ref_t.append(t_ref)
        fast_t.append(t_fast)
        full_t.append(t_full)
        tokens.append(len(fast.tokens))
    ref, fst, full = float(np.mean(ref_t)), float(np.mean(fast_t)), float(np.mean(full_t))
    return {
        "model": name, "layers": arch.n_layers, "d": int(model.config.hidden_size),
        "vocab": int(model.config.vocab_size), "tokens": float(np.mean(tokens)), "facts": len(facts),
        "samples": SAMPLES, "window": w, "reference_s_per_fact": ref, "fast_s_per_fact": fst,
        "full_batched_s_per_fact": full, "speedup": ref / fst, "full_speedup": ref / full,
        "same_choice": all(same), "choices_equal": f"{sum(same)}/{len(same)}", "max_abs_score_diff": max(diffs),
    }


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = [" ".join(WORDS)] * 5 + NAMES * 5
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def _random_gpt2(vocab: int, n_layers: int, d: int = 128, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_layer=n_layers, n_embd=d, n_head=4, n_positions=256,
                     tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # a peaked prediction, as a trained model has
    return model


def _prompts(tok, n_tokens: int, n_facts: int) -> list[Fact]:
    facts = []
    rng = np.random.RandomState(0)
    for i in range(n_facts):
        subject = NAMES[i % len(NAMES)]
        words = []
        while len(tok(subject + " " + " ".join(words))["input_ids"]) < n_tokens:
            words.append(WORDS[rng.randint(len(WORDS))])
        facts.append(Fact(prompt=subject + " " + " ".join(words), subject=subject, id=str(i)))
    return facts


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=3, help="facts per configuration")
    ap.add_argument("--depths", default="6,12,24", help="layers of the random GPT-2 configs")
    ap.add_argument("--lengths", default="10,30", help="prompt lengths (tokens) of the random configs")
    ap.add_argument("--no-fact-model", action="store_true", help="skip the shipped fact model")
    ap.add_argument("--out", default="bench/results/locate.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    rows = []
    if not args.no_fact_model:
        try:
            from rome_locate.fact_models import facts_path, load_fact_model
            from rome_locate.facts import load_facts

            model, tok = load_fact_model("gpt2")
            facts = load_facts(facts_path("gpt2"), limit=args.facts)
            rows.append(bench_model("fact model gpt2", model, tok, facts))
            print(rows[-1], flush=True)
        except (FileNotFoundError, OSError, ImportError) as exc:
            print(f"fact model gpt2 skipped: {exc}", flush=True)
    tok = _tokenizer()
    for depth in [int(x) for x in args.depths.split(",")]:
        model = _random_gpt2(len(tok), depth)
        for n_tokens in [int(x) for x in args.lengths.split(",")]:
            rows.append(bench_model(f"random gpt2 L={depth}", model, tok, _prompts(tok, n_tokens, args.facts)))
            print(rows[-1], flush=True)

    head = f"{'model':<18} {'L':>3} {'T':>5} {'ref s/fact':>11} {'fast s/fact':>12} {'speedup':>8} " \
           f"{'full(batched) s':>16} {'same choice':>12} {'max |diff|':>11}"
    print(head)
    for r in rows:
        print(f"{r['model']:<18} {r['layers']:>3} {r['tokens']:>5.1f} {r['reference_s_per_fact']:>11.3f} "
              f"{r['fast_s_per_fact']:>12.4f} {r['speedup']:>7.1f}x {r['full_batched_s_per_fact']:>16.3f} "
              f"{r['choices_equal']:>12} {r['max_abs_score_diff']:>11.2e}")
    write_json(Path(args.out), {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                "machine": platform.platform(), "processor": platform.processor()})
    print(f"wrote {args.out}")
    return 0 if all(r["same_choice"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
