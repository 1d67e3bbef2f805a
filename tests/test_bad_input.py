"""The catalogue of bad input: each case one clear line on stderr, exit code 2, and nothing left behind.

Every row of CASES names a damage (or a bad request), prepares it on a fresh tiny checkpoint, and
states the message a user must see. A few behaviours that need more than a row (an existing
output kept, a partial directory, the pickle opt-in) follow the table.
"""

import errno
import json
import os
import shutil
from collections import namedtuple
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_prune import writer as writer_module
from llm_prune.cli import main

from .conftest import save_tiny, tiny_llama_config


@dataclass
class Case:
    name: str
    argv: Callable  # (tmp_path, src) -> argv, after damaging what it needs
    match: str


def prune(*args):
    return lambda tmp, src: [src, *args, "--out", tmp / "o"]


def damaged(damage, *args):
    def argv(tmp, src):
        damage(src)
        return [src, "--sparsity", "0.5", *args, "--out", tmp / "o"]
    return argv


def shard(src, k=2):
    return src / f"model-0000{k}-of-00002.safetensors"


def truncate(src):
    data = shard(src).read_bytes()
    shard(src).write_bytes(data[:-100])


def garble_header(src):
    data = bytearray(shard(src, 1).read_bytes())
    data[8:20] = b"garbage!!!!!"
    shard(src, 1).write_bytes(bytes(data))


def edit_index(change):
    def damage(src):
        index = json.loads((src / "model.safetensors.index.json").read_text())
        change(index["weight_map"])
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return damage


def edit_header(change):
    """Rewrite shard 1's JSON header (same length, padded), as a hand-edited or hostile file would be."""
    def damage(src):
        data = shard(src, 1).read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        change(header)
        raw = json.dumps(header, separators=(",", ":")).encode()
        assert len(raw) <= n
        shard(src, 1).write_bytes(data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:])
    return damage


def first_target(header):
    return next(k for k in sorted(header) if k.endswith("proj.weight"))


def set_weight(value):
    def damage(src):
        tensors = load_file(shard(src))
        name = next(n for n in sorted(tensors) if n.endswith("up_proj.weight"))
        tensors[name][1, 2] = value
        save_file(tensors, shard(src), metadata={"format": "pt"})
    return damage


def edit_config(**kw):
    def damage(src):
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(kw)
        (src / "config.json").write_text(json.dumps(cfg))
    return damage


def empty_dir(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty"


def link_out(src):
    outside = src.parent / "elsewhere.safetensors"
    shutil.move(shard(src), outside)
    os.symlink(outside, shard(src))


CASES = [
    Case("sparsity 1", prune("--sparsity", "1.0"), "sparsity must be in [0, 1)"),
    Case("sparsity negative", prune("--sparsity", "-0.2"), "sparsity must be in [0, 1)"),
    Case("sparsity not a number", prune("--sparsity", "lots"), "sparsity must be a number"),
    Case("sparsity nan", prune("--sparsity", "nan"), "sparsity must be in [0, 1)"),
    Case("pattern N > M", prune("--pattern", "4:2"), "pattern 4:2 is impossible"),
    Case("pattern M = 0", prune("--pattern", "2:0"), "pattern 2:0 is impossible"),
    Case("pattern syntax", prune("--pattern", "2/4"), "pattern must look like N:M"),
    Case("pattern with global scope", prune("--pattern", "2:4", "--scope", "global"), "--scope global does not apply"),
    Case("sparsity contradicts pattern", prune("--sparsity", "0.3", "--pattern", "2:4"), "contradicts --pattern 2:4"),
    Case("no sparsity", prune(), "give --sparsity"),
    Case("unknown method", prune("--sparsity", "0.5", "--method", "magic"), "invalid choice: 'magic'"),
    Case("unknown scope", prune("--sparsity", "0.5", "--scope", "row"), "invalid choice: 'row'"),
    Case("calibrated method, global scope", prune("--sparsity", "0.5", "--method", "wanda", "--scope", "global"),
         "--scope global does not apply to wanda"),
    Case("allocation with global scope", prune("--sparsity", "0.5", "--allocation", "alpha", "--scope", "global"),
         "--allocation alpha does not apply to --scope global"),
    Case("allocation with a pattern", prune("--pattern", "2:4", "--method", "wanda", "--allocation", "owl"),
         "--allocation owl does not apply to an N:M pattern"),
    Case("owl without calibration", prune("--sparsity", "0.5", "--allocation", "owl"),
         "which omp never reads (use --allocation alpha"),
    Case("band without allocation", prune("--sparsity", "0.5", "--allocation-band", "0.1"),
         "give it with --allocation owl or alpha"),
    Case("unclipped without allocation", prune("--sparsity", "0.5", "--allocation-unclipped"),
         "--allocation-unclipped changes how owl/alpha shares are shifted"),
    Case("band out of range", prune("--sparsity", "0.5", "--allocation", "alpha", "--allocation-band", "1.5"),
         "--allocation-band must be in [0, 1)"),
    Case("owl M not positive", prune("--sparsity", "0.5", "--method", "wanda", "--allocation", "owl", "--owl-m", "0"),
         "--owl-m must be positive"),
    Case("no matching targets", prune("--sparsity", "0.5", "--targets", "nothing*"), "no tensor inside the transformer"),
    Case("packed24 at 0.5", prune("--sparsity", "0.5", "--format", "packed24"), "--format packed24 stores 2:4 weights"),
    Case("packed24 at 4:8", prune("--pattern", "4:8", "--format", "packed24"), "--format packed24 stores 2:4 weights"),
    Case("no-save without eval", prune("--sparsity", "0.5", "--no-save"), "--no-save only makes sense with --eval"),
    Case("save-mask with no-save", prune("--sparsity", "0.5", "--no-save", "--save-mask", "--eval", "ppl"),
         "--save-mask writes the masks beside an export"),
    Case("unknown eval task", prune("--sparsity", "0.5", "--eval", "no_such_task"), "unknown task 'no_such_task'"),
    Case("calibration device", prune("--sparsity", "0.5", "--method", "wanda", "--device", "toaster"),
         "'toaster' is not a device"),
    Case("nsamples 0", prune("--sparsity", "0.5", "--method", "wanda", "--nsamples", "0"), "--nsamples must be at least 1"),
    Case("unknown model", lambda tmp, src: ["no-such-model", "--sparsity", "0.5", "--out", tmp / "o"],
         "is not a checkpoint directory, a hub id"),
    Case("not a checkpoint", lambda tmp, src: [empty_dir(tmp), "--sparsity", "0.5", "--out", tmp / "o"],
         "has no config.json"),
    Case("config not JSON", damaged(lambda src: (src / "config.json").write_text("{oops")), "is not valid JSON"),
    Case("unknown family", damaged(edit_config(model_type="mystery")), "model_type 'mystery' has no layout entry"),
    Case("remote-code family", damaged(edit_config(model_type="mystery", auto_map={"AutoModel": "m.Mystery"})),
         "defined by code shipped with the checkpoint (auto_map), which llm-prune never runs"),
    Case("config layers vs blocks", damaged(edit_config(num_hidden_layers=5)),
         "config.json says the model has 5 layers, the weights hold 3 blocks"),
    Case("truncated shard", damaged(truncate), "model-00002-of-00002.safetensors is truncated or corrupt"),
    Case("garbled header", damaged(garble_header), "truncated or corrupt"),
    Case("header shape vs bytes", damaged(edit_header(lambda h: h[first_target(h)].update(shape=[8, 8]))),
         "does not fill its"),
    Case("header unknown dtype", damaged(edit_header(lambda h: h[first_target(h)].update(dtype="Q8"))),
         "has no known dtype"),
    Case("header overlapping spans", damaged(edit_header(lambda h: h[first_target(h)].update(
        data_offsets=[h[first_target(h)]["data_offsets"][0] + 2, h[first_target(h)]["data_offsets"][1] + 2]))),
         "truncated or corrupt"),
    Case("index names a missing file", damaged(lambda src: shard(src).unlink()),
         "names model-00002-of-00002.safetensors, which is missing"),
    Case("index names a missing tensor", damaged(edit_index(lambda m: m.update(
        {"model.layers.9.mlp.up_proj.weight": "model-00001-of-00002.safetensors"}))),
         "does not contain model.layers.9.mlp.up_proj.weight"),
    Case("index path upwards", damaged(edit_index(lambda m: m.update({k: "../x.safetensors" for k in list(m)[:1]}))),
         "'../x.safetensors', which is not a file name inside"),
    Case("index absolute path", damaged(edit_index(lambda m: m.update({k: "/etc/passwd" for k in list(m)[:1]}))),
         "'/etc/passwd', which is not a file name inside"),
    Case("shard links outside", damaged(link_out), "links outside the checkpoint directory"),
    Case("index not JSON", damaged(lambda src: (src / "model.safetensors.index.json").write_text("[")),
         "is not a valid checkpoint index"),
    Case("nan weight", damaged(set_weight(float("nan"))), "has inf or nan values"),
    Case("inf weight", damaged(set_weight(float("inf"))), "has inf or nan values"),
    Case("output is the source", lambda tmp, src: [src, "--sparsity", "0.5", "--out", src, "--overwrite"],
         "is inside the checkpoint it is made from"),
    Case("output inside the source", lambda tmp, src: [src, "--sparsity", "0.5", "--out", src / "pruned"],
         "is inside the checkpoint it is made from"),
    Case("output around the source", lambda tmp, src: [src, "--sparsity", "0.5", "--out", tmp, "--overwrite"],
         "would contain the checkpoint it is made from"),
    Case("sweep levels reversed", lambda tmp, src: ["sweep", src, "--sparsities", "0.7:0.1:0.1", "--out", tmp / "o"],
         "--sparsities 0.7:0.1:0.1"),
    Case("sweep level out of range", lambda tmp, src: ["sweep", src, "--sparsities", "0.5,1.5", "--out", tmp / "o"],
         "--sparsities 0.5,1.5"),
    Case("sweep lth without finetune", lambda tmp, src: ["sweep", src, "--method", "lth", "--out", tmp / "o"],
         "lottery tickets are found by fine-tuning"),
    Case("masks compare one input", lambda tmp, src: ["masks", "compare", src, "--out", tmp / "o"],
         "at least two"),
    Case("trace one checkpoint", lambda tmp, src: ["trace", src, "--out", tmp / "o"],
         "a trace needs at least two checkpoints"),
    Case("inspect a calibrated method", lambda tmp, src: ["inspect", src, "--method", "sparsegpt", "--sparsity", "0.5",
                                                          "--out", tmp / "o"], "prune with it, then run"),
    Case("finetune a causal LM", lambda tmp, src: ["finetune", src, "--out", tmp / "o"],
         "fine-tuning takes BERT- and ViT-family encoders"),
    Case("verify a plain checkpoint", lambda tmp, src: ["verify", src], "has no sparsity.json"),
    Case("report of nothing", lambda tmp, src: ["report", src], "holds no llm-prune results"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_catalogue(case, capsys, tmp_path):
    src = save_tiny(tmp_path / "src", tiny_llama_config())
    argv = [str(a) for a in case.argv(tmp_path, src)]
    before = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    capsys.readouterr()  # what the fixture printed
    code = main([*argv, "--quiet"] if argv[0] not in ("verify", "report") else argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert ": error: " in err and err.count("\n") == 0, err
    assert case.match in err, err
    after = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    assert after <= before, f"left behind: {sorted(map(str, after - before))}"


def test_the_catalogue_is_complete():
    assert len(CASES) >= 35 and len({c.name for c in CASES}) == len(CASES)


# -- beyond one row -------------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    capsys.readouterr()
    code = main([*map(str, argv), "--quiet"])
    return code, capsys.readouterr().err.strip()


def test_pattern_impossible_for_shape_until_excluded(capsys, tmp_path):
    src = save_tiny(tmp_path / "odd", tiny_llama_config(intermediate_size=66))
    code, err = run_cli(capsys, src, "--pattern", "2:4", "--out", tmp_path / "o")
    assert code == 2 and "down_proj.weight has input dimension 66" in err and not (tmp_path / "o").exists()
    assert main([str(src), "--pattern", "2:4", "--exclude", "mlp.down_proj.weight", "--out",
                 str(tmp_path / "o"), "--quiet"]) == 0


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
    assert code == 2 and "--allow-pickle" in err and not (tmp_path / "o").exists()
    assert main([str(src), "--sparsity", "0.5", "--out", str(tmp_path / "o"), "--allow-pickle", "--quiet"]) == 0
    assert (tmp_path / "o" / "model.safetensors.index.json").is_file()  # output is safetensors


def test_not_enough_space_up_front(capsys, tiny_llama, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--out", tmp_path / "o")
    assert code == 2 and "not enough disk space" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]


def test_disk_full_while_writing(capsys, tiny_llama, tmp_path, monkeypatch):
    real, calls = writer_module._allocate, []

    def fill_up(fd, size):  # the second shard finds the disk full
        calls.append(size)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, size)

    monkeypatch.setattr(writer_module, "_allocate", fill_up)
    code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--out", tmp_path / "o")
    assert code == 2 and "no space left on the device" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories anyway")
def test_read_only_output_location(capsys, tiny_llama, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--out", locked / "o")
        assert code == 2 and "cannot create" in err and "read-only" in err
    finally:
        locked.chmod(0o700)


def test_missing_optional_packages_name_their_extra(capsys, tiny_llama, tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))  # no cached windows

    from .helpers import add_tokenizer

    add_tokenizer(tiny_llama)  # calibration needs one; built before datasets goes missing
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("lm_eval", "datasets", "pyarrow")
                        else real(name, *a))
    code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--eval", "ppl", "--out", tmp_path / "o")
    assert code == 2 and err.endswith("evaluation needs lm-eval: pip install 'llm-prune[eval]'")
    code, err = run_cli(capsys, tiny_llama, "--sparsity", "0.5", "--method", "wanda", "--out", tmp_path / "o")
    assert code == 2 and "the embedded calibration text needs pyarrow: pip install 'llm-prune[eval]'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]


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
