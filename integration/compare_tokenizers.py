#!/usr/bin/env python
"""EasyEdit's own model loader against the plugin's BaseEditor on the shipped GPT-2 fact model.

EasyEdit's BaseEditor loads GPT2Tokenizer for any model path containing "gpt"; the plugin's loads the model's own
tokenizer (AutoTokenizer). Same YAML (hparams/ROME/fact-gpt2.yaml), same first N CounterFact facts, one rephrasing
each, every request at the YAML's layer (given in the request, so the plugin's layer rule does not move it),
EasyEdit's own post-edit metrics; and the plugin's BaseEditor given EasyEdit's tokenizer in the preloaded (model,
tokenizer) pair, which is how to get EasyEdit's numbers back:

    EASYEDIT_PATH=/path/to/EasyEdit python integration/compare_tokenizers.py [N]
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def easyedit_pair(model_dir: Path) -> tuple:
    """(model, tokenizer) as EasyEdit's BaseEditor loads a path containing "gpt": GPT2Tokenizer, pad = EOS."""
    from transformers import AutoModelForCausalLM, GPT2Tokenizer

    tok = GPT2Tokenizer.from_pretrained(model_dir)
    tok.pad_token_id = tok.eos_token_id
    return AutoModelForCausalLM.from_pretrained(model_dir), tok


def main(n: int = 10) -> int:
    from rome_locate.easyedit import BaseEditor, ROMEHyperParams as LocatedHParams, import_easyedit
    from rome_locate.hparams import bind_model, load_hparams, write_hparams

    import_easyedit()
    from easyeditor import BaseEditor as EasyEditBaseEditor, ROMEHyperParams

    model_dir = ROOT / "rome_locate" / "fact_models" / "gpt2"
    h = bind_model(load_hparams(ROOT / "hparams" / "ROME" / "fact-gpt2.yaml", easyedit=False), model_dir)
    os.chdir(tempfile.mkdtemp(prefix="compare-tokenizers-"))  # EasyEdit writes logs/ here
    path = write_hparams(h, Path("rome.yaml"))
    facts = json.loads((model_dir / "counterfact.json").read_text())[:n]
    rw = [f["requested_rewrite"] for f in facts]
    # EasyEdit's ROME ignores "layer" (it edits at the YAML's); the plugin edits a request that has one there.
    requests = [{"prompt": r["prompt"].format(r["subject"]), "ground_truth": r["target_true"]["str"],
                 "target_new": r["target_new"]["str"], "subject": r["subject"], "portability": {}, "locality": {},
                 "rephrase_prompt": f["paraphrase_prompts"][0], "layer": h.layers[0]} for r, f in zip(rw, facts)]

    def mean(metrics, key):
        values = [m["post"][key] for m in metrics]
        return sum(sum(v) / len(v) if isinstance(v, list) else float(v) for v in values) / len(values)

    for name, cls, hparams_cls, preload in (
            ("EasyEdit's BaseEditor", EasyEditBaseEditor, ROMEHyperParams, False),
            ("rome_locate.easyedit.BaseEditor", BaseEditor, LocatedHParams, False),
            ("rome_locate.easyedit.BaseEditor given EasyEdit's tokenizer", BaseEditor, LocatedHParams, True)):
        hparams = hparams_cls.from_hparams(str(path))
        if preload:  # EasyEdit's exact behaviour: its tokenizer, loaded as EasyEdit loads it, in the preloaded pair
            hparams = dataclasses.replace(hparams, model_name=easyedit_pair(model_dir))
        editor = cls.from_hparams(hparams)
        metrics, _, _ = editor.edit_requests([dict(r) for r in requests], sequential_edit=False, verbose=False)
        print(f"{name}: tokenizer {type(editor.tok).__name__}, post rewrite_acc {mean(metrics, 'rewrite_acc'):.3f}, "
              f"rephrase_acc {mean(metrics, 'rephrase_acc'):.3f} (n={len(metrics)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
