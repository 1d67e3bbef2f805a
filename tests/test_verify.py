"""llm-prune verify: a clean export passes, and each kind of damage is one named problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_prune import PruneConfig, Sparsity, prune_checkpoint
from llm_prune.cli import main


def export(src, out, fmt="dense", pattern=None, sparsity=0.5):
    cfg = PruneConfig(sparsity=Sparsity.parse(None if pattern else sparsity, pattern))
    prune_checkpoint(src, cfg, out, fmt=fmt, progress=False)
    return out


def verify(capsys, path, *extra) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["verify", str(path), "--quiet", *map(str, extra)])
    return code, capsys.readouterr().out


def target_shard(path):
    report = json.loads((path / "sparsity.json").read_text())
    name = sorted(report["achieved"]["tensors"])[0]
    index = json.loads(next(path.glob("*.index.json")).read_text())
    return name, path / index["weight_map"].get(name, index["weight_map"].get(name + ".values", ""))


@pytest.mark.parametrize("fmt,pattern", [("dense", None), ("bitmask", None), ("packed24", "2:4")])
def test_a_clean_export_verifies(tiny_llama, tmp_path, capsys, fmt, pattern):
    out = export(tiny_llama, tmp_path / "out", fmt, pattern)
    code, text = verify(capsys, out)
    assert code == 0 and text.rstrip().endswith("verified") and "PROBLEM" not in text
    assert "source" in text and "source files hashed" in text


def test_a_flipped_byte_is_found(tiny_llama, tmp_path, capsys):
    out = export(tiny_llama, tmp_path / "out")
    shard = sorted(out.glob("model-*.safetensors"))[-1]  # the embeddings / head: no target there
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    code, text = verify(capsys, out)
    assert code == 1 and f"PROBLEM  {shard.name} does not hash as recorded" in text


def test_digests_of_older_manifests_and_unknown_algorithms(tiny_llama, tmp_path, capsys):
    # Manifests written before BLAKE3 hold bare sha256 digests: they verify as they did. A digest
    # whose algorithm llm-prune does not know is one problem, not a crash.
    import hashlib

    out = export(tiny_llama, tmp_path / "out")
    manifest = out / "sparsity.json"
    report = json.loads(manifest.read_text())
    files = report["output"]["files"]
    assert all(d.startswith("blake3:") for d in files.values())
    sources = report["source"]["files"]
    for section, root in ((files, out), (sources, tiny_llama)):
        for name in section:
            section[name] = hashlib.sha256((root / name).read_bytes()).hexdigest()
    manifest.write_text(json.dumps(report))
    code, text = verify(capsys, out)
    assert code == 0 and "PROBLEM" not in text and "source files hashed" in text
    name = sorted(files)[0]
    files[name] = "md5:" + "0" * 32
    manifest.write_text(json.dumps(report))
    code, text = verify(capsys, out)
    assert code == 1 and text.count("PROBLEM") == 1
    assert f"PROBLEM  {name}: unknown digest algorithm 'md5' in sparsity.json" in text


def test_a_changed_sparsity_is_found(tiny_llama, tmp_path, capsys):
    out = export(tiny_llama, tmp_path / "out")
    name, shard = target_shard(out)
    tensors = load_file(shard)
    w = tensors[name]
    w.view(-1)[(w.view(-1) == 0).nonzero()[0]] = 1.0  # one pruned weight back
    save_file(tensors, shard, metadata={"format": "pt"})
    code, text = verify(capsys, out)
    assert code == 1 and f"{name} has sparsity" in text and "does not hash as recorded" in text


def test_a_broken_nm_group_is_found(tiny_llama, tmp_path, capsys):
    out = export(tiny_llama, tmp_path / "out", pattern="2:4")
    name, shard = target_shard(out)
    tensors = load_file(shard)
    tensors[name][0, :4] = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=tensors[name].dtype)
    save_file(tensors, shard, metadata={"format": "pt"})
    code, text = verify(capsys, out)
    assert code == 1 and f"{name} breaks the 2:4 pattern" in text


def test_a_missing_shard_is_found(tiny_llama, tmp_path, capsys):
    out = export(tiny_llama, tmp_path / "out")
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    code, text = verify(capsys, out)
    assert code == 1 and f"{shard.name} is missing (the manifest lists it)" in text
    assert "which is missing from" in text  # the index names it too


def test_an_edited_sparsity_json_is_found(tiny_llama, tmp_path, capsys):
    out = export(tiny_llama, tmp_path / "out")
    report = json.loads((out / "sparsity.json").read_text())
    name = sorted(report["achieved"]["tensors"])[1]
    report["achieved"]["tensors"][name] = 0.25
    (out / "sparsity.json").write_text(json.dumps(report))
    code, text = verify(capsys, out)
    assert code == 1 and f"{name} has sparsity 0.500000, sparsity.json says 0.250000" in text


def test_a_damaged_encoding_is_found(tiny_llama, tmp_path, capsys):
    out = export(tiny_llama, tmp_path / "out", "bitmask")
    report = json.loads((out / "sparsity.json").read_text())
    name = sorted(report["achieved"]["tensors"])[0]
    index = json.loads((out / "sparse.safetensors.index.json").read_text())
    shard = out / index["weight_map"][name + ".mask"]
    tensors = load_file(shard)
    with __import__("safetensors").safe_open(shard, "pt") as f:
        meta = f.metadata()
    tensors[name + ".mask"][0, 0] ^= 0x01  # one weight's bit flipped: values and mask disagree
    save_file(tensors, shard, metadata=meta)
    code, text = verify(capsys, out)
    assert code == 1 and "does not hash as recorded" in text and f"{name} cannot be decoded" in text


def test_a_changed_source_is_found(tiny_llama, tmp_path, capsys):
    src = shutil.copytree(tiny_llama, tmp_path / "src")
    out = export(src, tmp_path / "out")
    shard = sorted(src.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    code, text = verify(capsys, out)
    assert code == 1 and f"the source's {shard.name} does not hash as recorded" in text
    assert verify(capsys, out, "--source", tiny_llama)[0] == 0  # an intact copy elsewhere


def test_json_and_bad_input(tiny_llama, tmp_path, capsys):
    out = export(tiny_llama, tmp_path / "out")
    capsys.readouterr()
    assert main(["verify", str(out), "--json", "--quiet"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] and set(payload["checks"]) == {"files", "index", "tensors", "model", "source"}
    assert main(["verify", str(tiny_llama)]) == 2
    assert "has no sparsity.json" in capsys.readouterr().err
