"""Benchmark: the same ROME trace in rome-locate, nnsight, TransformerLens (TransformerBridge) and pyvene.

Every implementation gets the same fact, noise level and ROME's noise draw
(numpy RandomState(1), S samples, added to the subject's token embeddings),
restores the clean MLP outputs of the window around each layer at a token, and
reports p(clean top-1) averaged over the samples. Each peer is written the way
its documentation shows patching: one patched run of the S noised rows per
(token, layer) site. The implementations run interleaved in one process on one
thread, each on its own copy of the model; their numbers are checked against
rome-locate's to 1e-4.

rome-locate is timed two ways: one fact per call (`trace_fact`, as the peers
run) and all the facts in one call (`trace_facts`, as `locate` runs them:
facts of one prompt length share forwards); the batched call runs three times
through the per-fact loop and is reported per fact. The first fact of a model
warms every implementation up and is not timed when there are more than two;
per-fact calls are reported by their median over the timed facts, and the
batched call, which traces the timed facts, is compared with the peers' mean
over the same facts. Attribution patching (full mode) likewise, each fact's
per-call time the median of three calls, with its agreement with the exact table.

The peers are not dependencies of rome-locate: install them in a separate
environment (`pip install -e .[bench]`), then

    OMP_NUM_THREADS=1 python bench/peers.py [--models fact-gpt2,fact-llama,medium] [--modes row,full]
        [--facts 5] [--out bench/results/peers.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rome_locate.arch import arch_for  # noqa: E402
from rome_locate.atp import attribution_each, attribution_trace  # noqa: E402
from rome_locate.facts import Fact  # noqa: E402
from rome_locate.files import write_json  # noqa: E402
from rome_locate.tokens import find_subject_range  # noqa: E402
from rome_locate.runs import effective_window, window_layers  # noqa: E402
from rome_locate.trace import TraceSettings, noise_level, trace_fact, trace_facts  # noqa: E402

SAMPLES = 10
WINDOW = 10
TOLERANCE = 1e-4
VERIFY = 3  # sites of the last-subject row that "atp+verify" re-checks exactly
# atp takes seconds where the exact table takes minutes: one stall (a page fault storm, another job) can double a
# single timing, so each atp figure of a fact is the median of three calls.
ATP_REPEATS = 3


class Job:
    """One fact to trace: ids, subject range, ROME's noise draw and the sites to restore."""

    def __init__(self, tok, fact: Fact, level: float, hidden: int, n_layers: int, full: bool):
        (self.b, self.e), _, ids = find_subject_range(tok, fact.prompt, fact.subject)
        self.ids = torch.tensor([ids])
        self.T = len(ids)
        self.L = n_layers
        self.window = effective_window(WINDOW, n_layers, "mlp")
        self.noise = level * torch.from_numpy(np.random.RandomState(1).randn(SAMPLES, self.e - self.b, hidden))
        self.tokens = list(range(self.T)) if full else [self.e - 1]

    def layers(self, layer: int) -> range:
        """The window of MLPs restored for `layer`."""
        return window_layers(layer, self.window, self.L)


# ---- rome-locate ------------------------------------------------------------------


def _settings(**kw) -> TraceSettings:
    """The benchmark's trace settings: ROME's draws, its samples and window."""
    return TraceSettings(noise_draws="rome", samples=SAMPLES, window=WINDOW, **kw)


def _numbers(r, full: bool):
    return ([list(x) for x in r.table] if full else [list(r.scores)]), r.low_score


def rome_locate_impl(model, tok, fact: Fact, level: float, full: bool):
    """rome-locate's trace_fact with ROME's draws: one fact per call."""
    return _numbers(trace_fact(model, tok, fact, _settings(full=full), noise_level=level), full)


def rome_locate_batched_impl(model, tok, facts: list[Fact], level: float, full: bool):
    """rome-locate's trace_facts, as `locate` runs it: all the facts in one call, several per forward."""
    return [_numbers(r, full) for r in trace_facts(model, tok, facts, _settings(full=full), noise_level=level)]


# ---- nnsight ---------------------------------------------------------------------


def _envoy(lm, name: str):
    """The nnsight envoy of the module called `name` (digits index module lists)."""
    obj = lm
    for part in name.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def nnsight_impl(lm, arch, job: Job):
    """nnsight 0.8: a trace per site; modules in the order the model runs them."""

    embed, head = _envoy(lm, arch.embed), _envoy(lm, arch.lm_head_module)
    mlps = [_envoy(lm, arch.module("mlp", m)) for m in range(job.L)]
    with torch.no_grad():
        clean: list = []  # filled inside the trace: nnsight hands back saved values, not new local lists
        with lm.trace(job.ids):
            for m in mlps:
                clean.append(m.output.save())
            logits = head.output.save()
        answer = int(logits[0, -1].argmax())

        def run(token: int | None, layer: int | None, clean=clean, answer=answer) -> float:
            # nnsight runs the traced block from this frame's locals, so everything it reads is one.
            restored = set(job.layers(layer)) if layer is not None else set()
            ids, noise, b, e, n_layers, embed_, head_, mlps_ = (job.ids.expand(SAMPLES, -1), job.noise, job.b,
                                                               job.e, job.L, embed, head, mlps)
            with lm.trace(ids):
                embed_.output[:, b:e] += noise
                for m in range(n_layers):
                    if m in restored:
                        mlps_[m].output[:, token] = clean[m][0, token]
                probs = head_.output[:, -1].softmax(dim=-1)[:, answer].mean().save()
            return float(probs)

        low = run(None, None)
        return [[run(t, layer) for layer in range(job.L)] for t in job.tokens], low


def nnsight_batched_impl(lm, arch, job: Job, max_rows: int = 64):
    """nnsight 0.8, as a user who batches: the sites' S-row groups stacked into traces of up to `max_rows` rows."""
    embed, head = _envoy(lm, arch.embed), _envoy(lm, arch.lm_head_module)
    mlps = [_envoy(lm, arch.module("mlp", m)) for m in range(job.L)]
    sites = [(job.e - 1, None)] + [(t, layer) for t in job.tokens for layer in range(job.L)]
    per = max(1, max_rows // SAMPLES)
    with torch.no_grad():
        clean: list = []
        with lm.trace(job.ids):
            for m in mlps:
                clean.append(m.output.save())
            logits = head.output.save()
        answer = int(logits[0, -1].argmax())
        scores: list[float] = []
        for i in range(0, len(sites), per):
            chunk = sites[i:i + per]
            g = len(chunk)
            # Row j*S + s is sample s of site j.
            plan = {m: [(j, t) for j, (t, layer) in enumerate(chunk) if layer is not None and m in job.layers(layer)]
                    for m in range(job.L)}
            ids, noise, b, e, n_layers, embed_, head_, mlps_, clean_ = (
                job.ids.expand(g * SAMPLES, -1), job.noise.repeat(g, 1, 1), job.b, job.e, job.L, embed, head, mlps,
                clean)
            rows_of = {m: torch.tensor([j * SAMPLES + s for j, _ in plan[m] for s in range(SAMPLES)]) for m in plan}
            toks_of = {m: torch.tensor([t for _, t in plan[m] for _ in range(SAMPLES)]) for m in plan}
            with lm.trace(ids):
                embed_.output[:, b:e] += noise
                for m in range(n_layers):
                    if len(rows_of[m]):
                        mlps_[m].output[rows_of[m], toks_of[m]] = clean_[m][0, toks_of[m]]
                probs = head_.output[:, -1].softmax(dim=-1)[:, answer].save()
            scores += probs.view(g, SAMPLES).mean(dim=1).tolist()
    low, flat = scores[0], scores[1:]
    return [flat[k * job.L:(k + 1) * job.L] for k in range(len(job.tokens))], low


# ---- TransformerLens -----------------------------------------------------------


def transformer_lens_impl(bridge, job: Job):
    """TransformerLens 4 TransformerBridge: run_with_cache for the clean run, run_with_hooks per site."""
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(job.ids, names_filter=lambda n: n.endswith("hook_mlp_out"))
        answer = int(logits[0, -1].argmax())

        def corrupt(x, hook):
            x[:, job.b:job.e] += job.noise.to(x.dtype)
            return x

        def restore(token, name):
            def fn(x, hook):
                x[:, token] = cache[name][0, token]
                return x

            return fn

        def run(token: int | None, layer: int | None) -> float:
            hooks = [("hook_embed", corrupt)]
            if layer is not None:
                hooks += [(f"blocks.{m}.hook_mlp_out", restore(token, f"blocks.{m}.hook_mlp_out"))
                          for m in job.layers(layer)]
            out = bridge.run_with_hooks(job.ids.expand(SAMPLES, -1), fwd_hooks=hooks)
            return float(out[:, -1].float().softmax(dim=-1)[:, answer].mean())

        low = run(None, None)
        return [[run(t, layer) for layer in range(job.L)] for t in job.tokens], low


# ---- pyvene ----------------------------------------------------------------------


def pyvene_impl(pv, model, job: Job, models: dict):
    """pyvene 0.1: an IntervenableModel per window (noise added to block 0's input, the clean MLP outputs
    given as source representations), built once per model and window."""
    with torch.no_grad():
        from rome_locate.hooks import captured

        arch = arch_for(model)
        names = [arch.module("mlp", m) for m in range(job.L)]
        with captured(model, names, tokens=(1, job.T)) as clean:
            answer = int(model(job.ids).logits[0, -1].argmax())

        def intervenable(layers: tuple[int, ...]):
            if layers not in models:
                reps = [{"layer": 0, "component": "block_input", "unit": "pos",
                         "intervention_type": pv.AdditionIntervention}]
                reps += [{"layer": m, "component": "mlp_output", "unit": "pos",
                          "intervention_type": pv.VanillaIntervention} for m in layers]
                models[layers] = pv.IntervenableModel(pv.IntervenableConfig(representations=reps), model)
            return models[layers]

        def run(token: int | None, layer: int | None) -> float:
            layers = tuple(job.layers(layer)) if layer is not None else ()
            ivm = intervenable(layers)
            subject = [list(range(job.b, job.e))] * SAMPLES
            locs = [subject] + [[[token]] * SAMPLES for _ in layers]
            srcs = [job.noise.float()] + [clean[names[m]][:, token:token + 1].expand(SAMPLES, -1, -1)
                                         for m in layers]
            _, out = ivm({"input_ids": job.ids.expand(SAMPLES, -1)},
                         unit_locations={"sources->base": (None, locs)},
                         source_representations={k: v for k, v in zip(ivm.sorted_keys, srcs)})
            return float(out.logits[:, -1].float().softmax(dim=-1)[:, answer].mean())

        low = run(None, None)
        return [[run(t, layer) for layer in range(job.L)] for t in job.tokens], low


# ---- driver --------------------------------------------------------------------


def _load(name: str):
    from rome_locate.fact_models import facts_path, load_fact_model
    from rome_locate.facts import load_facts

    if name.startswith("fact-"):
        model, tok = load_fact_model(name[5:])
        return model, tok, load_facts(facts_path(name[5:]))
    # A randomly initialised model of GPT-2-medium's shape, traced on the GPT-2 fact model's prompts.
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = load_fact_model("gpt2")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257,
                                       tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # a peaked prediction, as a trained model has
    return model, tok, load_facts(facts_path("gpt2"))


def _implementations(model, tok, peers: list[str]) -> dict[str, Callable]:
    arch = arch_for(model)
    impls: dict[str, Callable] = {}
    if "nnsight" in peers:
        from nnsight import LanguageModel

        lm = LanguageModel(copy.deepcopy(model), tokenizer=tok)
        impls["nnsight"] = lambda job: nnsight_impl(lm, arch, job)
    if "nnsight-batched" in peers:
        from nnsight import LanguageModel

        lm_b = LanguageModel(copy.deepcopy(model), tokenizer=tok)
        impls["nnsight-batched"] = lambda job: nnsight_batched_impl(lm_b, arch, job)
    if "transformer_lens" in peers:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(model.config.model_type, hf_model=copy.deepcopy(model),
                                                     tokenizer=tok, device="cpu")
        bridge.eval()
        impls["transformer_lens"] = lambda job: transformer_lens_impl(bridge, job)
    if "pyvene" in peers:
        import pyvene as pv

        pv_model, pv_models = copy.deepcopy(model), {}
        impls["pyvene"] = lambda job: pyvene_impl(pv, pv_model, job, pv_models)
    return impls


def bench(name: str, modes: list[str], n_facts: int, peers: list[str], atp: bool) -> list[dict]:
    """Time every implementation on each fact, interleaved; check numbers against rome-locate's."""
    model, tok, facts = _load(name)
    facts = facts[:n_facts]
    arch = arch_for(model)
    level = noise_level(model, tok, facts, arch)
    hidden = model.get_input_embeddings().weight.shape[1]
    impls = _implementations(model, tok, peers)
    ours = copy.deepcopy(model)
    # The first fact warms every implementation up (not timed when there are more than two). The batched calls
    # trace all the timed facts at once; three of them, spread through the per-fact loop (before the first fact,
    # halfway, before the last), so that they share the machine's state with the per-fact runs.
    skip = 1 if len(facts) > 2 else 0
    timed = facts[skip:]
    batched_before = {0, len(facts) // 2, len(facts) - 1}
    rows = []
    for mode in modes:
        full = mode == "full"
        times: dict[str, list[float]] = {"rome-locate": [], **{k: [] for k in impls}}
        batched: dict[str, list[float]] = {"rome-locate batched": []}  # seconds per fact of each batched call
        if atp and full:
            times["rome-locate atp"] = []
            times["rome-locate atp+verify 3"] = []
            batched["rome-locate atp batched"] = []
        agree_verified: list[bool] = []
        diffs: dict[str, float] = {k: 0.0 for k in [*times, *batched]}
        agree: list[tuple[float, bool]] = []
        tokens, refs, batched_out, atp_single, atp_batched = [], [], [], [], []
        for i, fact in enumerate(facts):
            if i in batched_before:
                t0 = time.perf_counter()
                batched_out = rome_locate_batched_impl(ours, tok, timed, level, full)
                batched["rome-locate batched"].append((time.perf_counter() - t0) / len(timed))
                if atp and full:
                    t0 = time.perf_counter()
                    atp_batched = attribution_each(ours, tok, timed, _settings(method="atp"), noise_level=level)
                    batched["rome-locate atp batched"].append((time.perf_counter() - t0) / len(timed))
            job = Job(tok, fact, level, hidden, arch.n_layers, full)
            tokens.append(job.T)
            t0 = time.perf_counter()
            ref, low = rome_locate_impl(ours, tok, fact, level, full)
            times["rome-locate"].append(time.perf_counter() - t0)
            refs.append((ref, low))
            for k, fn in impls.items():
                t0 = time.perf_counter()
                got, got_low = fn(job)
                times[k].append(time.perf_counter() - t0)
                diffs[k] = max(diffs[k], float(np.abs(np.array(got) - np.array(ref)).max()), abs(got_low - low))
            if atp and full:
                est, seconds = _repeated(lambda: attribution_trace(ours, tok, fact, _settings(method="atp"),
                                                                   noise_level=level))
                times["rome-locate atp"].append(seconds)
                atp_single.append(est)
                agree.append(_agreement(np.array(ref) - low, np.array(est.estimated) - est.trace.low_score,
                                        job.e - 1))
                ver, seconds = _repeated(lambda: attribution_trace(ours, tok, fact, _settings(
                    method="atp", verify_top=VERIFY), noise_level=level))
                times["rome-locate atp+verify 3"].append(seconds)
                agree_verified.append(int(np.argmax(ref[job.e - 1])) == int(np.argmax(ver.trace.scores)))
            print(f"{name} {mode} fact {i}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()),
                  flush=True)
        # Batching changes the order of the sums inside a forward, not what is computed: the batched numbers
        # must be the per-fact ones.
        for (ref, low), (got, got_low) in zip(refs[skip:], batched_out):
            diffs["rome-locate batched"] = max(diffs["rome-locate batched"],
                                               float(np.abs(np.array(got) - np.array(ref)).max()), abs(got_low - low))
        for one, many in zip(atp_single[skip:], atp_batched):
            diffs["rome-locate atp batched"] = max(diffs["rome-locate atp batched"],
                                                   float(np.abs(np.array(one.estimated) - np.array(many.estimated)).max()))
        med = {k: statistics.median(v[skip:]) for k, v in times.items()}
        mean = {k: statistics.mean(v[skip:]) for k, v in times.items()}
        med.update({k: statistics.median(v) for k, v in batched.items()})
        row = {"model": name, "mode": mode, "layers": arch.n_layers, "d": hidden, "tokens": float(np.mean(tokens)),
               "facts": len(facts), "samples": SAMPLES, "window": effective_window(WINDOW, arch.n_layers, "mlp"),
               "median_s": med, "mean_s": mean, "timed_facts": len(timed), "times_s": {**times, **batched}, "max_abs_diff": diffs,
               "numbers_equal": all(d <= TOLERANCE for k, d in diffs.items() if "atp" not in k),
               "atp_batched_equal": all(d <= TOLERANCE for k, d in diffs.items() if "atp batched" in k)}
        peer_meds = [med[k] for k in impls]
        if peer_meds:
            row["fastest_peer"] = min(impls, key=lambda k: med[k])
            row["speedup_vs_fastest_peer"] = min(peer_meds) / med["rome-locate"]
            # A batched call gives the mean over the timed facts: compared with the peers' means over them.
            row["batched_speedup_vs_fastest_peer"] = min(mean[k] for k in impls) / med["rome-locate batched"]
        if agree:
            row["atp_speedup_vs_exact_full"] = med["rome-locate"] / med["rome-locate atp"]
            row["atp_batched_speedup_vs_exact_full"] = med["rome-locate batched"] / med["rome-locate atp batched"]
            row["atp_spearman_median"] = float(np.median([a for a, _ in agree]))
            row["atp_top1_layer_agreement"] = float(np.mean([b for _, b in agree]))
            row["atp_verified_top1_layer_agreement"] = float(np.mean(agree_verified))
            row["atp_verified_speedup_vs_exact_full"] = med["rome-locate"] / med["rome-locate atp+verify 3"]
        rows.append(row)
    return rows


def _repeated(fn: Callable, times: int = ATP_REPEATS):
    """(fn's result, the median of its wall times over `times` calls)."""
    seconds = []
    for _ in range(times):
        t0 = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t0)
    return out, statistics.median(seconds)


def _agreement(exact: np.ndarray, estimated: np.ndarray, last_subject: int) -> tuple[float, bool]:
    """Spearman rank correlation over the whole table, and whether the last subject token's argmax layer agrees."""
    def ranks(x):
        return np.argsort(np.argsort(x.ravel())).astype(float)

    a, b = ranks(exact), ranks(estimated)
    rho = float(np.corrcoef(a, b)[0, 1])
    return rho, int(np.argmax(exact[last_subject])) == int(np.argmax(estimated[last_subject]))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="fact-gpt2,fact-llama,medium")
    ap.add_argument("--modes", default="row,full")
    ap.add_argument("--facts", type=int, default=5, help="facts per model (the first one's times are dropped)")
    ap.add_argument("--peers", default="nnsight,nnsight-batched,transformer_lens,pyvene")
    ap.add_argument("--no-atp", action="store_true", help="skip attribution patching in full mode")
    ap.add_argument("--out", default="bench/results/peers.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    peers = [p for p in args.peers.split(",") if p]
    rows = []
    for name in args.models.split(","):
        rows += bench(name, args.modes.split(","), args.facts, peers, not args.no_atp)
    names = ["rome-locate batched", "rome-locate"] + peers
    print(f"{'model':<12} {'mode':<5} {'L':>3} {'d':>5} {'T':>5} " + " ".join(f"{n:>19}" for n in names)
          + f" {'vs fastest peer':>16} {'max|diff|':>10}")
    for r in rows:
        cells = " ".join(f"{r['median_s'].get(n, float('nan')):>19.4f}" for n in names)
        print(f"{r['model']:<12} {r['mode']:<5} {r['layers']:>3} {r['d']:>5} {r['tokens']:>5.1f} {cells} "
              f"{r.get('batched_speedup_vs_fastest_peer', float('nan')):>7.2f}x /{r.get('speedup_vs_fastest_peer', float('nan')):>5.2f}x "
              f"{max(v for k, v in r['max_abs_diff'].items() if 'atp' not in k):>10.1e}")
        if "atp_speedup_vs_exact_full" in r:
            print(f"{'':<12} atp   {r['median_s']['rome-locate atp batched']:.4f} s/fact batched "
                  f"({r['atp_batched_speedup_vs_exact_full']:.1f}x faster than the exact full table batched), "
                  f"{r['median_s']['rome-locate atp']:.4f} s/fact one by one "
                  f"({r['atp_speedup_vs_exact_full']:.1f}x); Spearman "
                  f"{r['atp_spearman_median']:.2f} (median), top-1 layer agreement "
                  f"{r['atp_top1_layer_agreement']:.2f}; with the top 3 of the row re-checked "
                  f"{r['median_s']['rome-locate atp+verify 3']:.4f} s/fact "
                  f"({r['atp_verified_speedup_vs_exact_full']:.1f}x), top-1 layer agreement "
                  f"{r['atp_verified_top1_layer_agreement']:.2f}")
    write_json(Path(args.out), {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                "machine": platform.platform(), "processor": platform.processor()})
    print(f"wrote {args.out}")
    return 0 if all(r["numbers_equal"] and r["atp_batched_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
