"""Every bad input: one clear line on stderr, a non-zero exit, and nothing left behind."""

import errno
import json
import shutil
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_prune import writer as writer_module
from llm_prune.cli import main


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    code = main([*map(str, argv), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def assert_clean_failure(code, err, tmp_path, match, keep=()):
    assert code == 2
    assert err.startswith("llm-prune: error: ") and "\n" not in err, err
    assert match in err, err
    leftovers = {p.name for p in tmp_path.iterdir()} - set(keep)
    assert not leftovers, f"left behind: {leftovers}"


@pytest.mark.parametrize("args,match", [
    (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["--sparsity", "-0.2"], "sparsity must be in [0, 1)"),
    (["--sparsity", "lots"], "sparsity must be a number"),
    (["--pattern", "4:2"], "pattern 4:2 is impossible"),
    (["--pattern", "2:0"], "pattern 2:0 is impossible"),
    (["--pattern", "2/4"], "pattern must look like N:M"),
    (["--pattern", "2:4", "--scope", "global"], "--scope global does not apply"),
    ([], "give --sparsity"),
])
def test_bad_sparsity(capsys, tiny_llama, tmp_path, args, match):
    code, err = run_cli(capsys, tiny_llama, *args, "--out", tmp_path / "o")
    assert_clean_failure(code, err, tmp_path, match, keep=["tiny-llama"])


def test_pattern_impossible_for_shape(capsys, tmp_path):
    from tests.conftest import save_tiny, tiny_llama_config

    src = save_tiny(tmp_path / "odd", tiny_llama_config(intermediate_size=66))
    code, err = run_cli(capsys, src, "--pattern", "2:4", "--out", tmp_path / "o")
    assert_clean_failure(code, err, tmp_path, "down_proj.weight has input dimension 66", keep=["odd"])
    # Excluding the offending tensor makes it possible.
    assert main([str(src), "--pattern", "2:4", "--exclude", "mlp.down_proj.weight", "--out",
                 str(tmp_path / "o"), "--quiet"]) == 0


def test_unknown_model(capsys, tmp_path):
    code, err = run_cli(capsys, "no-such-model", "--sparsity", "0.5", "--out", tmp_path / "o")
    assert_clean_failure(code, err, tmp_path, "is not a checkpoint directory, a hub id")


def test_hub_id_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, err = run_cli(capsys, "vicuna-7b", "--sparsity", "0.5", "--out", tmp_path / "o")
    assert code == 2 and "lmsys/vicuna-7b-v1.5 is not in the local Hugging Face cache" in err
    assert "huggingface-cli download lmsys/vicuna-7b-v1.5" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_pickle_refused_unless_allowed(capsys, tiny_llama, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(tiny_llama / "config.json", src)
    state = {}
    for f in tiny_llama.glob("*.safetensors"):
        state.update(load_file(f))
    torch.save(state, src / "pytorch_model.bin")
    code, err = run_cli(capsys, src, "--sparsity", "0.5", "--out", tmp_path / "o")
    assert_clean_failure(code, err, tmp_path, "--allow-pickle", keep=["tiny-llama", "pickled"])
    assert main([str(src), "--sparsity", "0.5", "--out", str(tmp_path / "o"), "--allow-pickle", "--quiet"]) == 0
    assert (tmp_path / "o" / "model.safetensors.index.json").is_file()  # output is safetensors


def test_truncated_shard(capsys, tiny_llama, tmp_path):
    shard = tiny_llama / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--out", tmp_path / "o")
    assert_clean_failure(code, err, tmp_path, "model-00002-of-00002.safetensors is truncated or corrupt",
                         keep=["tiny-llama"])


def test_corrupt_header(capsys, tiny_llama, tmp_path):
    shard = tiny_llama / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"garbage!!!!!"
    shard.write_bytes(bytes(data))
    code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--out", tmp_path / "o")
    assert_clean_failure(code, err, tmp_path, "truncated or corrupt", keep=["tiny-llama"])


def test_index_names_missing_file(capsys, tiny_llama, tmp_path):
    (tiny_llama / "model-00002-of-00002.safetensors").unlink()
    code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--out", tmp_path / "o")
    assert_clean_failure(code, err, tmp_path, "names model-00002-of-00002.safetensors, which is missing",
                         keep=["tiny-llama"])


def test_index_names_missing_tensor(capsys, tiny_llama, tmp_path):
    index = json.loads((tiny_llama / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (tiny_llama / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--out", tmp_path / "o")
    assert_clean_failure(code, err, tmp_path, "does not contain model.layers.9.mlp.up_proj.weight",
                         keep=["tiny-llama"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(capsys, tiny_llama, tmp_path, bad):
    shard = tiny_llama / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    name = next(n for n in sorted(tensors) if n.endswith("up_proj.weight"))
    tensors[name][1, 2] = bad
    save_file(tensors, shard, metadata={"format": "pt"})
    code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--out", tmp_path / "o")
    assert_clean_failure(code, err, tmp_path, f"{name} (in model-00002-of-00002.safetensors) has inf or nan",
                         keep=["tiny-llama"])


def test_not_enough_space_up_front(capsys, tiny_llama, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--out", tmp_path / "o")
    assert_clean_failure(code, err, tmp_path, "not enough disk space", keep=["tiny-llama"])


def test_disk_full_while_writing(capsys, tiny_llama, tmp_path, monkeypatch):
    real, calls = writer_module._allocate, []

    def fill_up(fd, size):  # the second shard finds the disk full
        calls.append(size)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, size)

    monkeypatch.setattr(writer_module, "_allocate", fill_up)
    code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--out", tmp_path / "o")
    assert_clean_failure(code, err, tmp_path, "no space left on the device", keep=["tiny-llama"])


def test_existing_output_is_never_overwritten(capsys, tiny_llama, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--out", out)
    assert code == 2 and "already exists; pass --overwrite" in err
    assert (out / "precious.txt").read_text() == "keep me"
    assert main([str(tiny_llama), "--sparsity", "0.5", "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert not (out / "precious.txt").exists() and (out / "sparsity.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "tiny-llama"]


def test_stale_partial_needs_resume(capsys, tiny_llama, tmp_path):
    (tmp_path / ".o.partial").mkdir()
    code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--out", tmp_path / "o")
    assert code == 2 and "pass --resume to continue" in err
    code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--out", tmp_path / "o", "--resume")
    assert code == 2 and "has no readable progress.jsonl" in err and (tmp_path / ".o.partial").is_dir()


def test_no_matching_targets(capsys, tiny_llama, tmp_path):
    code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--targets", "nothing*", "--out", tmp_path / "o")
    assert_clean_failure(code, err, tmp_path, "no tensor inside the transformer blocks matches",
                         keep=["tiny-llama"])


def test_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, tmp_path / "empty", "--sparsity", "0.5", "--out", tmp_path / "o")
    assert_clean_failure(code, err, tmp_path, "has no config.json", keep=["empty"])
