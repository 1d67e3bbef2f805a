"""Mask similarity from counts written out by hand, and the bit-packed mask file."""

import hashlib
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_prune.study.similarity import (META_KEY, MaskCounts, aggregate, block_of, compare, cosine, iou,
                                        load_masks, pack_bits, save_masks, total, unpack_bits)

T, F = True, False


def mask(*bits):
    return torch.tensor(bits, dtype=torch.bool)


def test_identical_masks_are_exactly_one():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(97, 131, generator=g) > 0.4
    assert cosine(a, a.clone()) == 1.0 and iou(a, a.clone()) == 1.0


def test_complementary_masks_are_zero():
    a = mask(T, F, T, T, F)
    assert cosine(a, ~a) == 0.0 and iou(a, ~a) == 0.0


def test_a_case_between_by_hand():
    a = mask(T, T, T, F, F, T)
    b = mask(T, F, T, T, F, F)
    c = MaskCounts.of(a, b)
    assert c == MaskCounts(n=6, a=4, b=3, both=2, either=5)
    assert c.cosine == pytest.approx(2 / math.sqrt(4 * 3))  # 0.5774
    assert c.iou == pytest.approx(2 / 5)


def test_empty_masks_by_definition():
    none, some = mask(F, F, F), mask(F, T, F)
    assert cosine(none, none) == 1.0 and iou(none, none) == 1.0  # both keep nothing: they agree
    assert cosine(none, some) == 0.0 and iou(none, some) == 0.0
    empty = torch.zeros(0, dtype=torch.bool)
    assert cosine(empty, empty) == 1.0


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\) vs \(3, 2\)"):
        cosine(torch.ones(2, 3, dtype=torch.bool), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        iou(torch.ones(3), torch.ones(3))


def test_aggregated_counts_equal_counts_of_concatenated_masks():
    g = torch.Generator().manual_seed(1)
    names = ["model.layers.0.q.weight", "model.layers.0.mlp.weight", "model.layers.1.q.weight"]
    shapes = [(4, 7), (3, 5), (6, 2)]
    a = {n: torch.rand(s, generator=g) > 0.3 for n, s in zip(names, shapes)}
    b = {n: torch.rand(s, generator=g) > 0.6 for n, s in zip(names, shapes)}
    counts = compare(a, b)
    flat = lambda d, keys: torch.cat([d[k].flatten() for k in keys])  # noqa: E731
    assert total(counts) == MaskCounts.of(flat(a, names), flat(b, names))
    assert total(counts).cosine == cosine(flat(a, names), flat(b, names))
    blocks = aggregate(counts)
    assert list(blocks) == ["model.layers.0", "model.layers.1"]
    assert blocks["model.layers.0"] == MaskCounts.of(flat(a, names[:2]), flat(b, names[:2]))


def test_block_of_and_compare_name_check():
    assert block_of("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert block_of("lm_head.weight") == "other"
    with pytest.raises(ValueError, match="different tensors"):
        compare({"x": mask(T)}, {"y": mask(T)})


def test_pack_layout_is_lsb_first():
    # elements 0..7 → bits 0..7 of byte 0: T F T T F T T T = 1 + 4 + 8 + 32 + 64 + 128 = 237;
    # elements 8..10 → bits 0..2 of byte 1: F T T = 2 + 4 = 6, bits 3..7 unused and zero
    m = mask(T, F, T, T, F, T, T, T, F, T, T)
    assert pack_bits(m).tolist() == [237, 6]
    assert torch.equal(unpack_bits(pack_bits(m), (11,)), m)


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (3, 5), (0, 4), (13, 1), ()])
def test_file_round_trip(tmp_path, shape):
    g = torch.Generator().manual_seed(2)
    masks = {"w": torch.rand(shape, generator=g) > 0.5, "all": torch.ones(shape, dtype=torch.bool)}
    save_masks(tmp_path / "m.safetensors", masks, {"method": "omp", "sparsity": 0.5})
    back, meta = load_masks(tmp_path / "m.safetensors")
    assert meta == {"method": "omp", "sparsity": 0.5}
    assert set(back) == set(masks)
    for name, m in masks.items():
        assert back[name].dtype == torch.bool and back[name].shape == m.shape and torch.equal(back[name], m)


def test_identical_input_gives_identical_bytes(tmp_path):
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(5, 9, generator=g) > 0.5, torch.rand(17, generator=g) > 0.5
    save_masks(tmp_path / "1", {"a": a, "b": b}, {"z": 1, "y": [2]})
    save_masks(tmp_path / "2", {"b": b.clone(), "a": a.clone()}, {"y": [2], "z": 1})  # other order
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "1") == digest(tmp_path / "2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # no temp file left behind


def test_header_is_one_sorted_json_entry(tmp_path):
    from safetensors import safe_open

    save_masks(tmp_path / "m", {"w": mask(T, F, T)}, {"b": 1, "a": 2})
    with safe_open(str(tmp_path / "m"), framework="pt") as f:
        meta = f.metadata()
    assert list(meta) == [META_KEY]
    header = json.loads(meta[META_KEY])
    assert header["shapes"] == {"w": [3]} and header["bit_order"] == "lsb-first"
    assert meta[META_KEY] == json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def test_corrupt_files_raise_one_line_value_errors(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "junk").write_bytes(b"not a safetensors file at all")
    save_file({"w": torch.zeros(1, dtype=torch.uint8)}, tmp_path / "foreign")
    header = lambda shapes: {META_KEY: json.dumps(  # noqa: E731
        {"bit_order": "lsb-first", "format": "llm-prune keep-masks", "metadata": {}, "shapes": shapes, "version": 1})}
    save_file({"w": torch.zeros(2, dtype=torch.uint8)}, tmp_path / "short", header({"w": [17]}))
    save_file({"w": torch.tensor([0b1000], dtype=torch.uint8)}, tmp_path / "padbits", header({"w": [3]}))
    save_file({"w": torch.zeros(1, dtype=torch.uint8)}, tmp_path / "missing", header({"w": [3], "v": [2]}))
    data = (tmp_path / "short").read_bytes()
    (tmp_path / "truncated").write_bytes(data[:-1])
    for name, message in [("junk", "not a readable"), ("foreign", "not an llm-prune mask file"),
                          ("short", "should be 3 uint8 bytes"), ("padbits", "past its last element"),
                          ("missing", "not in the file"), ("truncated", "not a readable")]:
        with pytest.raises(ValueError, match=message) as e:
            load_masks(tmp_path / name)
        assert "\n" not in str(e.value)


def test_save_rejects_non_bool_and_bad_metadata(tmp_path):
    with pytest.raises(ValueError, match="bool"):
        save_masks(tmp_path / "m", {"w": torch.ones(3)}, {})
    with pytest.raises(ValueError, match="plain JSON"):
        save_masks(tmp_path / "m", {"w": mask(T)}, {"x": object()})
    assert not (tmp_path / "m").exists()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.booleans(), max_size=40), min_size=1, max_size=4))
def test_round_trip_property(tmp_path_factory, rows):
    masks = {f"m{i}": torch.tensor(r, dtype=torch.bool) for i, r in enumerate(rows)}
    path = tmp_path_factory.mktemp("prop") / "m.safetensors"
    save_masks(path, masks, {"n": len(rows)})
    back, meta = load_masks(path)
    assert meta == {"n": len(rows)}
    assert all(torch.equal(back[k], v) for k, v in masks.items())
