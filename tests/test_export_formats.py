"""Exports in each storage format hold exactly the dense export's weights, in fewer bytes."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from llm_prune import PruneConfig, Sparsity, prune_checkpoint
from llm_prune.cli import main
from llm_prune.kernels.formats import size_formula

from .helpers import read_decoded


@pytest.mark.parametrize("pattern,fmt", [("2:4", "packed24"), ("2:4", "bitmask"), (None, "bitmask")])
def test_formats_equal_dense_export(tiny_llama, tmp_path, pattern, fmt):
    cfg = PruneConfig(sparsity=Sparsity.parse(None if pattern else "0.6", pattern))
    dense_report = prune_checkpoint(tiny_llama, cfg, tmp_path / "dense", progress=False)
    report = prune_checkpoint(tiny_llama, cfg, tmp_path / fmt, fmt=fmt, progress=False)
    dense, packed = read_decoded(tmp_path / "dense"), read_decoded(tmp_path / fmt)
    assert dense.keys() == packed.keys()
    assert all(torch.equal(dense[n], packed[n]) for n in dense)
    assert report["format"] == fmt and set(report["formats"]) == set(dense_report["achieved"]["tensors"])
    assert report["achieved"] == dense_report["achieved"]
    # Every target's stored parts take exactly the bytes the format's formula says.
    stored = {}
    for shard in (tmp_path / fmt).glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            stored.update({k: f.get_slice(k) for k in f.keys()})
    for name, sparsity in report["achieved"]["tensors"].items():
        parts = [k for k in stored if k.startswith(name + ".")]
        nbytes = sum(torch.empty(stored[k].get_shape(), dtype=dense[name].dtype if k.endswith(".values")
                                 else torch.uint8 if not k.endswith("offsets") else torch.int64).nbytes for k in parts)
        assert nbytes == size_formula(tuple(dense[name].shape), dense[name].dtype, sparsity, fmt), name
    assert report["run"]["output_bytes"] < dense_report["run"]["output_bytes"]
    index = json.loads((tmp_path / fmt / "sparse.safetensors.index.json").read_text())
    assert any(n.endswith(".values") for n in index["weight_map"])
    assert not (tmp_path / fmt / "model.safetensors.index.json").exists()


def test_transformers_refuses_compressed_export_loudly(tiny_llama, tmp_path):
    cfg = PruneConfig(sparsity=Sparsity.parse(None, "2:4"))
    prune_checkpoint(tiny_llama, cfg, tmp_path / "p", fmt="packed24", progress=False)
    with pytest.raises(OSError, match="no file named model.safetensors"):  # no silently random-initialised weights
        AutoModelForCausalLM.from_pretrained(tmp_path / "p")


@pytest.mark.parametrize("args,match", [
    (["--sparsity", "0.5", "--format", "packed24"], "--format packed24 stores 2:4 weights"),
    (["--pattern", "4:8", "--format", "packed24"], "--format packed24 stores 2:4 weights"),
])
def test_format_refused(capsys, tiny_llama, tmp_path, args, match):
    capsys.readouterr()
    assert main([str(tiny_llama), *args, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert match in err and not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


@pytest.mark.parametrize("fmt", ["bitmask", "packed24"])
def test_llm_prune_load_reads_every_format_bit_identical(tiny_llama, tmp_path, fmt):
    import llm_prune

    cfg = PruneConfig(sparsity=Sparsity.parse(None, "2:4"))
    prune_checkpoint(tiny_llama, cfg, tmp_path / "dense", progress=False)
    prune_checkpoint(tiny_llama, cfg, tmp_path / fmt, fmt=fmt, progress=False)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    loaded = llm_prune.load(tmp_path / fmt, dtype=torch.float32, progress=False)
    ref_state = reference.state_dict()
    assert all(torch.equal(t, ref_state[n]) for n, t in loaded.state_dict().items())
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
