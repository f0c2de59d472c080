"""EasyEdit's request and metrics shapes for rome-locate's records: the request dict of a fact, and EasyEdit's
returned metrics reduced to plain numbers. Plain Python: EasyEdit is imported only by `rome_locate.easyedit`,
which re-exports these."""

from __future__ import annotations

from typing import Any, Sequence

from .facts import Fact

# A request's edit layer, written into the editor's own copy of each request and each metrics entry.
LAYER_KEY = "layer"


def _by_key(probes: Sequence[Any]) -> dict[str, dict[str, list[str]]]:
    """EasyEdit's {key: {"prompt": [...], "ground_truth": [...]}} of the probes that have an answer."""
    out: dict[str, dict[str, list[str]]] = {}
    for probe in probes:
        if probe.answer:  # EasyEdit scores prompt + " " + answer: without an answer it has nothing to score
            group = out.setdefault(probe.key, {"prompt": [], "ground_truth": []})
            group["prompt"].append(probe.prompt)
            group["ground_truth"].append(probe.answer)
    return out


def easyedit_request(fact: Fact) -> dict[str, Any]:
    """The request dict EasyEdit's BaseEditor.edit_requests takes for one fact (targets without a leading space):
    its locality and portability probes by key, each key's prompts scored together, as EasyEdit does."""
    request: dict[str, Any] = {"prompt": fact.prompt, "subject": fact.subject, "target_new": fact.target_new,
                               "ground_truth": fact.target or "<|unknown|>", "portability": _by_key(fact.portability),
                               "locality": _by_key(fact.locality)}
    if fact.rephrase_prompts:
        # EasyEdit's datasets carry one rephrasing a request (a list is scored against one target and fails).
        request["rephrase_prompt"] = fact.rephrase_prompts[0]
    return request


def _per_request(requests: Sequence[dict[str, Any]], section: str) -> dict[str, dict[str, list[Any]]] | None:
    """EasyEdit's `locality_inputs`/`portability_inputs`: for each key, one prompt (list) and answer a request,
    None where a request lacks the key (EasyEdit's _prepare_requests then leaves it out of that request)."""
    keys = list(dict.fromkeys(k for r in requests for k in (r.get(section) or {})))
    if not keys:
        return None
    return {k: {field: [((r.get(section) or {}).get(k) or {}).get(field) for r in requests]
                for field in ("prompt", "ground_truth")} for k in keys}


def batch_edit_kwargs(requests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The arguments of EasyEdit's BaseEditor.batch_edit that build exactly these request dicts (its
    _prepare_requests), for the batch methods (MEMIT, AlphaEdit), which take no request dicts."""
    kwargs: dict[str, Any] = {key: [r[field] for r in requests] for key, field in
                              (("prompts", "prompt"), ("target_new", "target_new"), ("ground_truth", "ground_truth"),
                               ("subject", "subject"))}
    if any("rephrase_prompt" in r for r in requests):
        kwargs["rephrase_prompts"] = [r.get("rephrase_prompt") for r in requests]
    kwargs["locality_inputs"] = _per_request(requests, "locality")
    kwargs["portability_inputs"] = _per_request(requests, "portability")
    return kwargs


def _flat(v: Any) -> list[float]:
    if isinstance(v, (list, tuple)):
        return [x for item in v for x in _flat(item)]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [float(v)]
    return [float(v.item())] if hasattr(v, "item") else []


def _mean(values: Any) -> float | None:
    flat = _flat(values)
    return sum(flat) / len(flat) if flat else None


def _keyed(row: dict[str, Any], name: str, section: Any) -> None:
    """`name.KEY` (the mean of EasyEdit's `KEY_acc` list) for every key, and `name`, the mean over the keys."""
    means = {k[: -len("_acc")]: _mean(v) for k, v in (section or {}).items() if k.endswith("_acc")}
    if means:
        row[name] = _mean([v for v in means.values() if v is not None])
        row.update({f"{name}.{k}": v for k, v in means.items()})


def easyedit_metrics(metric: dict[str, Any]) -> dict[str, Any]:
    """EasyEdit's returned metrics of one request, reduced to plain numbers: pre/post rewrite_acc, rephrase_acc,
    locality and portability (each key's `KEY_acc` list averaged as `locality.KEY`, the keys' mean as
    `locality`), and the layer EasyEdit edited at."""
    layer = metric.get(LAYER_KEY, (metric.get("requested_rewrite") or {}).get(LAYER_KEY))
    out: dict[str, Any] = {"layer": layer}
    for stage in ("pre", "post"):
        m = metric.get(stage) or {}
        row = {key: _mean(m.get(key)) for key in ("rewrite_acc", "rephrase_acc") if key in m}
        _keyed(row, "locality", m.get("locality"))
        _keyed(row, "portability", m.get("portability"))
        out[stage] = row
    return out
