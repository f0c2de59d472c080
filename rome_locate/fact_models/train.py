"""Training the tiny fact models: GPT-2 and LLaMA architectures on the synthetic world of `world.py` beside it.

The shipped artefacts live in `rome_locate/fact_models/<family>/`; rebuild one with

    python -m rome_locate.fact_models.train train gpt2
    python -m rome_locate.fact_models.train train llama

and print its accuracy with `python -m rome_locate.fact_models.train accuracy gpt2`.
A model of another world (`world.WORLDS`; not shipped, trained into a git-ignored folder):

    python -m rome_locate.fact_models.train train gpt2 --world world3      # -> local_fact_models/world3-gpt2

and a deeper model of either world (`--layers N`; 8 is the shipped shape, the same git-ignored folder):

    python -m rome_locate.fact_models.train train gpt2 --layers 16         # -> local_fact_models/default-gpt2-16l
    python -m rome_locate.fact_models.train accuracy gpt2 --layers 16

Everything (world, tokenizer, weights) is built locally and deterministically
from the seed; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from . import FAMILIES, _check_family, fact_model_dir, world_path
from . import world as W
from .shapes import write_exports

SEED = 0
VOCAB_SIZE = 2000
# BPE merges stop below this pair count: above a first name's count (8 siblings x 24
# lines = 192), so no merge crosses a name-chunk boundary, and below any chunk's (>= 576).
MIN_PAIR_FREQ = 300

# Model shape, shared by both families. N_LAYERS is the shipped depth (`--layers` trains others).
N_LAYERS = 8
D_MODEL = 64
N_HEADS = 4
D_MLP = 4 * D_MODEL  # GPT-2 MLP width
D_MLP_LLAMA = 176  # LLaMA gated MLP, ~8/3 * D_MODEL as in LLaMA (same parameter budget as 4*d ungated)
N_POSITIONS = 64

# Training schedule: warmup, constant LR until the training-template accuracy
# (checked every EVAL_EVERY steps on a fixed sample) reaches STOP_ACC or
# MAX_STEPS is hit, then a linear decay over DECAY_STEPS.  Everything is a
# function of the seed and the step count, so a rebuild is deterministic.
MAX_STEPS = 2700
EVAL_EVERY = 300
STOP_ACC = 0.99
DECAY_STEPS = 300
N_THREADS = 1  # on a shared machine 2 OpenMP threads were 10x slower than 1 (spin-waiting)
BATCH_SIZE = 64
LR = 3e-3
WARMUP = 150
WEIGHT_DECAY = 0.01
OBJECT_WEIGHT = 3.0  # loss weight of the object's first token

# --- tokenizer ----------------------------------------------------------------

_SPECIALS = {
    "gpt2": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>", "pad": "<|endoftext|>"},
    "llama": {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "</s>"},
}


def build_tokenizer(lines: list[str], family: str, relations: tuple[W.Relation, ...] = W.RELATIONS):
    """Byte-level BPE trained on `lines`, wrapped as a fast tokenizer (LLaMA: prepends `<s>`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sp = _SPECIALS[_check_family(family)]
    special_list = list(dict.fromkeys([sp["unk"], sp["bos"], sp["eos"]]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=MIN_PAIR_FREQ,
        special_tokens=special_list,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Objects get extra weight so every object becomes one token (" Paris").
    objects = [o for r in relations for o in r.objects]
    extra = ["x " + " ".join(objects)] * MIN_PAIR_FREQ
    tok.train_from_iterator(list(lines) + extra, trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=True)
    if family == "llama":
        bos_id = tok.token_to_id(sp["bos"])
        tok.post_processor = processors.Sequence(
            [
                byte_level,
                processors.TemplateProcessing(
                    single=f"{sp['bos']} $A", pair=f"{sp['bos']} $A {sp['bos']} $B:1", special_tokens=[(sp["bos"], bos_id)]
                ),
            ]
        )
    else:
        tok.post_processor = byte_level
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=sp["bos"],
        eos_token=sp["eos"],
        unk_token=sp["unk"],
        pad_token=sp["pad"],
        padding_side="right",
        model_max_length=N_POSITIONS,
        add_bos_token=family == "llama",
    )
    return fast


# --- model --------------------------------------------------------------------


def build_model(family: str, tok, seed: int = SEED, n_layers: int = N_LAYERS):
    """A freshly initialised model of `family` with `n_layers` blocks, sized for `tok`."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    n_layers = check_layers(n_layers)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if _check_family(family) == "gpt2":
        cfg = GPT2Config(
            vocab_size=len(tok),
            n_positions=N_POSITIONS,
            n_embd=D_MODEL,
            n_layer=n_layers,
            n_head=N_HEADS,
            n_inner=D_MLP,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    else:
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=D_MODEL,
            intermediate_size=D_MLP_LLAMA,
            num_hidden_layers=n_layers,
            num_attention_heads=N_HEADS,
            num_key_value_heads=N_HEADS,
            max_position_embeddings=N_POSITIONS,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            **ids,
        )
    cfg.dtype = "float32"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).float()


def _encode_corpus(world: W.World, tok, family: str):
    """Token ids per training sentence, and the index of each object's first token."""
    seqs: list[list[int]] = []
    obj_pos: list[int] = []
    for prompt, _, _, obj in W.train_prompts(world):
        p_ids = tok(prompt)["input_ids"]
        # Train on "prompt object": the trailing "." of the corpus line carries no fact.
        full = tok(prompt + " " + obj)["input_ids"]
        seqs.append(full)
        obj_pos.append(len(p_ids))
    for line in world.filler:
        seqs.append(tok(line)["input_ids"] + [tok.eos_token_id])
        obj_pos.append(-1)
    return seqs, obj_pos


def check_layers(n_layers: int) -> int:
    """`n_layers` as an int >= 1, else a ValueError."""
    if isinstance(n_layers, bool) or int(n_layers) != n_layers or n_layers < 1:
        raise ValueError(f"the number of layers must be an integer >= 1, got {n_layers!r}")
    return int(n_layers)


def local_model_dir(world: str, family: str, n_layers: int = N_LAYERS) -> Path:
    """Where a model other than a shipped one is trained by default (git-ignored): `WORLD-FAMILY`, and a depth
    other than the shipped one adds `-<N>l` (`default-gpt2-16l`, `world3-gpt2-16l`)."""
    depth = "" if check_layers(n_layers) == N_LAYERS else f"-{n_layers}l"
    return Path("local_fact_models") / f"{world}-{_check_family(family)}{depth}"


def model_dir(family: str, world: str = "default", n_layers: int = N_LAYERS) -> Path:
    """The shipped directory for the default world at the shipped depth, else `local_model_dir`."""
    if world == "default" and check_layers(n_layers) == N_LAYERS:
        return fact_model_dir(family)
    return local_model_dir(world, family, n_layers)


def train(family: str, max_steps: int | None = None, out_dir: str | Path | None = None, log_every: int = 200,
          world: str = "default", n_layers: int = N_LAYERS) -> dict[str, Any]:
    """Build the world, tokenizer and model of `family`, train, and save everything into its dir (`model_dir`).

    `world` names a `world.WORLDS` specification (its seed seeds the model as well) and `n_layers` the depth;
    anything but the default world at the shipped depth trains into `local_model_dir` unless `out_dir` is given.
    """
    import torch

    spec = W.world_spec(world)
    seed = spec.seed
    torch.set_num_threads(N_THREADS)
    torch.manual_seed(seed)
    family = _check_family(family)
    out = Path(out_dir) if out_dir is not None else model_dir(family, world, n_layers)
    max_steps = MAX_STEPS if max_steps is None else max_steps
    world_obj = W.build_world(seed, spec=spec)
    paths = write_exports(world_obj, out)
    lines = paths["corpus"].read_text(encoding="utf-8").splitlines()
    tok = build_tokenizer(lines, family, spec.relations)
    model = build_model(family, tok, seed, n_layers)
    seqs, obj_pos = _encode_corpus(world_obj, tok, family)
    n = len(seqs)
    max_len = max(len(s) for s in seqs)
    if max_len > N_POSITIONS:
        raise RuntimeError(f"sentence of {max_len} tokens exceeds {N_POSITIONS} positions")
    ids = torch.full((n, max_len), tok.pad_token_id, dtype=torch.long)
    weight = torch.zeros((n, max_len), dtype=torch.float32)
    lens = torch.tensor([len(s) for s in seqs])
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        weight[i, 1 : len(s)] = 1.0  # weight of predicting token t from the prefix before it
        if obj_pos[i] > 0:
            weight[i, obj_pos[i]] = OBJECT_WEIGHT
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.98))
    check_items = [(p, o) for p, _, _, o in W.train_prompts(world_obj)][::16]

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    t0 = time.time()
    decay_from: int | None = None
    step = 0
    history = []
    while True:
        if decay_from is None:
            lr = LR * min(1.0, (step + 1) / WARMUP)
        else:
            lr = LR * max(0.0, 1.0 - (step - decay_from) / DECAY_STEPS)
            if step >= decay_from + DECAY_STEPS:
                break
        if cursor + BATCH_SIZE > n:
            order = torch.randperm(n, generator=gen)
            cursor = 0
        idx = order[cursor : cursor + BATCH_SIZE]
        cursor += BATCH_SIZE
        L = int(lens[idx].max())
        b_ids, b_w = ids[idx, :L], weight[idx, :L]
        model.train()
        # Right padding under causal attention: no real token attends to a pad,
        # and pads carry no loss, so no attention mask is needed.
        logits = model(input_ids=b_ids).logits
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), b_ids[:, 1:].reshape(-1), reduction="none"
        ).view(b_ids.shape[0], L - 1)
        w = b_w[:, 1:]
        loss = (ce * w).sum() / w.sum()
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if log_every and step % log_every == 0:
            print(f"[{family}] step {step} loss {loss.item():.4f} lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
        if decay_from is None and (step % EVAL_EVERY == 0 or step >= max_steps):
            model.eval()
            acc = top1_accuracy(model, tok, check_items)
            history.append((step, round(acc, 4)))
            print(f"[{family}] step {step} train-sample acc {acc:.4f} {time.time() - t0:.0f}s", flush=True)
            if acc >= STOP_ACC or step >= max_steps:
                decay_from = step
            else:  # checkpoint, so an interrupted run leaves a usable model behind
                model.save_pretrained(out, safe_serialization=True)
                tok.save_pretrained(out)
    train_s = time.time() - t0
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    acc = accuracy(model, tok, family, hard=True, world=world_obj)
    stats = {"family": family, "world": world, "n_layers": n_layers, "steps": step,
             "train_seconds": round(train_s, 1), "checks": history, **acc}
    print(json.dumps(stats), flush=True)
    return stats


# --- loading and evaluation ---------------------------------------------------


def _load_world(family: str, directory: str | Path | None = None) -> W.World:
    """The world a model was trained on: world.json in `directory` (default: the shipped dir of `family`)."""
    p = world_path(family) if directory is None else Path(directory) / "world.json"
    if p.is_file():
        saved = json.loads(p.read_text(encoding="utf-8"))
        return W.build_world(saved["seed"], spec=W.world_spec(saved.get("spec", "default")))
    return W.build_world(SEED)


def top1_accuracy(model, tok, items: list[tuple[str, str]], batch_size: int = 256) -> float:
    """Share of (prompt, object) whose object's first token is the model's top-1 after the prompt."""
    import torch

    from ..models import input_device

    if not items:
        return float("nan")
    device = input_device(model)
    hits = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        p_ids = [tok(p)["input_ids"] for p, _ in chunk]
        targets = [tok(p + " " + o)["input_ids"][len(pi)] for (p, o), pi in zip(chunk, p_ids)]
        L = max(len(x) for x in p_ids)
        ids = torch.full((len(chunk), L), tok.pad_token_id, dtype=torch.long)
        for i, x in enumerate(p_ids):
            ids[i, : len(x)] = torch.tensor(x)
        # Right padding: each prompt's logits are read at its own last real position,
        # which under causal attention never sees the pads after it.
        with torch.no_grad():
            logits = model(input_ids=ids.to(device)).logits
        last = torch.tensor([len(x) - 1 for x in p_ids], device=device)
        pred = logits[torch.arange(len(chunk), device=device), last].argmax(-1).tolist()
        hits += sum(int(a == b) for a, b in zip(pred, targets))
    return hits / len(items)


def accuracy(model, tok, family: str, every: int = 1, hard: bool = False,
             world: W.World | None = None) -> dict[str, float]:
    """Top-1 first-token accuracy on training templates and on held-out paraphrase templates.

    `every` > 1 evaluates every `every`-th prompt only (a fast, deterministic sample).
    `hard` adds the accuracy on `world.HARD_PARAPHRASES` (novel relation cues; not a target).
    """
    world = world or _load_world(family)
    train_items = [(p, o) for p, _, _, o in W.train_prompts(world)][::every]
    held_items = [(p, o) for p, _, _, o in W.heldout_prompts(world)][::every]
    out = {
        "train_acc": top1_accuracy(model, tok, train_items),
        "paraphrase_acc": top1_accuracy(model, tok, held_items),
        "n_train": len(train_items),
        "n_paraphrase": len(held_items),
    }
    if hard:
        hard_items = [(p, o) for p, _, _, o in W.hard_paraphrase_prompts(world)][::every]
        out["hard_paraphrase_acc"] = top1_accuracy(model, tok, hard_items)
        out["n_hard_paraphrase"] = len(hard_items)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rome_locate.fact_models.train", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="rebuild the shipped directory of a family")
    t.add_argument("family", choices=FAMILIES)
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--out", default=None, help="write here instead of the shipped directory")
    a = sub.add_parser("accuracy", help="print top-1 accuracy of the shipped model (or of --world/--layers')")
    a.add_argument("family", choices=FAMILIES)
    a.add_argument("--every", type=int, default=1)
    a.add_argument("--model", default=None, help="the model folder (default: where train writes it)")
    for p in (t, a):
        p.add_argument("--world", default="default", choices=sorted(W.WORLDS),
                       help="world specification; any but default is in local_fact_models/WORLD-FAMILY")
        p.add_argument("--layers", type=int, default=N_LAYERS,
                       help=f"transformer blocks (default {N_LAYERS}, the shipped shape; another depth is in "
                            f"local_fact_models/WORLD-FAMILY-<N>l)")
    args = ap.parse_args(argv)
    if args.cmd == "train":
        train(args.family, max_steps=args.max_steps, out_dir=args.out, world=args.world, n_layers=args.layers)
        return 0
    from ..models import load_model

    # The shipped dir or a local one: both load as load_fact_model loads the shipped one (offline, float32).
    directory = Path(args.model) if args.model else model_dir(args.family, args.world, args.layers)
    model, tok = load_model(directory, device="cpu", dtype="float32")
    world = _load_world(args.family, directory)
    print(json.dumps(accuracy(model, tok, args.family, every=args.every, hard=True, world=world)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
