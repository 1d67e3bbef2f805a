"""``llm-prune masks compare``: mask sources, pairwise similarity checked by hand, the streaming mask writer."""

import hashlib
import json
import math
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_prune.cli import main
from llm_prune.config import PruneConfig, Sparsity
from llm_prune.pipeline import prune_checkpoint
from llm_prune.study.compare import compare_sources, open_masks
from llm_prune.study.similarity import MaskWriter, load_masks, save_masks
from tests.conftest import save_tiny, tiny_llama_config


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny Llama (3 blocks, 7 targets each) and OMP exports of it."""
    root = tmp_path_factory.mktemp("ckpts")
    src = save_tiny(root / "src", tiny_llama_config())
    runs = {"a": (0.5, "layer", "dense"), "a_again": (0.5, "layer", "dense"), "a_bitmask": (0.5, "layer", "bitmask"),
            "g30": (0.3, "global", "dense")}
    for name, (s, scope, fmt) in runs.items():
        prune_checkpoint(src, PruneConfig(method="omp", sparsity=Sparsity(s), scope=scope), root / name, fmt=fmt,
                         progress=False)
    return {"src": src, **{name: root / name for name in runs}}


def dense_tensors(path):
    """Every tensor of a dense-format checkpoint, read with safetensors alone."""
    found = {}
    for f in sorted(path.glob("*.safetensors")):
        found.update(load_file(f))
    return found


def targets(path):
    return list(json.loads((path / "sparsity.json").read_text())["achieved"]["tensors"])


def only_pair(payload):
    assert len(payload["pairs"]) == 1
    return payload["pairs"][0]


# -- similarity of checkpoints ----------------------------------------------------------------------
def test_identical_exports_are_exactly_one(ckpts):
    pair = only_pair(compare_sources([ckpts["a"], ckpts["a_again"]], progress=False))
    assert pair["overall"]["cosine"] == 1.0 and pair["overall"]["iou"] == 1.0
    assert list(pair["blocks"]) == ["0", "1", "2"]
    assert all(b["cosine"] == 1.0 and b["iou"] == 1.0 for b in pair["blocks"].values())
    assert len(pair["tensors"]) == 21


def test_formats_are_decoded_dense_equals_bitmask(ckpts):
    payload = compare_sources([ckpts["a"], ckpts["a_bitmask"]], labels=["dense", "bitmask"], progress=False)
    pair = only_pair(payload)
    assert (pair["a"], pair["b"]) == ("dense", "bitmask")
    assert pair["overall"]["cosine"] == 1.0 and all(b["cosine"] == 1.0 for b in pair["blocks"].values())
    assert [i["format"] for i in payload["inputs"]] == ["dense", "bitmask"]
    assert [i["achieved"] for i in payload["inputs"]] == [0.5, 0.5]


def test_layer_half_vs_global_030_equals_hand_computation(ckpts):
    a, b = dense_tensors(ckpts["a"]), dense_tensors(ckpts["g30"])
    names = targets(ckpts["a"])

    def by_hand(selected):  # |a|, |b|, |a∧b| summed over the tensors, then the two formulas
        na = sum(int((a[n] != 0).sum()) for n in selected)
        nb = sum(int((b[n] != 0).sum()) for n in selected)
        both = sum(int(((a[n] != 0) & (b[n] != 0)).sum()) for n in selected)
        return both / math.sqrt(na * nb), both / (na + nb - both), (na, nb)

    pair = only_pair(compare_sources([ckpts["a"], ckpts["g30"]], progress=False))
    cosine, iou, (na, nb) = by_hand(names)
    n = sum(a[x].numel() for x in names)
    assert (na, nb) == (n // 2, round(0.7 * n))  # 0.5 kept per layer; 0.7 kept over all targets
    assert 0 < pair["overall"]["cosine"] < 1
    assert pair["overall"]["cosine"] == cosine and pair["overall"]["iou"] == iou
    block1 = [x for x in names if x.startswith("model.layers.1.")]
    assert pair["blocks"]["1"]["cosine"] == by_hand(block1)[0]
    q = "model.layers.2.self_attn.q_proj.weight"
    assert pair["tensors"][q]["cosine"] == by_hand([q])[0]


def test_unpruned_source_vs_half_is_sqrt_half(ckpts):
    # No sparsity.json: the default targets. Every weight of the source is kept, half of each
    # layer in the export: cosine = (n/2) / sqrt(n · n/2) = sqrt(1/2), IoU = (n/2) / n = 1/2.
    payload = compare_sources([ckpts["src"], ckpts["a"]], progress=False)
    pair = only_pair(payload)
    o = pair["overall"]
    assert o["a"] == o["n"] == o["either"] and o["b"] == o["both"] == o["n"] // 2
    assert o["cosine"] == pytest.approx(math.sqrt(0.5), abs=1e-15) and o["iou"] == 0.5
    assert payload["inputs"][0]["method"] is None and payload["inputs"][1]["method"] == "omp"


def test_negative_zero_counts_as_kept(ckpts, tmp_path):
    # One pruned element rewritten as -0.0 (bit pattern 0x8000): kept, as the sparse formats keep it.
    t = dense_tensors(ckpts["a"])
    name = "model.layers.0.mlp.down_proj.weight"
    flat = t[name].view(-1)
    at = int((flat == 0).nonzero()[0])
    flat[at] = -0.0
    (tmp_path / "neg").mkdir()
    save_file(t, tmp_path / "neg" / "model.safetensors")
    for side in ("config.json", "sparsity.json"):
        shutil.copy(ckpts["a"] / side, tmp_path / "neg" / side)
    pair = only_pair(compare_sources([ckpts["a"], tmp_path / "neg"], progress=False))
    c = pair["tensors"][name]
    assert (c["b"], c["both"]) == (c["a"] + 1, c["a"])
    assert sum(x["cosine"] < 1 for x in pair["tensors"].values()) == 1


def test_three_inputs_give_three_pairs(ckpts):
    payload = compare_sources([ckpts["a"], ckpts["a_bitmask"], ckpts["g30"]], labels=["x", "y", "z"], progress=False)
    assert [(p["a"], p["b"]) for p in payload["pairs"]] == [("x", "y"), ("x", "z"), ("y", "z")]
    xy, xz, yz = payload["pairs"]
    assert xy["overall"]["cosine"] == 1.0 and xz["overall"] == yz["overall"]


# -- mask files ------------------------------------------------------------------------------------
def write_masks_of(ckpt, path, *, drop=None, reshape=None):
    """The keep-masks of a dense export, through MaskWriter (added in reverse order)."""
    t = dense_tensors(ckpt)
    masks = {n: t[n] != 0 for n in targets(ckpt) if n != drop}
    if reshape:
        masks[reshape] = masks[reshape].reshape(-1, 2)
    with MaskWriter(path, {n: m.shape for n, m in masks.items()}, {"method": "omp", "sparsity": 0.5}) as w:
        for n in reversed(list(masks)):
            w.add(n, masks[n])
    return path


def test_mask_file_equals_its_checkpoint(ckpts, tmp_path):
    alone = tmp_path / "run"  # a directory holding masks.safetensors and no model: the mask file
    write_masks_of(ckpts["a"], alone / "masks.safetensors")
    for given in (alone / "masks.safetensors", alone):
        payload = compare_sources([given, ckpts["a_bitmask"]], progress=False)
        assert only_pair(payload)["overall"]["cosine"] == 1.0
        assert payload["inputs"][0]["kind"] == "mask file" and payload["inputs"][0]["label"] == "run"
        assert payload["inputs"][0]["method"] == "omp" and payload["inputs"][0]["sparsity"] == 0.5
    beside = tmp_path / "export"  # a checkpoint with masks.safetensors beside it is read as a checkpoint
    shutil.copytree(ckpts["g30"], beside)
    shutil.copy(alone / "masks.safetensors", beside)
    assert open_masks(beside).kind == "checkpoint"
    assert only_pair(compare_sources([beside, alone], progress=False))["overall"]["cosine"] < 1


def test_mask_writer_bytes_equal_save_masks(tmp_path):
    g = torch.Generator().manual_seed(5)
    shapes = {"w": (5, 9), "é\"name": (16,), "empty": (0, 4), "scalar": (), "odd": (13, 1), "model.layers.0.x": (3, 8)}
    masks = {n: torch.rand(s, generator=g) > 0.5 for n, s in shapes.items()}
    meta = {"method": "omp", "ü": "tab\tnew\nline\x01\x7f", "sparsity": 0.5, "list": [1, None]}
    save_masks(tmp_path / "saved.safetensors", masks, meta)
    order = list(masks)
    random.Random(0).shuffle(order)
    with MaskWriter(tmp_path / "streamed.safetensors", shapes, meta) as w:
        for n in order:
            w.add(n, masks[n])
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "saved.safetensors") == digest(tmp_path / "streamed.safetensors")
    back, got = load_masks(tmp_path / "streamed.safetensors")
    assert got == meta and all(torch.equal(back[n], masks[n]) for n in masks)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.safetensors", "streamed.safetensors"]


def test_mask_writer_refuses_and_leaves_nothing(tmp_path):
    path = tmp_path / "m.safetensors"
    w = MaskWriter(path, {"a": (2, 3), "b": (4,)}, {})
    for name, keep, message in [("c", torch.ones(4, dtype=torch.bool), "not one of the 2 masks"),
                                ("b", torch.ones(4), "bool"), ("b", torch.ones(2, 2, dtype=torch.bool), r"\(2, 2\)")]:
        with pytest.raises(ValueError, match=message):
            w.add(name, keep)
    w.add("b", torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="already added"):
        w.add("b", torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="1 mask.s. never added, e.g. 'a'"):
        w.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with MaskWriter(path, {"a": (1,)}, {}) as w:
            w.add("a", torch.ones(1, dtype=torch.bool))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


# -- the command -----------------------------------------------------------------------------------
def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_command_writes_json_table_and_plot(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["masks", "compare", str(ckpts["a"]), str(ckpts["g30"]), "--quiet", "--report"], capsys)
    assert code == 0, err
    result = tmp_path / "masks-a-vs-g30"
    payload = json.loads((result / "masks.json").read_text())
    assert payload["rule"].startswith("cosine of 0/1 masks = |a∧b|/sqrt(|a|·|b|)")
    assert f"a vs g30  {payload['pairs'][0]['overall']['cosine']:.4f}" in out
    assert "Mask similarity" in (result / "report.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib is not installed: no masks.png to check")
    assert payload["pictures"] == ["masks.png"] and (result / "masks.png").stat().st_size > 0


def test_command_json_and_labels(ckpts, tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    code, out, _ = run_cli(["masks", "compare", str(ckpts["a"]), str(ckpts["a_again"]), str(ckpts["g30"]),
                            "--labels", "p,q,r", "--json", "--quiet", "--out", str(out_dir)], capsys)
    assert code == 0
    assert [(p["a"], p["b"]) for p in json.loads(out)["pairs"]] == [("p", "q"), ("p", "r"), ("q", "r")]
    assert (out_dir / "masks.json").is_file()


def test_bad_input_is_one_line_exit_2_nothing_written(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_masks_of(ckpts["a"], tmp_path / "lacking.safetensors", drop="model.layers.1.mlp.up_proj.weight")
    write_masks_of(ckpts["a"], tmp_path / "reshaped.safetensors", reshape="model.layers.0.self_attn.k_proj.weight")
    a = str(ckpts["a"])
    cases = [(["masks"], "llm-prune masks compare A B"),
             (["masks", a, a], "unknown action"),
             (["masks", "compare", a], "at least two inputs, got 1"),
             (["masks", "compare", a, "no/such/dir"], "no checkpoint or mask file at no/such/dir"),
             (["masks", "compare", a, "lacking.safetensors"],
              "model.layers.1.mlp.up_proj.weight is in a but not in lacking"),
             (["masks", "compare", "lacking.safetensors", a], "is in a but not in lacking"),
             (["masks", "compare", a, "reshaped.safetensors"],
              r"model.layers.0.self_attn.k_proj.weight has shape (16, 32) in a but (256, 2) in reshaped"),
             (["masks", "compare", a, a, "--labels", "x"], "--labels gives 1 label(s) for 2 inputs")]
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, message in cases:
        code, _, err = run_cli(argv, capsys)
        assert code == 2, argv
        assert err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output directory, finished or partial
