"""Sparse checkpoint formats: bit-exact round trips, golden bytes, sizes, safetensors files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llm_prune.errors import UserError
from llm_prune.kernels import formats as F
from llm_prune.magnitude import nm_keep, unstructured_keep

from .helpers import assert_bits_equal, bits, pruned_24

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def roundtrip(w: torch.Tensor, fmt: str) -> torch.Tensor:
    stored, meta = F.encode("w", w, fmt)
    return F.decode("w", stored, meta)


# -- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", F.FORMATS)
def test_random_24_roundtrip_bit_for_bit(dtype, fmt):
    w = pruned_24(48, 64, dtype)
    assert_bits_equal(roundtrip(w, fmt), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.4, 0.5, 0.93, 1.0])
def test_bitmask_unstructured_roundtrip(dtype, sparsity):
    w = torch.randn(37, 53, generator=torch.Generator().manual_seed(1)).to(dtype)  # odd shape: padding bits
    w = torch.where(unstructured_keep(w, sparsity), w, torch.zeros((), dtype=dtype))
    stored, meta = F.encode("w", w, "bitmask")
    assert stored["w.values"].numel() == int(torch.count_nonzero(w))
    assert_bits_equal(F.decode("w", stored, meta), w)


def adversarial_24(dtype):
    """Rows chosen to break a naive packer; every group keeps at most 2 (bitwise) non-zeros."""
    rows = [
        [1, 2, 0, 0, 0, 0, 3, 4, 5, 0, 6, 0],        # both kept at the edges of groups
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],        # all-zero row
        [0, 0, 0, 7, 0, 0, 8, 0, 0, 9, 0, 0],        # one kept per group, each position class
        [10, 0, 0, 0, -0.0, 0, 0, 0, 0, 0, 0, -0.0],  # -0.0 is a value, not a zero
        [1, 1, 0, 0, 1, 0, 1, 0, 0, 1, 0, 1],        # ties
        [float("inf"), float("nan"), 0, 0, -float("inf"), 0, 0, 1e-30, 0, 0, 0, 0],
    ]
    w = torch.tensor(rows, dtype=torch.float32).to(dtype)
    return w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["bitmask", "packed24"])
def test_adversarial_rows_roundtrip(dtype, fmt):
    w = adversarial_24(dtype)  # 12 columns: packed24 metadata has a half-filled last byte
    assert_bits_equal(roundtrip(w, fmt), w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmask_all_kept_rows_and_nan_payload(dtype):
    w = torch.randn(5, 9).to(dtype)
    w[1] = 0
    w[3] = 1.0  # all-kept row of ties
    bits(w)[4, 2] = 0x7FC00001 if dtype == torch.float32 else 0x7E01  # a NaN with payload bits
    assert_bits_equal(roundtrip(w, "bitmask"), w)


def test_nm_ties_keep_earlier_and_pack():
    # nm_keep keeps the earlier of equal magnitudes; the packer must store exactly what was kept.
    w = torch.tensor([[2.0, -2.0, 2.0, 2.0, 0.5, 0.5, 0.5, 0.5]], dtype=torch.float16)
    p = torch.where(nm_keep(w, 2, 4), w, torch.zeros((), dtype=w.dtype))
    assert p.tolist() == [[2.0, -2.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0]]
    stored, _ = F.encode("w", p, "packed24")
    assert stored["w.values"].tolist() == [[2.0, -2.0, 0.5, 0.5]]
    assert stored["w.meta"].tolist() == [[0x44]]  # (0,1) twice: nibble 0b0100


# -- golden bytes --------------------------------------------------------------------------

GOLDEN_W = [[0.0, 1.0, 0.0, -2.0, 0.5, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]]


def test_packed24_golden_bytes():
    w = torch.tensor(GOLDEN_W, dtype=torch.float16)
    stored, meta = F.encode("w", w, "packed24")
    # Row 0: group [0, 1, 0, -2] keeps positions (1, 3) -> nibble 0b11_01 = 0xD;
    #        group [0.5, 0, 0, 0] keeps (0, 2) (a zero stored explicitly) -> 0b10_00 = 0x8.
    #        byte = low nibble group 0, high nibble group 1 = 0x8D.
    # Row 1: all-zero group -> (2, 3) = 0xE (two explicit zeros); [0, 0, 1, 1] -> (2, 3) = 0xE.
    assert stored["w.meta"].numpy().tobytes() == bytes([0x8D, 0xEE])
    # fp16 little-endian: 1.0 = 0x3C00, -2.0 = 0xC000, 0.5 = 0x3800.
    assert stored["w.values"].numpy().tobytes() == bytes([
        0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x3C, 0x00, 0x3C])
    assert meta == {F.META_KEY: '{"w": {"dtype": "float16", "format": "packed24", "shape": [2, 8], "version": "1"}}'}


def test_bitmask_golden_bytes():
    w = torch.tensor(GOLDEN_W, dtype=torch.float16)
    stored, _ = F.encode("w", w, "bitmask")
    # Row 0 keeps columns 1, 3, 4 -> bits 1|3|4 (LSB first) = 0x1A; row 1 keeps 6, 7 -> 0xC0.
    assert stored["w.mask"].numpy().tobytes() == bytes([0x1A, 0xC0])
    # Values 1.0, -2.0, 0.5 | 1.0, 1.0 in row order.
    assert stored["w.values"].numpy().tobytes() == bytes([0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38, 0x00, 0x3C, 0x00, 0x3C])
    assert stored["w.row_offsets"].tolist() == [0, 3, 5]


# -- rejections ----------------------------------------------------------------------------

def test_packed24_rejects_three_nonzeros_with_location():
    w = torch.zeros(3, 8, dtype=torch.bfloat16)
    w[2, 4:7] = 1
    with pytest.raises(UserError, match=r"not 2:4 sparse: row 2, columns 4\.\.7"):
        F.encode("layer.w", w, "packed24")


def test_packed24_counts_negative_zero_as_value():
    w = torch.tensor([[1.0, 2.0, -0.0, 0.0]])  # three non-zero bit patterns: cannot be exact
    with pytest.raises(UserError, match="not 2:4 sparse"):
        F.encode("w", w, "packed24")


@pytest.mark.parametrize("shape,fmt,msg", [
    ((4, 6), "packed24", "not a multiple of 4"),
    ((8,), "bitmask", "takes 2-D weights"),
    ((2, 4, 4), "packed24", "takes 2-D weights"),
])
def test_ineligible_shapes_rejected(shape, fmt, msg):
    with pytest.raises(UserError, match=msg):
        F.encode("w", torch.zeros(shape), fmt)
    with pytest.raises(UserError, match=msg):
        F.size_formula(shape, torch.float32, 0.5, fmt)


def test_ineligible_dtype_and_unknown_format():
    with pytest.raises(UserError, match="fp32, fp16 or bf16"):
        F.encode("w", torch.zeros(4, 4, dtype=torch.int32), "bitmask")
    with pytest.raises(UserError, match="unknown format 'csr'"):
        F.encode("w", torch.zeros(4, 4), "csr")
    stored, meta = F.encode("ids", torch.arange(6), "dense")  # dense takes anything
    assert meta == {} and torch.equal(F.decode("ids", stored, meta), torch.arange(6))


def test_corrupt_parts_rejected():
    w = pruned_24(4, 8, torch.float16)
    stored, meta = F.encode("w", w, "packed24")
    bad = dict(stored, **{"w.meta": torch.full_like(stored["w.meta"], 0x33)})  # lo == hi
    with pytest.raises(UserError, match="not increasing"):
        F.decode("w", bad, meta)
    with pytest.raises(UserError, match="w.values is missing"):
        F.decode("w", {"w.meta": stored["w.meta"]}, meta)
    stored, meta = F.encode("w", w, "bitmask")
    with pytest.raises(UserError, match="disagree"):
        F.decode("w", dict(stored, **{"w.values": stored["w.values"][:-1]}), meta)
    with pytest.raises(UserError, match="is not valid JSON"):
        F.decode("w", stored, {F.META_KEY: "{not json"})
    with pytest.raises(UserError, match="not a valid llm-prune encoding"):
        F.decode("w", stored, {F.META_KEY: '{"w": {"format": "zip"}}'})


# -- sizes ---------------------------------------------------------------------------------

def stored_bytes(stored):
    return sum(t.numel() * t.element_size() for t in stored.values())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.4, 0.5])
def test_bitmask_size_matches_formula(dtype, sparsity):
    w = torch.randn(96, 200).to(dtype)  # no exact zeros in a randn draw of this size
    w = torch.where(unstructured_keep(w, sparsity), w, torch.zeros((), dtype=dtype))
    stored, _ = F.encode("w", w, "bitmask")
    assert stored_bytes(stored) == F.size_formula(w.shape, dtype, sparsity, "bitmask")


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed24_size_is_9_16_of_dense_fp16(dtype):
    w = pruned_24(64, 128, dtype)
    stored, _ = F.encode("w", w, "packed24")
    assert stored_bytes(stored) == F.size_formula(w.shape, dtype, 0.5, "packed24")
    if dtype != torch.float32:
        assert stored_bytes(stored) / (w.numel() * 2) == 0.5625


# -- safetensors files ---------------------------------------------------------------------

def test_shard_save_load_decode_identical(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {
        "layers.0.q.weight": pruned_24(32, 64, torch.bfloat16),
        "layers.0.k.weight": torch.where(unstructured_keep(w := torch.randn(16, 40, generator=g).bfloat16(), 0.4),
                                         w, torch.zeros((), dtype=torch.bfloat16)),
        "layers.0.norm.weight": torch.ones(64, dtype=torch.bfloat16),
    }
    formats = {"layers.0.q.weight": "packed24", "layers.0.k.weight": "bitmask"}
    stored, meta = F.encode_all(tensors, formats)
    assert sorted(stored) == sorted(F.stored_names("layers.0.q.weight", "packed24")
                                    + F.stored_names("layers.0.k.weight", "bitmask") + ["layers.0.norm.weight"])
    path = tmp_path / "shard.safetensors"
    save_file(stored, str(path), metadata={"format": "pt", **meta})
    with safe_open(path, "pt") as f:
        file_meta = f.metadata()
        loaded = {k: f.get_tensor(k) for k in f.keys()}
    decoded = F.decode_all(loaded, file_meta)
    assert sorted(decoded) == sorted(tensors)
    for name, t in tensors.items():
        assert_bits_equal(decoded[name], t)
    # The file is the stored data plus a header (JSON, a few hundred bytes here).
    header = path.stat().st_size - stored_bytes(stored)
    assert 0 < header < 2048


def test_real_smollm2_block_roundtrips(smollm2_dir):
    """Real weights of SmolLM2 block 0 (bf16), pruned 2:4 and 0.5, round-trip in every format."""
    idx = json.loads((smollm2_dir / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.down_proj.weight"
    with safe_open(smollm2_dir / idx[name], "pt") as f:
        w = f.get_tensor(name)
    zero = torch.zeros((), dtype=w.dtype)
    for fmt, keep in [("packed24", nm_keep(w, 2, 4)), ("bitmask", unstructured_keep(w, 0.5))]:
        p = torch.where(keep, w, zero)
        stored, meta = F.encode(name, p, fmt)
        assert_bits_equal(F.decode(name, stored, meta), p)
        assert stored_bytes(stored) == F.size_formula(p.shape, p.dtype, 0.5, fmt)


# -- implementation cross-checks -------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_and_torch_packed24_decoders_agree(dtype):
    w = adversarial_24(dtype)
    stored, meta = F.encode("w", w, "packed24")
    args = ("w", stored["w.values"], stored["w.meta"], tuple(w.shape), dtype)
    assert_bits_equal(F._decode_packed24(*args), F._decode_packed24_torch(*args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["bitmask", "packed24"])
def test_odd_shapes_and_the_first_bad_group_reported(dtype, fmt):
    # 20 columns: an odd number of groups (the last metadata byte half empty) and a mask row that
    # ends mid-byte; rows are packed in parallel, so the error must still name the first bad group.
    w = pruned_24(11, 20, dtype, seed=5)
    w[4] = 0
    assert_bits_equal(roundtrip(w, fmt), w)
    if fmt == "packed24":
        assert int(F.encode("w", w, fmt)[0]["w.meta"][:, -1].max()) < 16  # no nibble past the last group
        w[9, 12:15] = 1
        w[7, 16:19] = 1
        w[7, 8:11] = 1
        with pytest.raises(UserError, match=r"row 7, columns 8\.\.11"):
            F.encode("w", w, fmt)
