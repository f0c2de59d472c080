#!/usr/bin/env python
"""Padding: what the plugin changes against plain EasyEdit, measured on the shipped fact models.

1. ROME's padding side. EasyEdit's ROME reads token positions as if the tokenizer padded on the right, and EasyEdit
   sets right padding only for the llama/mistral/qwen paths it loads itself; a preloaded (model, tokenizer) keeps
   the tokenizer's own side. The plugin's BaseEditor pads on the right for ROME, whatever the tokenizer says. Same
   YAML (hparams/ROME/fact-FAMILY.yaml), same first N CounterFact cases with one rephrasing, every request at the
   YAML's layer, the tokenizer set to pad on the left (as some tokenizers ship): plain EasyEdit's BaseEditor with
   the preloaded pair against the plugin's, EasyEdit's own post-edit metrics. Twice: with the YAML's context
   templates (none: ROME's prompts then differ in length only by its KL prompt) and with ROME's paper templates
   (`context_template_length_params: [[5, 10], [10, 10]]`, prompts of many lengths, generated once per family and
   setting and shared by both editors).
2. How a key's prompts are scored. EasyEdit scores all prompts of a locality or portability key in one batch,
   left-padded; on a model with absolute position embeddings (GPT-2) the padding moves the shorter prompts'
   positions. rome-locate scores each prompt alone (right-padded batches keep every row's positions). Same edits
   (`rome-locate edit --editor easyedit` on the first N cases of the GPT-2 fact model's easyedit.json, keys of 2
   and 5 prompts of different lengths): rome-locate's locality and portability against EasyEdit's own, per fact.

    EASYEDIT_PATH=/path/to/EasyEdit python integration/compare_padding.py [N]
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _requests(model_dir: Path, n: int, layer: int) -> list[dict]:
    facts = json.loads((model_dir / "counterfact.json").read_text())[:n]
    return [{"prompt": f["requested_rewrite"]["prompt"].format(f["requested_rewrite"]["subject"]),
             "ground_truth": f["requested_rewrite"]["target_true"]["str"],
             "target_new": f["requested_rewrite"]["target_new"]["str"], "subject": f["requested_rewrite"]["subject"],
             "portability": {}, "rephrase_prompt": f["paraphrase_prompts"][0], "layer": layer,
             "locality": {"neighborhood": {"prompt": f["neighborhood_prompts"],
                                           "ground_truth": [f["requested_rewrite"]["target_true"]["str"]]
                                           * len(f["neighborhood_prompts"])}}}
            for f in facts]


def _post_means(metrics: list[dict]) -> dict[str, float]:
    from rome_locate.easyedit import easyedit_metrics

    rows = [easyedit_metrics(m)["post"] for m in metrics]
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("rewrite_acc", "rephrase_acc", "locality")}


PAPER_TEMPLATES = [[5, 10], [10, 10]]


def padding_side(family: str, n: int, templates: list | None = None) -> None:
    """Part 1: plain EasyEdit with a preloaded left-padding tokenizer against the plugin, one family (`templates`:
    context_template_length_params in place of the YAML's)."""
    from rome_locate.easyedit import BaseEditor, ROMEHyperParams as LocatedHParams, import_easyedit
    from rome_locate.fact_models import fact_model_dir
    from rome_locate.hparams import bind_model, load_hparams, write_hparams
    from rome_locate.models import load_model

    import_easyedit()
    from easyeditor import BaseEditor as EasyEditBaseEditor, ROMEHyperParams
    from easyeditor.models.rome import rome_main

    model_dir = fact_model_dir(family)
    h = bind_model(load_hparams(ROOT / "hparams" / "ROME" / f"fact-{family}.yaml", easyedit=False), model_dir)
    if templates is not None:
        h = dataclasses.replace(h, context_template_length_params=templates)
    # EasyEdit caches the templates of its first edit for the whole process, whatever the settings asked for.
    rome_main.CONTEXT_TEMPLATES_CACHE = None
    path = write_hparams(h, Path(f"rome-{family}.yaml"))
    requests = _requests(model_dir, n, h.layers[0])
    for name, cls, hparams_cls in (("EasyEdit's BaseEditor", EasyEditBaseEditor, ROMEHyperParams),
                                   ("rome_locate.easyedit.BaseEditor", BaseEditor, LocatedHParams)):
        model, tok = load_model(model_dir, device="cpu")
        tok.padding_side = "left"
        hparams = hparams_cls.from_hparams(str(path))
        editor = cls(dataclasses.replace(hparams, model_name=(model, tok)))
        editor.model_name = str(model_dir)  # EasyEdit's evaluation reads it as a string
        metrics, _, _ = editor.edit_requests([dict(r) for r in requests], sequential_edit=False, verbose=False)
        m = _post_means(metrics)
        print(f"{family}, {'paper context templates' if templates else 'no context templates'}, tokenizer padding "
              f"left, {name}: ROME pads on the {editor.tok.padding_side}; post "
              f"rewrite_acc {m['rewrite_acc']:.3f}, rephrase_acc {m['rephrase_acc']:.3f}, locality "
              f"{m['locality']:.3f} (n={len(metrics)})")


def key_batches(n: int) -> None:
    """Part 2: rome-locate's locality and portability against EasyEdit's on the same edits."""
    from easyeditor.models.rome import rome_main

    from rome_locate.cli import main
    from rome_locate.fact_models import easyedit_path, fact_model_dir

    rome_main.CONTEXT_TEMPLATES_CACHE = None  # the YAML's own (none), not those an earlier part cached
    out = Path("keys")
    if main(["edit", "--model", str(fact_model_dir("gpt2")), "--device", "cpu", "--facts", str(easyedit_path("gpt2")),
             "--hparams", str(ROOT / "hparams" / "ROME" / "fact-gpt2.yaml"), "--limit", str(n), "--layers", "fixed",
             "--editor", "easyedit", "--out", str(out), "--quiet"]) != 0:
        raise SystemExit("rome-locate edit failed")
    records = json.loads((out / "results.json").read_text())["records"]
    keys = [k for k in records[0]["editor_metrics"]["post"] if k.startswith(("locality.", "portability."))]
    for key in keys:
        ours = [r["metrics"][key] for r in records]
        theirs = [r["editor_metrics"]["post"][key] for r in records]
        differ = sum(abs(a - b) > 1e-6 for a, b in zip(ours, theirs))
        print(f"key {key}: rome-locate {sum(ours) / len(ours):.3f}, EasyEdit {sum(theirs) / len(theirs):.3f}; "
              f"differs on {differ} of {len(records)} facts")


def main(n: int = 10) -> int:
    os.chdir(tempfile.mkdtemp(prefix="compare-padding-"))  # EasyEdit writes logs/ here
    for family in ("gpt2", "llama"):
        for templates in (None, PAPER_TEMPLATES):
            padding_side(family, n, templates)
    key_batches(n)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
