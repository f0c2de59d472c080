"""Regression tests for the defects of issue 21: each reproduces the defect as it was reported."""

from __future__ import annotations

import os

import pytest

from rome_locate.files import atomic_path, write_bytes, write_text


# ---- (11) outputs never follow a link planted in the output folder ---------------


def _old_temp_name(path):
    # The name the writer used to pick: predictable from the target and this process's id.
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


@pytest.mark.parametrize("write", [write_text, lambda p, s: write_bytes(p, s.encode())], ids=["text", "bytes"])
def test_planted_symlink_at_the_temp_name_is_not_followed(tmp_path, write):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "results.json"
    _old_temp_name(target).symlink_to(victim)
    write(target, "new output\n")
    assert victim.read_text() == "precious\n"
    assert target.read_text() == "new output\n" and not target.is_symlink()


def test_temp_file_is_new_and_private_to_the_writer(tmp_path):
    target = tmp_path / "plot.png"
    _old_temp_name(target).symlink_to(tmp_path / "elsewhere.png")
    with atomic_path(target) as tmp:
        # A fresh regular file beside the target, with the target's suffix (matplotlib and numpy infer the format).
        assert tmp.parent == tmp_path and tmp.suffix == ".png"
        assert tmp.is_file() and not tmp.is_symlink() and tmp != _old_temp_name(target)
        tmp.write_bytes(b"png")
    assert target.read_bytes() == b"png"
    assert not (tmp_path / "elsewhere.png").exists()


def test_temp_file_is_removed_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_output_gets_the_umask_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "shared.json", "{}\n")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# ---- (16) damaged or pickle-bearing weights: one line naming the file ------------


def _fact_model_copy(tmp_path, weights: str | None = "model.safetensors"):
    """The shipped gpt2 fact model's loadable files (config, tokenizer, weights unless `weights` is None)."""
    import shutil

    from rome_locate.fact_models import fact_model_dir

    src, dst = fact_model_dir("gpt2"), tmp_path / "model"
    dst.mkdir()
    names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    for name in names + ([weights] if weights else []):
        shutil.copy(src / name, dst / name)
    return dst


def _load_error(model_dir, expected=ValueError):
    from rome_locate import cli
    from rome_locate.models import load_model

    with pytest.raises(expected) as err:
        load_model(model_dir, device="cpu")
    # The CLI turns exactly these into its one-line "error:" message.
    assert isinstance(err.value, cli._user_errors()) and "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_safetensors_is_one_line_naming_the_file(tmp_path, damage):
    model_dir = _fact_model_copy(tmp_path)
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"\xff" * 4096)
    message = _load_error(model_dir)
    assert message.startswith(f"{weights}: not a complete safetensors file")


def test_pickle_bearing_bin_is_refused_without_running_it(tmp_path):
    import torch

    model_dir = _fact_model_copy(tmp_path, weights=None)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"transformer.wte.weight": Payload()}, model_dir / "pytorch_model.bin")
    message = _load_error(model_dir)
    assert message.startswith(f"{model_dir / 'pytorch_model.bin'}: refused as model weights")
    assert "nothing in the file was run" in message
    assert not marker.exists()


def test_truncated_bin_is_one_line_naming_the_file(tmp_path):
    import torch
    from safetensors.torch import load_file

    from rome_locate.fact_models import fact_model_dir

    model_dir = _fact_model_copy(tmp_path, weights=None)
    weights = model_dir / "pytorch_model.bin"
    torch.save(load_file(fact_model_dir("gpt2") / "model.safetensors"), weights)
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    message = _load_error(model_dir)
    assert message.startswith(f"{weights}: not a complete PyTorch checkpoint")


def test_a_multi_line_loader_message_stays_one_line(tmp_path, monkeypatch):
    import transformers

    def refuse(*_a, **_k):
        raise OSError("first line of the loader's message\nsecond line, with the file it names")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    message = _load_error(_fact_model_copy(tmp_path), expected=FileNotFoundError)
    assert "first line of the loader's message second line, with the file it names" in message


# ---- the evaluation reads each metric from its own prompt group ------------------


def _scores(rows, answers=False):
    """Hand-built scores of one prompt group: per row (NLL of target_new, NLL of the true target, tokens of
    target_new predicted right out of 2); with `answers`, also the locality answer's top-1 token."""
    import torch

    from rome_locate.scoring import PairScore

    out = []
    for new_nll, true_nll, right in rows:
        new = PairScore(nll=new_nll, target_ids=(5, 6), predicted=(5, 6)[:right] + (9,) * (2 - right), next_logp=None)
        row = {"new": new, "true": PairScore(nll=true_nll, target_ids=(7,), predicted=(7,), next_logp=None)}
        if answers:
            # The answer's top-1 token follows `right`, so that before and after agree on some rows only.
            row["answer"] = PairScore(nll=1.0, target_ids=(3,), predicted=(right,),
                                      next_logp=torch.log_softmax(torch.arange(4.0) * (right + 1), -1))
        out.append(row)
    return out


def _state(edit, paraphrase, neighborhood):
    return {"edit": _scores(edit), "paraphrase": _scores(paraphrase), "neighborhood": _scores(neighborhood, True)}


def _share(rows, won):
    return sum(won(r) for r in rows) / len(rows)


def _margin(rows, a, b):
    return sum(r[a].prob - r[b].prob for r in rows) / len(rows)


def _accuracy(rows):
    return sum(sum(p == t for p, t in zip(r["new"].predicted, r["new"].target_ids)) / 2 for r in rows) / len(rows)


def test_each_metric_comes_from_its_own_prompt_group():
    from rome_locate.metrics import metrics_between

    # Each group's rows give other success rates, margins and accuracies, so a metric read from another group
    # (or from the other model state) would differ; the asserts below on `readings` check that they do.
    after = _state(edit=[(0.2, 3.0, 2)],
                   paraphrase=[(0.5, 2.0, 2), (2.5, 0.4, 0)],
                   neighborhood=[(0.3, 2.2, 1), (0.6, 1.9, 2), (3.1, 0.7, 0), (0.9, 1.4, 2)])
    before = _state(edit=[(4.0, 0.3, 0)],
                    paraphrase=[(0.6, 3.5, 0), (0.9, 3.0, 1)],
                    neighborhood=[(2.9, 0.2, 0), (2.4, 0.8, 1), (2.0, 0.5, 0), (0.1, 1.1, 2)])
    m = metrics_between(before, after)

    new_wins = lambda r: r["new"].nll < r["true"].nll  # noqa: E731
    true_wins = lambda r: r["true"].nll < r["new"].nll  # noqa: E731
    for state, suffix in ((after, ""), (before, "_pre")):
        readings = {g: (_share(rows, new_wins), _margin(rows, "new", "true"), _accuracy(rows),
                        _share(rows, true_wins)) for g, rows in state.items()}
        for i in range(4):
            assert len({r[i] for r in readings.values()}) == 3, (suffix, i, readings)
        assert m["efficacy_score" + suffix] == pytest.approx(readings["edit"][0])
        assert m["efficacy_magnitude" + suffix] == pytest.approx(readings["edit"][1])
        assert m["paraphrase_score" + suffix] == pytest.approx(readings["paraphrase"][0])
        assert m["paraphrase_magnitude" + suffix] == pytest.approx(readings["paraphrase"][1])
        assert m["neighborhood_score" + suffix] == pytest.approx(readings["neighborhood"][3])
        assert m["neighborhood_magnitude" + suffix] == pytest.approx(_margin(state["neighborhood"], "true", "new"))
        assert m["rewrite_acc" + suffix] == pytest.approx(readings["edit"][2])
        assert m["rephrase_acc" + suffix] == pytest.approx(readings["paraphrase"][2])
    assert m["efficacy_score"] != m["efficacy_score_pre"] and m["paraphrase_score"] != m["paraphrase_score_pre"]
    assert m["p_new"] == pytest.approx(after["edit"][0]["new"].prob)
    assert m["p_new_pre"] == pytest.approx(before["edit"][0]["new"].prob)
    # Locality compares the neighbourhood answers' top-1 tokens before and after the edit, row by row.
    agree = [b["answer"].predicted == a["answer"].predicted for b, a in zip(before["neighborhood"],
                                                                           after["neighborhood"])]
    assert 0 < sum(agree) < len(agree)
    assert m["locality"] == pytest.approx(sum(agree) / len(agree))
