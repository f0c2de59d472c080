"""Hand-off to an editor: apply ROME at a chosen layer (built-in or EasyEdit's), measure, restore.

This is the only module that imports `easyeditor`. EasyEdit is found through
the `EASYEDIT_PATH` environment variable (a clone of its GitHub main) or the
import path; see `import_easyedit`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import types
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import arch_for
from .facts import Fact
from .hparams import to_dict, with_layer
from .files import write_bytes, write_json
from .rome import apply_rome, restore
from .scoring import score_targets, token_accuracy, top1_agreement
from .stats import compute_mom2, mom2_path, stats_model_name

Editor = Literal["builtin", "easyedit"]
EDITORS = ("builtin", "easyedit")
LAYER_MODES = ("fixed", "traced")


@dataclass(frozen=True)
class EditOutcome:
    """One fact edited at one layer: did the new object become the answer, and EasyEdit-style metrics."""

    fact_id: str
    layer: int
    layer_source: str  # "traced" | "fixed" | "given"
    editor: str  # "builtin" | "easyedit"
    success: bool  # the first token of target_new is the top-1 next token after the prompt
    p_new_before: float
    p_new_after: float
    p_true_before: float | None
    p_true_after: float | None
    metrics: dict = field(default_factory=dict)  # {"pre": {...}, "post": {...}} as EasyEdit reports them

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "EditOutcome":
        """Inverse of `to_json`; unknown keys are ignored."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in obj.items() if k in names})


# ---- EasyEdit ----------------------------------------------------------------

# Modules EasyEdit's package __init__ imports only for its multimodal, API and
# training methods; none is needed by ROME. On a CPU-only torch, torchvision's
# compiled ops fail to load, and other extras (higher, open_clip, ...) are often
# not installed, so `import easyeditor` fails. `import_easyedit(stub_missing=True)`
# puts empty stand-ins for exactly the modules that fail in sys.modules while
# EasyEdit's import runs, and removes them afterwards.
# Whatever else fails to import is stubbed too, except what ROME itself runs on.
_KNOWN_BROKEN = ("torchvision",)  # raises RuntimeError (not ModuleNotFoundError) on a CPU-only torch
_NEVER_STUB = ("torch", "transformers", "numpy", "yaml", "tqdm", "easyeditor", "tokenizers", "safetensors")


class _Stub(types.ModuleType):
    """A module whose every attribute is another stub (or a dummy class for capitalised names)."""

    __path__: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        if name[:1].isupper():
            # A class: subclassable, callable, and subscriptable (used in type annotations).
            value: Any = type(name, (), {"__init__": lambda self, *a, **k: None, "__module__": self.__name__,
                                         "__class_getitem__": classmethod(lambda cls, item: cls)})
        else:
            value = sys.modules.get(full) or _Stub(full)
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: Sequence[str]):
        self.roots = set(roots)
        self.made: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        self.made.append(spec.name)
        return _Stub(spec.name)

    def exec_module(self, module):
        pass


def _missing_roots(exc: BaseException) -> set[str]:
    roots: set[str] = set()
    chain: BaseException | None = exc
    while chain is not None:
        name = getattr(chain, "name", None)
        if isinstance(chain, ModuleNotFoundError) and name:
            roots.add(name.split(".")[0])
        for root in _KNOWN_BROKEN:
            if re.search(rf"\b{root}\b", str(chain)):
                roots.add(root)
        chain = chain.__cause__ or chain.__context__
    return roots - set(_NEVER_STUB)


def import_easyedit(path: str | Path | None = None, stub_missing: bool = True, max_tries: int = 30) -> types.ModuleType:
    """Import EasyEdit's `easyeditor` package from `path`, $EASYEDIT_PATH or the import path.

    When its import fails on a module that ROME does not use (torchvision on a
    CPU-only torch, an uninstalled extra), and `stub_missing` is on, the import is
    retried with an empty stand-in for that module, installed in sys.modules only
    for the duration of the import. Raises ImportError naming what is missing.
    Note: importing EasyEdit seeds the global RNGs (seed_everything(42)) and
    configures logging; that is EasyEdit's behaviour, not ours.
    """
    if "easyeditor.models.rome" in sys.modules and "easyeditor.editors.editor" in sys.modules:
        return sys.modules["easyeditor"]
    path = path or os.environ.get("EASYEDIT_PATH")
    if path:
        path = str(Path(path).expanduser().resolve())
        if not (Path(path) / "easyeditor" / "__init__.py").is_file():
            raise ImportError(f"EasyEdit not found at {path} (no easyeditor/__init__.py); set EASYEDIT_PATH to a clone")
        if path not in sys.path:
            sys.path.insert(0, path)
    stubbed: set[str] = set()
    finder = _StubFinder(())
    before = set(sys.modules)
    sys.meta_path.insert(0, finder)
    try:
        for _ in range(max_tries):
            try:
                module = importlib.import_module("easyeditor")
                importlib.import_module("easyeditor.models.rome")
                importlib.import_module("easyeditor.editors.editor")
                return module
            except Exception as exc:  # EasyEdit raises all kinds of errors on a broken optional import
                roots = _missing_roots(exc) - stubbed
                if not stub_missing or not roots:
                    raise ImportError(f"cannot import EasyEdit{' from ' + path if path else ''}: "
                                      f"{type(exc).__name__}: {exc}") from exc
                stubbed |= roots
                finder.roots = set(stubbed)
                # Drop the half-imported modules so the retry starts clean.
                for name in set(sys.modules) - before:
                    if name.split(".")[0] in stubbed or name.startswith("easyeditor"):
                        del sys.modules[name]
        raise ImportError(f"cannot import EasyEdit: still failing after stubbing {sorted(stubbed)}")
    finally:
        sys.meta_path.remove(finder)
        # The stand-ins served only EasyEdit's import; later code sees the real state.
        for name in finder.made:
            sys.modules.pop(name, None)
        _STUBBED[:] = sorted(stubbed)


_STUBBED: list[str] = []


def stubbed_modules() -> list[str]:
    """The top-level modules replaced by stand-ins during the last EasyEdit import."""
    return list(_STUBBED)


def easyedit_hparams(hparams: Any) -> Any:
    """EasyEdit's ROMEHyperParams with the same values (EasyEdit must be importable)."""
    import_easyedit()
    from easyeditor.models.rome.rome_hparams import ROMEHyperParams

    if isinstance(hparams, ROMEHyperParams):
        return hparams
    return ROMEHyperParams(**to_dict(hparams))


def easyedit_request(fact: Fact) -> dict[str, Any]:
    """The request dict EasyEdit's BaseEditor.edit_requests takes for one fact (targets without a leading space)."""
    request: dict[str, Any] = {"prompt": fact.prompt, "subject": fact.subject, "target_new": fact.target_new,
                               "ground_truth": fact.target or "<|unknown|>", "portability": {}, "locality": {}}
    if fact.rephrase_prompts:
        # EasyEdit's datasets carry one rephrasing a request (a list is scored against one target and fails).
        request["rephrase_prompt"] = fact.rephrase_prompts[0]
    pairs = [(p, a) for p, a in zip(fact.locality_prompts, fact.locality_answers) if a]
    if pairs:
        request["locality"] = {"neighborhood": {"prompt": [p for p, _ in pairs], "ground_truth": [a for _, a in pairs]}}
    return request


def _apply_easyedit(model: nn.Module, tok: Any, fact: Fact, hparams: Any) -> dict[str, torch.Tensor]:
    import_easyedit()
    from easyeditor.models.rome.rome_main import apply_rome_to_model

    # EasyEdit's ROME prepends the space itself: target_new goes without one.
    request = {"prompt": fact.prompt, "subject": fact.subject, "target_new": fact.target_new}
    _, originals = apply_rome_to_model(model, tok, [request], easyedit_hparams(hparams), copy=False,
                                       return_orig_weights=True)
    return originals


# ---- edit, measure, restore --------------------------------------------------


@contextmanager
def edited(model: nn.Module, tok: Any, fact: Fact, hparams: Any, editor: Editor = "builtin",
           seed: int = 0, info: dict | None = None) -> Iterator[nn.Module]:
    """Apply ROME at `hparams.layers` for `fact.target_new`, yield the model, restore bit-identically (always)."""
    if editor not in EDITORS:
        raise ValueError(f"editor must be one of {EDITORS}, got {editor!r}")
    originals: dict[str, torch.Tensor] = {}
    try:
        if editor == "builtin":
            originals = apply_rome(model, tok, fact, hparams, seed=seed, info=info)
        else:
            originals = _apply_easyedit(model, tok, fact, hparams)
        yield model
    finally:
        restore(model, originals)


def _measure(model: nn.Module, tok: Any, fact: Fact) -> dict[str, Any]:
    """EasyEdit-style scores of the model as it is now: one batched teacher-forced pass over every prompt."""
    n_rephrase, n_loc = len(fact.rephrase_prompts), len(fact.locality_prompts)
    answers = list(fact.locality_answers) + [None] * (n_loc - len(fact.locality_answers))
    pairs = [(fact.prompt, fact.target_new)] + [(p, fact.target_new) for p in fact.rephrase_prompts]
    # A locality prompt with an answer is scored on the answer's tokens, one without on its next token.
    pairs += [(p, a or None) for p, a in zip(fact.locality_prompts, answers)]
    if fact.target:
        pairs.append((fact.prompt, fact.target))
    scores = score_targets(model, tok, pairs, keep_next=True)
    new, rephrase = scores[0], scores[1:1 + n_rephrase]
    locality = scores[1 + n_rephrase:1 + n_rephrase + n_loc]
    true = scores[-1] if fact.target else None
    next_p = new.next_logp.exp()
    return {
        "top1": int(next_p.argmax()),
        "new_id": new.target_ids[0],
        "p_new": float(next_p[new.target_ids[0]]),
        "p_true": float(next_p[true.target_ids[0]]) if true else None,
        "rewrite_acc": token_accuracy([new.predicted], [new.target_ids]),
        "rephrase_acc": token_accuracy([r.predicted for r in rephrase], [r.target_ids for r in rephrase]),
        "locality_tokens": [list(r.predicted) for r in locality],
    }


def edit_one(model: nn.Module, tok: Any, fact: Fact, hparams: Any, *, editor: Editor = "builtin",
             layer_source: str = "fixed", seed: int = 0) -> EditOutcome:
    """Edit one fact at `hparams.layers`, measure before and after, restore the model."""
    before = _measure(model, tok, fact)
    info: dict = {}
    with edited(model, tok, fact, hparams, editor=editor, seed=seed, info=info):
        after = _measure(model, tok, fact)
    metrics = {
        "pre": {"rewrite_acc": before["rewrite_acc"], "rephrase_acc": before["rephrase_acc"]},
        "post": {"rewrite_acc": after["rewrite_acc"], "rephrase_acc": after["rephrase_acc"],
                 "locality": top1_agreement(before["locality_tokens"], after["locality_tokens"])},
    }
    if info:
        metrics["optimisation"] = {str(k): v for k, v in info.items()}
    return EditOutcome(
        fact_id=fact.id, layer=int(hparams.layers[0]), layer_source=layer_source, editor=editor,
        success=after["top1"] == after["new_id"], p_new_before=before["p_new"], p_new_after=after["p_new"],
        p_true_before=before["p_true"], p_true_after=after["p_true"], metrics=metrics,
    )


def _layers_for(model: nn.Module, tok: Any, facts: Sequence[Fact], hparams: Any, layers: str,
                choices: Any, progress: bool) -> tuple[list[int], list[str]]:
    if layers not in LAYER_MODES:
        raise ValueError(f"layers must be one of {LAYER_MODES}, got {layers!r}")
    if layers == "fixed" and choices is None:
        return [int(hparams.layers[0])] * len(facts), ["fixed"] * len(facts)
    if choices is None:
        from .locate import locate  # earlier stage; imported here so `fixed` needs no tracing

        choices = [choice for _, choice in locate(model, tok, facts, progress=progress)]
    if isinstance(choices, dict):
        found = [choices.get(f.id) for f in facts]
    else:
        choices = list(choices)
        if len(choices) != len(facts):
            raise ValueError(f"{len(choices)} layer choices for {len(facts)} facts")
        found = [c[1] if isinstance(c, tuple) else c for c in choices]
    out, sources = [], []
    for fact, c in zip(facts, found):
        if c is None:
            raise ValueError(f"no layer choice for fact {fact.id!r}")
        if isinstance(c, int):
            out.append(c)
            sources.append("given")
        else:
            if c.fact_id != fact.id:
                raise ValueError(f"layer choice for fact {c.fact_id!r} given for fact {fact.id!r}")
            out.append(int(c.layer))
            sources.append("traced")
    return out, sources


def _ensure_stats(model: nn.Module, tok: Any, hparams: Any, layers: set[int], corpus: str | Path | None,
                  stats_dir: str | Path | None) -> Any:
    """Hyperparameters whose stats_dir holds mom2 files for every layer; missing ones are computed from `corpus`."""
    if not hparams.mom2_adjustment:
        return hparams
    name = stats_model_name(model) or Path(str(hparams.model_name)).name

    def path(d, layer):
        return mom2_path(d, name, hparams.rewrite_module_tmp.format(layer), hparams.mom2_dataset,
                         hparams.mom2_n_samples, hparams.mom2_dtype)

    missing = sorted(l for l in layers if not path(hparams.stats_dir, l).is_file())
    if not missing:
        return hparams
    if corpus is None:
        raise FileNotFoundError(
            f"mom2 statistics missing for layers {missing} in {hparams.stats_dir} (e.g. {path(hparams.stats_dir, missing[0])}); "
            f"compute them with `rome-locate stats`, pass a corpus (--corpus) or set mom2_adjustment: false")
    if stats_dir is None:
        raise ValueError("a writable stats directory is needed to compute the missing mom2 statistics")
    # The new directory must hold every layer: copy the existing files in.
    for layer in sorted(layers - set(missing)):
        src, dst = path(hparams.stats_dir, layer), path(stats_dir, layer)
        if not dst.exists():
            write_bytes(dst, src.read_bytes())
    todo = [l for l in missing if not path(stats_dir, l).is_file()]
    if todo:
        compute_mom2(model, tok, arch_for(model), todo, corpus, stats_dir, model_name=name,
                     mom2_dataset=hparams.mom2_dataset, n_samples=hparams.mom2_n_samples, dtype=hparams.mom2_dtype)
    return replace(hparams, stats_dir=str(stats_dir))


def summary(outcomes: Sequence[EditOutcome]) -> dict[str, Any]:
    """Success rate and mean EasyEdit metrics over outcomes."""
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    return {
        "n": len(outcomes),
        "success_rate": mean([float(o.success) for o in outcomes]),
        "pre_rewrite_acc": mean([o.metrics["pre"]["rewrite_acc"] for o in outcomes]),
        "post_rewrite_acc": mean([o.metrics["post"]["rewrite_acc"] for o in outcomes]),
        "post_rephrase_acc": mean([o.metrics["post"]["rephrase_acc"] for o in outcomes]),
        "post_locality": mean([o.metrics["post"]["locality"] for o in outcomes]),
        "layers": sorted({o.layer for o in outcomes}),
    }


def edit_facts(model: nn.Module, tok: Any, facts: Sequence[Fact], hparams: Any, *, editor: Editor = "builtin",
               layers: str = "fixed", choices: Any = None, out_dir: str | Path | None = None,
               progress: bool = True, seed: int = 0, mom2_corpus: str | Path | None = None) -> list[EditOutcome]:
    """Edit each fact on its own (weights restored in between) at the fixed or traced layer; writes DIR/results.json.

    `choices` (LayerChoice list, locate()'s (TraceResult, LayerChoice) pairs, a dict
    fact_id -> layer or a list of ints) overrides tracing. With mom2_adjustment on,
    statistics missing for a traced layer are computed from `mom2_corpus` into
    `out_dir/stats`.
    """
    facts = list(facts)
    if not facts:
        raise ValueError("no facts to edit")
    for fact in facts:
        if not fact.target_new:
            raise ValueError(f"fact {fact.id!r} has no target_new (use a CounterFact-style facts file)")
    n_layers = arch_for(model).n_layers
    per_fact, sources = _layers_for(model, tok, facts, hparams, layers, choices, progress)
    hparams = _ensure_stats(model, tok, hparams, set(per_fact), mom2_corpus,
                            Path(out_dir) / "stats" if out_dir is not None else None)
    outcomes = []
    for fact, layer, source in tqdm(list(zip(facts, per_fact, sources)), desc=f"edit ({editor})", unit="fact",
                                    disable=not progress):
        h = with_layer(hparams, layer, n_layers=n_layers)
        outcomes.append(edit_one(model, tok, fact, h, editor=editor, layer_source=source, seed=seed))
    if out_dir is not None:
        write_json(Path(out_dir) / "results.json", {
            "editor": editor, "layers": layers, "hparams": to_dict(hparams),
            "summary": summary(outcomes), "outcomes": [o.to_json() for o in outcomes],
        })
    return outcomes
