"""Throughput plan: per-fact cost of tracing and editing, measured on this CPU and projected to GPUs.

What is measured (one thread): seconds per fact of `trace_fact` (the default
last-subject-token row, and the full tokens x layers table) and of one ROME
edit (`edit_one`: key, value optimisation, update, before/after scoring), on
the shipped fact models and on randomly initialised models of GPT-2 shape,
up to GPT-2-medium (24 layers, d 1024, vocab 50257). For every run a forward
pre-hook on the model counts the token positions that go through the blocks
and through the LM head (with and without gradients), which gives the run's
floating-point operations: 2 x block parameters per block token (+ attention
scores), 2 x d x vocab per head position, x3 for a pass that is
back-propagated (forward + backward).

Projection: the same counts for GPT-2 XL, LLaMA-2-7B and LLaMA-2-70B come
from running the very same code on a tiny model of the target's depth (the
counts depend on depth, tokens, samples, window and the edit settings, not on
width), times the target's FLOPs per position. Time on a GPU = FLOPs /
(peak x utilisation); every assumption is printed with the table.

    OMP_NUM_THREADS=1 python bench/throughput.py [--quick] [--out bench/results/throughput.json]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from locate import NAMES, _prompts, _tokenizer  # noqa: E402  (bench/locate.py: prompts of a given length)

from rome_locate.arch import arch_for  # noqa: E402
from rome_locate.choose import LayerRule, place  # noqa: E402
from rome_locate.editors import BuiltinRome  # noqa: E402
from rome_locate.evaluate import evaluate  # noqa: E402
from rome_locate.facts import Fact  # noqa: E402
from rome_locate.files import write_json  # noqa: E402
from rome_locate.hparams import load_hparams, with_layer  # noqa: E402
from rome_locate.rome import context_templates  # noqa: E402
from rome_locate.costs import ACCELERATOR_MAX_BATCH  # noqa: E402
from rome_locate.runs import effective_window  # noqa: E402
from rome_locate.trace import TraceSettings, noise_level, trace_fact  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KNOWN_1000 = 1209  # facts in ROME's known_1000.json
COUNTERFACT = 21919  # cases in ROME's counterfact.json

# Targets of the projection: shape (layers, d, d_ff, vocab, block parameters) from their published configs.
TARGETS = {
    "gpt2-xl": dict(layers=48, d=1600, vocab=50257, block_params=48 * 12 * 1600 ** 2, hparams="gpt2-xl.yaml",
                    bf16_gib=3.2),
    "llama-2-7b": dict(layers=32, d=4096, vocab=32000, block_params=32 * (4 * 4096 ** 2 + 3 * 4096 * 11008),
                       hparams="llama-2-7b.yaml", bf16_gib=12.6),
    # 70B: grouped-query attention (8 key/value heads of 128), d_ff 28672.
    "llama-2-70b": dict(layers=80, d=8192, vocab=32000,
                        block_params=80 * (2 * 8192 ** 2 + 2 * 8192 * 1024 + 3 * 8192 * 28672),
                        hparams="llama-2-7b.yaml", bf16_gib=128.5),
}
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (A100 80GB SXM: 312 TFLOPS, H100 SXM: 989 TFLOPS,
# H200 SXM: 989 TFLOPS) and memory per GPU.
GPUS = {"A100-80GB": (312e12, 80), "H100-80GB": (989e12, 80), "H200-141GB": (989e12, 141)}
UTILISATION = 0.30  # assumed share of peak reached; see the README section for why and how it scales
PROJECTION_TOKENS = 12  # assumed prompt length of a known_1000 fact in these tokenizers
GPU_COUNTS = (1, 8, 64)


# ---- counting ------------------------------------------------------------------


@dataclasses.dataclass
class Count:
    """Token positions through the blocks and the LM head, without and with gradients."""

    block: int = 0
    head: int = 0
    block_grad: int = 0
    head_grad: int = 0

    def flops(self, block_params: float, d: int, vocab: int, layers: int, context: int) -> float:
        """Floating-point operations of the counted positions for a model of this shape."""
        # Attention scores and their weighted sum: 4 x d x context per layer and position (context: prompt length).
        per_block = 2 * block_params + 4 * d * context * layers
        per_head = 2 * d * vocab
        return (per_block * self.block + per_head * self.head
                + 3 * (per_block * self.block_grad + per_head * self.head_grad))


class Counter:
    """A forward pre-hook that adds up the positions of every model call (generation excluded by the caller)."""

    def __init__(self, model):
        self.count = Count()
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows, n = ids.shape[0], ids.numel()
        keep = kwargs.get("logits_to_keep", 0)
        head = rows * keep if isinstance(keep, int) and keep > 0 else n
        if torch.is_grad_enabled():
            self.count.block_grad += n
            self.count.head_grad += head
        else:
            self.count.block += n
            self.count.head += head

    def take(self) -> Count:
        out, self.count = self.count, Count()
        return out

    def close(self) -> None:
        self.handle.remove()


def _shape(model) -> dict:
    cfg = model.config
    arch = arch_for(model)
    blocks = sum(p.numel() for i in range(arch.n_layers)
                 for p in model.get_submodule(arch.layer_module_tmp.format(i)).parameters())
    return dict(layers=arch.n_layers, d=int(cfg.hidden_size), vocab=int(cfg.vocab_size), block_params=int(blocks))


# ---- models --------------------------------------------------------------------


def random_gpt2(layers: int, d: int, vocab: int, heads: int, seed: int = 0):
    """A randomly initialised GPT-2 of this shape (float32, eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_layer=layers, n_embd=d, n_head=heads, n_positions=256,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _edit_facts(facts: list[Fact]) -> list[Fact]:
    # Another name's first word as the new object (a token the tokenizer knows).
    return [dataclasses.replace(f, target_new=NAMES[(i + 2) % len(NAMES)].split()[0],
                                target=NAMES[(i + 1) % len(NAMES)].split()[0]) for i, f in enumerate(facts)]


def _hparams(name: str, model, layer: int, **override):
    h = load_hparams(ROOT / "hparams" / "ROME" / name, easyedit=False)
    arch = arch_for(model)
    fields = dict(rewrite_module_tmp=arch.rewrite_module_tmp, layer_module_tmp=arch.layer_module_tmp,
                  mlp_module_tmp=arch.mlp_module_tmp, attn_module_tmp=arch.attn_module_tmp,
                  ln_f_module=arch.ln_f_module, lm_head_module=arch.lm_head_module, v_loss_layer=arch.n_layers - 1,
                  mom2_adjustment=False)
    fields.update(override)
    return with_layer(dataclasses.replace(h, **fields), layer, n_layers=arch.n_layers)


# ---- measuring -----------------------------------------------------------------


def measure_trace(name: str, model, tok, facts: list[Fact], samples: int = 10, window: int = 10,
                  full: bool = False) -> dict:
    """Seconds and FLOPs per fact of tracing (mlp kind)."""
    arch = arch_for(model)
    level = noise_level(model, tok, facts, arch)
    counter = Counter(model)
    times, counts, tokens = [], [], []
    try:
        for fact in facts:
            counter.take()
            t0 = time.perf_counter()
            r = trace_fact(model, tok, fact, TraceSettings(samples=samples, window=window, full=full), arch=arch,
                           noise_level=level)
            times.append(time.perf_counter() - t0)
            counts.append(counter.take())
            tokens.append(len(r.tokens))
    finally:
        counter.close()
    return _row(name, "trace full" if full else "trace", model, times, counts, tokens, samples=samples,
                window=effective_window(window, arch.n_layers, "mlp"))


def _edit_one(model, tok, fact: Fact, hparams) -> int:
    """One ROME edit with its measurement, as the pipeline does it per fact; returns the optimisation steps."""
    info: dict = {}
    layer = int(hparams.layers[0])
    placements = place([fact], LayerRule("fixed", layer, (layer,), 0.0, "the hyperparameters"))
    evaluate(model, tok, [fact], hparams, placements, generation=None, editor=BuiltinRome(info=info),
             progress=False)
    return int(info.get(hparams.layers[0], {}).get("steps", 0))


def measure_edit(name: str, model, tok, facts: list[Fact], hparams) -> dict:
    """Seconds and FLOPs per fact of one ROME edit with measurement (templates sampled beforehand: once per model)."""
    context_templates(model, tok, hparams.context_template_length_params, seed=0)
    counter = Counter(model)
    times, counts, tokens, steps = [], [], [], []
    try:
        for fact in facts:
            counter.take()
            t0 = time.perf_counter()
            n_steps = _edit_one(model, tok, fact, hparams)
            times.append(time.perf_counter() - t0)
            counts.append(counter.take())
            tokens.append(len(tok(fact.prompt)["input_ids"]))
            steps.append(n_steps)
    finally:
        counter.close()
    n_templates = len(context_templates(model, tok, hparams.context_template_length_params, seed=0))
    return _row(name, "edit", model, times, counts, tokens, steps=float(np.mean(steps)), templates=n_templates,
                max_steps=int(hparams.v_num_grad_steps))


def _row(name: str, what: str, model, times, counts, tokens, **extra) -> dict:
    shape = _shape(model)
    T = float(np.mean(tokens))
    flops = [c.flops(shape["block_params"], shape["d"], shape["vocab"], shape["layers"], int(T)) for c in counts]
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    row = dict(model=name, what=what, **shape, tokens=T, facts=len(times), s_per_fact=mean(times),
               s_min=float(min(times)), gflop_per_fact=mean(flops) / 1e9,
               achieved_gflops=sum(flops) / sum(times) / 1e9,
               positions=dataclasses.asdict(Count(*[int(np.mean([getattr(c, f.name) for c in counts]))
                                                    for f in dataclasses.fields(Count)])))
    row.update(extra)
    return row


# ---- projection ----------------------------------------------------------------


def projected_counts(layers: int, hparams_name: str, tok, samples: int = 10, window: int = 10,
                     tokens: int = PROJECTION_TOKENS, n: int = 3) -> tuple[Count, Count, int]:
    """Positions per fact of tracing and of one edit for a model of `layers` blocks (a tiny one: counts only)."""
    model = random_gpt2(layers, 16, len(tok), 2)
    facts = _edit_facts(_prompts(tok, tokens, n))
    counter = Counter(model)
    try:
        level = noise_level(model, tok, facts)
        trace = []
        for f in facts:
            counter.take()
            trace_fact(model, tok, f, TraceSettings(samples=samples, window=window), noise_level=level,
                       max_batch=ACCELERATOR_MAX_BATCH)
            trace.append(counter.take())
        h = _hparams(hparams_name, model, layers // 4)
        context_templates(model, tok, h.context_template_length_params, seed=0)
        counter.take()
        edits = []
        for f in facts:
            counter.take()
            # A random tiny model never reaches the early stop: every step runs (the upper bound).
            _edit_one(model, tok, f, h)
            edits.append(counter.take())
    finally:
        counter.close()

    def avg(cs):
        return Count(*[int(np.mean([getattr(c, f.name) for c in cs])) for f in dataclasses.fields(Count)])

    return avg(trace), avg(edits), int(h.v_num_grad_steps)


def projection(tok) -> list[dict]:
    """Seconds per fact and hours for known_1000 on N GPUs, per target model and GPU."""
    rows = []
    for name, t in TARGETS.items():
        trace, edit, steps = projected_counts(t["layers"], t["hparams"], tok)
        args = (t["block_params"], t["d"], t["vocab"], t["layers"], PROJECTION_TOKENS)
        f_trace, f_edit = trace.flops(*args), edit.flops(*args)
        for gpu, (peak, mem) in GPUS.items():
            # A model that does not fit one GPU runs on k GPUs through a device map: accelerate runs the blocks
            # one after the other, so a k-GPU replica computes at one GPU's speed.
            per_replica = int(np.ceil(t["bf16_gib"] * 1.15 / mem))
            rate = peak * UTILISATION
            s_trace, s_edit = f_trace / rate, f_edit / rate
            row = dict(model=name, gpu=gpu, gpus_per_replica=per_replica, tflop_trace=f_trace / 1e12,
                       tflop_edit=f_edit / 1e12, edit_steps=steps, s_trace=s_trace, s_edit=s_edit)
            for n in GPU_COUNTS:
                replicas = n // per_replica
                row[f"known1000_trace_h_{n}gpu"] = None if replicas == 0 else KNOWN_1000 * s_trace / replicas / 3600
                row[f"counterfact_edit_h_{n}gpu"] = None if replicas == 0 else COUNTERFACT * s_edit / replicas / 3600
            rows.append(row)
    return rows


# ---- main ----------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    """Measure, project, print the tables and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=3, help="facts per measured configuration")
    ap.add_argument("--quick", action="store_true", help="skip the GPT-2-medium-shaped model (minutes on one thread)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from rome_locate.fact_models import counterfact_path, facts_path, load_fact_model
    from rome_locate.facts import load_facts

    rows: list[dict] = []

    def run(row: dict) -> None:
        rows.append(row)
        print(f"{row['model']:<26} {row['what']:<10} L={row['layers']:<3} T={row['tokens']:<5.1f} "
              f"{row['s_per_fact']:.3f} s/fact  {row['gflop_per_fact']:.3g} GFLOP  "
              f"{row['achieved_gflops']:.3g} GFLOP/s", flush=True)

    for family in ("gpt2", "llama"):
        model, tok = load_fact_model(family)
        facts = load_facts(facts_path(family), limit=args.facts)
        run(measure_trace(f"fact model {family}", model, tok, facts))
        run(measure_trace(f"fact model {family}", model, tok, facts, full=True))
        cf = load_facts(counterfact_path(family), limit=args.facts)
        h = load_hparams(ROOT / "hparams" / "ROME" / f"fact-{family}.yaml", easyedit=False)
        h = dataclasses.replace(h, stats_dir=str(ROOT / "rome_locate" / "fact_models" / family / "stats"))
        run(measure_edit(f"fact model {family}", model, tok, cf, h))

    tok = _tokenizer()
    # Scaling with layers, tokens, samples and window on a small width (cheap), then GPT-2-medium's shape.
    for layers in (6, 12, 24):
        model = random_gpt2(layers, 256, len(tok), 4)
        for T in (10, 20):
            run(measure_trace("random d256", model, tok, _prompts(tok, T, args.facts)))
    model = random_gpt2(12, 256, len(tok), 4)
    facts = _prompts(tok, 10, args.facts)
    for S in (5, 20):
        run(measure_trace(f"random d256 S={S}", model, tok, facts, samples=S))
    for w in (1, 4):
        run(measure_trace(f"random d256 w={w}", model, tok, facts, window=w))
    run(measure_edit("random d256 edit", model, tok, _edit_facts(facts), _hparams("gpt2-medium.yaml", model, 4,
                     v_num_grad_steps=5, context_template_length_params=[[5, 5]])))
    if not args.quick:
        model = random_gpt2(24, 1024, 50257, 16)
        facts = _prompts(tok, 12, 2)
        run(measure_trace("random gpt2-medium shape", model, tok, facts))
        run(measure_edit("random gpt2-medium shape", model, tok, _edit_facts(facts),
                         _hparams("gpt2-medium.yaml", model, 8, v_num_grad_steps=3,
                                  context_template_length_params=[[5, 5]])))

    proj = projection(tok)
    print()
    print(f"{'model':<26} {'what':<10} {'L':>3} {'T':>5} {'s/fact':>8} {'GFLOP/fact':>11} {'GFLOP/s':>8}")
    for r in rows:
        print(f"{r['model']:<26} {r['what']:<10} {r['layers']:>3} {r['tokens']:>5.1f} {r['s_per_fact']:>8.3f} "
              f"{r['gflop_per_fact']:>11.3g} {r['achieved_gflops']:>8.3g}")
    print()
    print(f"projection: bf16, {UTILISATION:.0%} of the dense peak, prompts of {PROJECTION_TOKENS} tokens, "
          f"S=10, w=10, edits at every step of the EasyEdit hyperparameters")
    head = f"{'model':<12} {'gpu':<11} {'gpus/rep':>8} {'TFLOP tr':>9} {'TFLOP ed':>9} {'s trace':>8} {'s edit':>7}"
    head += "".join(f" {'k1000 h@' + str(n):>11}" for n in GPU_COUNTS)
    head += "".join(f" {'CF edit h@' + str(n):>12}" for n in GPU_COUNTS)
    print(head)
    for r in proj:
        line = (f"{r['model']:<12} {r['gpu']:<11} {r['gpus_per_replica']:>8} {r['tflop_trace']:>9.3g} "
                f"{r['tflop_edit']:>9.3g} {r['s_trace']:>8.3g} {r['s_edit']:>7.3g}")
        line += "".join(f" {_fmt(r[f'known1000_trace_h_{n}gpu']):>11}" for n in GPU_COUNTS)
        line += "".join(f" {_fmt(r[f'counterfact_edit_h_{n}gpu']):>12}" for n in GPU_COUNTS)
        print(line)
    write_json(Path(args.out), {
        "measured": rows, "projection": proj,
        "assumptions": {"utilisation": UTILISATION, "gpus": {k: {"bf16_dense_peak_flops": p, "memory_gib": m}
                                                            for k, (p, m) in GPUS.items()},
                        "prompt_tokens": PROJECTION_TOKENS, "known_1000": KNOWN_1000, "counterfact": COUNTERFACT,
                        "targets": TARGETS, "samples": 10, "window": 10,
                        "backward_cost": "3x the forward of the same positions",
                        "device_map": "a replica on k GPUs computes at one GPU's speed (blocks run in turn)"},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
        "processor": platform.processor(), "note": "shared 2-core machine, noisy; one thread; no GPU was used",
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
