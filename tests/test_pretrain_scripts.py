"""The pre-training scripts (scripts/pretrain_mlm.py, scripts/pretrain_vit_digits.py), run as
subprocesses with tiny settings: checkpoints load with transformers, the trace has the promised
steps, the digits split is a partition, runs are reproducible, an existing output is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MLM = ROOT / "scripts" / "pretrain_mlm.py"
VIT = ROOT / "scripts" / "pretrain_vit_digits.py"

TINY_MLM = ["--steps", "7", "--save-every", "3", "--batch-size", "4", "--seq-len", "32", "--hidden", "32",
            "--layers", "2", "--heads", "2", "--eval-seqs", "4", "--threads", "1", "--no-progress"]
MLM_STEPS = [0, 3, 6, 7]  # every --save-every steps, plus step 0 (the init) and the last step
TINY_VIT = ["--epochs", "2", "--hidden", "16", "--layers", "1", "--heads", "2", "--batch-size", "32",
            "--threads", "1", "--no-progress"]


def run(script: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script.name} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlm") / "trace"
    proc = run(MLM, "--out", out, *TINY_MLM)
    return out, proc


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit") / "digits"
    proc = run(VIT, "--out", out, *TINY_VIT)
    return out, proc


# --- masked language model --------------------------------------------------------------------


def test_mlm_checkpoints_load_and_match_save_every(mlm_run):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    out, proc = mlm_run
    assert sorted(p.name for p in out.iterdir()) == sorted([f"checkpoint-{s}" for s in MLM_STEPS] + ["train_log.json"])
    assert "held-out masked-token loss" in proc.stdout
    tok = AutoTokenizer.from_pretrained(out / "checkpoint-7")  # each checkpoint carries its tokenizer
    # MiniLM's tokenizer.json pads and truncates to 128: the script switches both off (also for its data)
    assert len(tok("hello world")["input_ids"]) == 4
    assert len(tok(" ".join(["river"] * 300))["input_ids"]) == 302
    batch = tok(["The river flows into the sea."], return_tensors="pt")
    for step in MLM_STEPS:
        model = AutoModelForMaskedLM.from_pretrained(out / f"checkpoint-{step}")
        assert type(model).__name__ == "BertForMaskedLM"
        assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
        with torch.no_grad():
            logits = model(**batch).logits
        assert logits.shape == (1, batch["input_ids"].shape[1], tok.vocab_size)
        assert torch.isfinite(logits).all()
    first, last = tensors(out / "checkpoint-0"), tensors(out / "checkpoint-7")
    assert first.keys() == last.keys()
    changed = [k for k in first if not torch.equal(first[k], last[k])]
    assert "bert.encoder.layer.0.attention.self.query.weight" in changed
    assert len(changed) > len(first) // 2


def test_mlm_train_log_records_the_steps(mlm_run):
    out, _ = mlm_run
    log = json.loads((out / "train_log.json").read_text())
    assert log["finished"] is True
    assert [c["step"] for c in log["checkpoints"]] == MLM_STEPS
    assert [c["path"] for c in log["checkpoints"]] == [f"checkpoint-{s}" for s in MLM_STEPS]
    assert len(log["train_loss"]) == 7
    init = log["checkpoints"][0]
    assert abs(init["eval_loss"] - 10.33) < 0.3  # random init: about ln(30522)
    for c in log["checkpoints"]:
        assert 0.0 <= c["eval_masked_acc"] <= 1.0 and c["eval_loss"] > 0 and c["seconds"] >= 0
    assert log["checkpoints"][-1]["eval_loss"] < init["eval_loss"]


def test_mlm_same_seed_same_weights_and_overwrite(mlm_run, tmp_path):
    import torch

    out, _ = mlm_run
    again = tmp_path / "again"
    again.mkdir()
    (again / "stale.txt").write_text("old")
    run(MLM, "--out", again, *TINY_MLM, "--overwrite")
    assert not (again / "stale.txt").exists()
    a, b = tensors(out / "checkpoint-7"), tensors(again / "checkpoint-7")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = json.loads((out / "train_log.json").read_text())
    log_b = json.loads((again / "train_log.json").read_text())
    assert log_a["train_loss"] == log_b["train_loss"]


def test_mlm_refuses_a_non_empty_output(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    proc = run(MLM, "--out", out, *TINY_MLM, check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "not empty" in proc.stderr
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_mlm_rejects_bad_settings(tmp_path):
    proc = run(MLM, "--out", tmp_path / "x", "--hidden", "30", "--heads", "4", check=False)
    assert proc.returncode == 2 and "multiple of --heads" in proc.stderr
    assert not (tmp_path / "x").exists()


# --- ViT on scikit-learn digits -----------------------------------------------------------------


def test_vit_checkpoint_loads_and_classifies(vit_run):
    import numpy as np
    import torch
    from PIL import Image
    from sklearn.datasets import load_digits
    from transformers import AutoImageProcessor, ViTForImageClassification

    out, proc = vit_run
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                    "preprocessor_config.json", "split.json", "train_log.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no partial folder left
    assert "validation accuracy" in proc.stdout
    model = ViTForImageClassification.from_pretrained(out)
    assert model.config.num_channels == 1 and model.config.image_size == 8 and model.config.patch_size == 2
    assert model.config.id2label == {i: str(i) for i in range(10)}
    assert model.config.label2id == {str(i): i for i in range(10)}
    processor = AutoImageProcessor.from_pretrained(out)
    images = load_digits().images[:3]
    grey = [Image.fromarray(np.rint(im * 255 / 16).astype(np.uint8)) for im in images]
    pixels = processor(grey, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 1, 8, 8)
    mean, std = processor.image_mean[0], processor.image_std[0]
    expected = (torch.tensor(np.rint(images * 255 / 16) / 255, dtype=torch.float32) - mean) / std
    assert torch.allclose(pixels[:, 0], expected, atol=1e-5)
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()


def test_vit_split_is_a_disjoint_cover_of_the_digits(vit_run):
    out, _ = vit_run
    split = json.loads((out / "split.json").read_text())
    pre, held = set(split["pretrain"]), set(split["heldout"])
    assert len(pre) == len(split["pretrain"]) and len(held) == len(split["heldout"])
    assert not pre & held and pre | held == set(range(1797))
    assert split["n_images"] == 1797 and split["split_seed"] == 0
    assert abs(len(pre) - 1797 / 2) < 10
    tr, va = set(split["pretrain_train"]), set(split["pretrain_val"])
    assert not tr & va and tr | va == pre
    log = json.loads((out / "train_log.json").read_text())
    assert log["data"]["pretrain_train"] == len(tr) and log["data"]["pretrain_val"] == len(va)
    assert log["data"]["heldout_untouched"] == len(held)


def test_vit_train_log_has_each_epoch(vit_run):
    out, _ = vit_run
    log = json.loads((out / "train_log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2]
    for e in log["epochs"]:
        assert 0 <= e["val_acc"] <= 1 and 0 <= e["train_acc"] <= 1 and e["train_loss"] > 0
    assert log["final"]["val_acc"] == log["epochs"][-1]["val_acc"]
    assert log["finished"] is True


def test_vit_same_seed_same_weights(vit_run, tmp_path):
    import torch

    out, _ = vit_run
    run(VIT, "--out", tmp_path / "again", *TINY_VIT)
    a, b = tensors(out), tensors(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "split.json").read_text() == (tmp_path / "again" / "split.json").read_text()
    other = tmp_path / "seed1"
    run(VIT, "--out", other, *TINY_VIT, "--seed", "1")
    c = tensors(other)
    assert not torch.equal(a["vit.embeddings.patch_embeddings.projection.weight"],
                           c["vit.embeddings.patch_embeddings.projection.weight"])
    assert (out / "split.json").read_text() == (other / "split.json").read_text()  # split has its own seed


def test_vit_refuses_a_non_empty_output(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    proc = run(VIT, "--out", out, *TINY_VIT, check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "not empty" in proc.stderr
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
