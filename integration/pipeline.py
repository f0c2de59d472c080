#!/usr/bin/env python
"""Causal tracing → ROME hyperparameters → EasyEdit's BaseEditor → metrics, in one run.

Drop this folder into an EasyEdit clone (or point EASYEDIT_PATH at one) and run

    python integration/pipeline.py --config integration/config.yaml

Steps (each writes into `out`):
  1. locate:  trace every fact (ROME causal tracing, MLP restoration at the last
              subject token) → locate.jsonl, one line per fact with its layer;
  2. hparams: the dataset-level layer (largest mean indirect effect) written into
              complete ROME hyperparameters → hparams.yaml (EasyEdit format);
  3. edit:    EasyEdit's BaseEditor.edit_requests with ROME, each fact at the
              dataset layer (`layers: dataset`), at its own traced layer
              (`layers: traced`), or at the base YAML's layer (`layers: fixed`);
  4. metrics: EasyEdit's per-request metrics plus the layer used → metrics.json.
See integration/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml


def _load_config(path: str) -> dict:
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise SystemExit(f"{path}: expected a mapping")
    base = Path(path).resolve().parent
    for key in ("model", "facts", "base_hparams", "out", "stats_dir"):
        # Paths in the config are relative to the config file's folder unless they exist as given.
        value = config.get(key)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (base / value).exists():
            config[key] = str(base / value)
    return config


def _flat(value) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    return [] if value is None else [float(value)]


def _mean_locality(records: list[dict]) -> float | None:
    values = []
    for r in records:
        for key, acc in ((r.get("post") or {}).get("locality") or {}).items():
            if not key.endswith("_acc"):  # EasyEdit also keeps the predicted token ids ("*_output")
                continue
            flat = _flat(acc)
            if flat:
                values.append(sum(flat) / len(flat))
    return sum(values) / len(values) if values else None


def _run_easyedit(BaseEditor, ee_hparams, groups, model, tok, config, mode, easyedit_request) -> list[dict]:
    """One BaseEditor per layer group, all sharing the loaded model; EasyEdit's metrics per fact."""
    records = []
    for layer, group in sorted(groups.items()):
        # A preloaded model: model_name=(model, tok); BaseEditor then needs model_name as a string again.
        h = dataclasses.replace(ee_hparams, layers=[layer], model_name=(model, tok))
        editor = BaseEditor.from_hparams(h)
        editor.model_name = str(config["model"])
        editor.hparams = dataclasses.replace(h, model_name=str(config["model"]))
        # sequential_edit=False: EasyEdit restores the weights after every request.
        metrics, _, _ = editor.edit_requests([easyedit_request(f) for f in group], sequential_edit=False,
                                             verbose=False)
        for fact, m in zip(group, metrics):
            records.append({"fact_id": fact.id, "layer": layer,
                            "layer_source": "traced" if mode == "traced" else mode,
                            "pre": m.get("pre"), "post": m.get("post")})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML (see integration/config.yaml)")
    parser.add_argument("--easyedit", default=None, help="EasyEdit clone (default: $EASYEDIT_PATH or importable)")
    parser.add_argument("--editor", default=None, choices=["easyedit", "builtin"], help="override the config")
    parser.add_argument("--limit", type=int, default=None, help="override the config's limit")
    args = parser.parse_args(argv)
    config = _load_config(args.config)
    editor_kind = args.editor or config.get("editor", "easyedit")
    limit = args.limit if args.limit is not None else config.get("limit")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rome_locate.arch import arch_for
    from rome_locate.choose import choose_dataset_layer
    from rome_locate.easyedit import easyedit_request, import_easyedit, stubbed_modules
    from rome_locate.evaluate import summarize
    from rome_locate.facts import load_facts
    from rome_locate.hparams import (bind_model, dataset_header, generate_hparams, load_hparams, to_dict,
                                     with_layer, write_hparams)
    from rome_locate.locate import locate
    from rome_locate.pipeline import edit_facts
    from rome_locate.trace import TraceSettings

    out = Path(config.get("out", "runs/pipeline")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(config["model"])
    model = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32).to(device).eval()
    arch = arch_for(model)
    facts = [f for f in load_facts(config["facts"], limit=limit) if f.target_new]
    if not facts:
        raise SystemExit(f"{config['facts']}: no fact with a target_new to edit")

    # 1. locate
    trace = TraceSettings.from_json(config.get("trace") or {}, strict=True)
    pairs = locate(model, tok, facts, trace, out=out / "locate.jsonl", arch=arch, progress=True)
    dataset = choose_dataset_layer([r for r, _ in pairs])
    print(f"dataset layer {dataset.layer}; per-fact histogram {list(dataset.histogram)}")

    # 2. hyperparameters
    hp_device = int(device.partition(":")[2] or 0) if device.startswith("cuda") else device
    if config.get("base_hparams"):
        hparams = load_hparams(config["base_hparams"], n_layers=arch.n_layers, easyedit=False)
        hparams = dataclasses.replace(hparams, device=hp_device)
        if config.get("layers", "dataset") != "fixed":
            hparams = with_layer(hparams, dataset.layer, n_layers=arch.n_layers)
    else:
        hparams = generate_hparams(model, arch, dataset.layer, str(config["model"]), device=hp_device,
                                   **(config.get("hparams_overrides") or {}))
    hparams = bind_model(hparams, config["model"])
    if config.get("stats_dir"):
        hparams = dataclasses.replace(hparams, stats_dir=str(config["stats_dir"]))
    # Absolute: EasyEdit runs inside OUT below (it writes logs/ into its working directory).
    hparams = dataclasses.replace(hparams, stats_dir=str(Path(hparams.stats_dir).resolve()))
    header = dataset_header(config["facts"], dataset.n_facts, trace.to_json(), dataset.mean_effects,
                            dataset.histogram, dataset.layer, dataset.kind)
    hp_path = write_hparams(hparams, out / "hparams.yaml", header=header)
    print(f"wrote {hp_path}")

    mode = config.get("layers", "dataset")
    # Layer choices are aligned with the facts by position (ids may repeat or be missing).
    layer_of = [c.layer if mode == "traced" else hparams.layers[0] for _, c in pairs]

    # 3. edit, 4. metrics
    if editor_kind == "builtin":
        records = edit_facts(model, tok, facts, hparams, located=layer_of, out_dir=out, progress=True)
        result = {"editor": "builtin", "layers": mode, "summary": summarize(records),
                  "records": [r.to_json() for r in records]}
    else:
        import_easyedit(args.easyedit)
        print(f"EasyEdit imported; modules replaced by stand-ins during its import: {stubbed_modules()}")
        from easyeditor import BaseEditor, ROMEHyperParams

        ee_hparams = ROMEHyperParams.from_hparams(str(hp_path))
        groups: dict[int, list] = defaultdict(list)
        for fact, layer in zip(facts, layer_of):
            groups[layer].append(fact)
        records = []
        cwd = os.getcwd()
        os.chdir(out)  # EasyEdit writes logs/run.log and logs/results.json into the working directory
        try:
            records = _run_easyedit(BaseEditor, ee_hparams, groups, model, tok, config, mode, easyedit_request)
        finally:
            os.chdir(cwd)

        def mean(key, stage="post"):
            values = [r[stage].get(key) for r in records if r.get(stage) and r[stage].get(key) is not None]
            values = [sum(_flat(v)) / len(_flat(v)) for v in values if _flat(v)]
            return sum(values) / len(values) if values else None

        result = {"editor": "easyedit", "layers": mode, "hparams": to_dict(ee_hparams),
                  "summary": {"n": len(records), "pre_rewrite_acc": mean("rewrite_acc", "pre"),
                              "post_rewrite_acc": mean("rewrite_acc"), "post_rephrase_acc": mean("rephrase_acc"),
                              "post_locality": _mean_locality(records)},
                  "records": records}
    path = out / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
