"""Keep-masks checked by hand and against simple references (stable argsort, kthvalue)."""

import pytest
import torch

from llm_prune.config import Sparsity
from llm_prune.errors import UserError
from llm_prune.magnitude import (all_finite, find_threshold, is_nm, key_to_value, magnitude_key, magnitude_keep,
                                 nm_keep, prune_count, threshold_keep, unstructured_keep)

from .helpers import reference_keep

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_one_row_by_hand():
    w = torch.tensor([[0.5, -0.1, 0.3, -0.8, 0.05, 0.2, -0.4, 0.9]])
    keep = unstructured_keep(w, 0.5)
    assert keep.tolist() == [[True, False, False, True, False, False, True, True]]


def test_ties_prune_earliest_first():
    w = torch.tensor([[0.2, -0.2, 0.2, 0.2, 0.9, -0.9, 0.1, 0.2]])
    # 4 to prune: 0.1 first, then the first three of the five 0.2s (by index).
    keep = unstructured_keep(w, 0.5)
    assert keep.tolist() == [[False, False, False, True, True, True, False, True]]


def test_nm_by_hand():
    w = torch.tensor([[0.1, -0.5, 0.3, 0.2, 0.7, 0.7, -0.7, 0.0]])
    assert nm_keep(w, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]
    assert nm_keep(w, 1, 4).tolist() == [[False, True, False, False, True, False, False, False]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.4, 0.5, 0.73, 0.999])
def test_unstructured_matches_stable_argsort(dtype, ratio):
    torch.manual_seed(0)
    w = (torch.randn(37, 64) * 0.05).to(dtype)
    w[3, :10] = w[3, 10]  # a run of exact ties
    keep = unstructured_keep(w, ratio)
    k = prune_count(w.numel(), ratio)
    assert int((~keep).sum()) == k
    assert torch.equal(keep, reference_keep(w, k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_global_threshold_equals_kthvalue(dtype):
    torch.manual_seed(1)
    tensors = [(torch.randn(s) * 0.02).to(dtype) for s in [(16, 32), (8, 64), (48, 16)]]
    flat = torch.cat([t.abs().flatten().float() for t in tensors])
    for ratio in [0.3, 0.5, 0.9]:
        k = prune_count(flat.numel(), ratio)
        t = find_threshold(lambda: iter(tensors), k)
        assert key_to_value(t.key, dtype) == flat.kthvalue(k).values.item()
        # Applying it tensor by tensor, carrying ties, prunes exactly the stable-argsort set.
        ties, masks = t.ties, []
        for x in tensors:
            keep, used = threshold_keep(x, t.key, ties)
            ties -= used
            masks.append(keep.flatten())
        assert ties == 0
        assert torch.equal(torch.cat(masks), reference_keep(torch.cat([x.flatten() for x in tensors]), k))


def test_global_ties_across_tensors():
    a = torch.tensor([0.5, 0.25, 0.25])
    b = torch.tensor([0.25, 0.25, 1.0])
    t = find_threshold(lambda: [a, b], 3)  # three of the four 0.25s go, in visiting order
    keep_a, used = threshold_keep(a, t.key, t.ties)
    keep_b, _ = threshold_keep(b, t.key, t.ties - used)
    assert keep_a.tolist() == [True, False, False]
    assert keep_b.tolist() == [False, True, True]


def test_masks_are_nested():
    torch.manual_seed(2)
    w = torch.randn(64, 64, dtype=torch.bfloat16)
    previous = torch.ones_like(w, dtype=torch.bool)
    for ratio in [0.1, 0.3, 0.4, 0.5, 0.7, 0.9]:
        keep = unstructured_keep(w, ratio)
        assert not (keep & ~previous).any(), f"mask at {ratio} keeps a weight pruned at a lower sparsity"
        previous = keep


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8), (1, 2), (4, 16), (7, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nm_validity_and_reference(n, m, dtype):
    torch.manual_seed(3)
    w = torch.randn(12, 8 * m).to(dtype)
    w[0, :m] = 0.5  # a whole group of ties keeps its first n
    keep = nm_keep(w, n, m)
    assert is_nm(keep, n, m)
    assert int(keep.sum()) == 12 * 8 * n
    assert keep[0, :m].tolist() == [True] * n + [False] * (m - n)
    for row in range(12):  # per group: the n largest (earliest among ties) by a stable sort
        for g in range(8):
            grp = w[row, g * m:(g + 1) * m].float().abs()
            top = torch.argsort(-grp, stable=True)[:n]
            expect = torch.zeros(m, dtype=torch.bool)
            expect[top] = True
            assert torch.equal(keep[row, g * m:(g + 1) * m], expect)


def test_nm_transposed_conv1d_groups_along_dim0():
    torch.manual_seed(4)
    w = torch.randn(16, 6)  # Conv1D: [in, out]
    keep = magnitude_keep(w, Sparsity.parse(None, "2:4"), weight_in_first=True)
    assert is_nm(keep.t(), 2, 4)


def test_nm_rejects_indivisible():
    with pytest.raises(UserError, match="not a multiple of 4"):
        nm_keep(torch.randn(4, 6), 2, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_detected(dtype):
    w = torch.randn(4, 4).to(dtype)
    assert all_finite(w)
    for bad in [float("inf"), float("-inf"), float("nan")]:
        v = w.clone()
        v[2, 3] = bad
        assert not all_finite(v)


def test_keys_order_like_abs():
    x = torch.tensor([-3.0, -0.0, 0.0, 1e-30, -2.5, 2.5, 7.0])
    k = magnitude_key(x)
    assert torch.equal(torch.argsort(k, stable=True), torch.argsort(x.abs(), stable=True))


def test_sparsity_parsing():
    assert Sparsity.parse("0.4") == Sparsity(0.4)
    assert Sparsity.parse(None, "2:4") == Sparsity(0.5, 2, 4)
    assert Sparsity.parse("0.5", "2:4").n == 2
    for bad in ["1", "1.0", "-0.1", "nan", "abc"]:
        with pytest.raises(UserError, match="sparsity"):
            Sparsity.parse(bad)
    for bad in ["4:2", "2:0", "0:4", "2:2", "2-4", "a:b"]:
        with pytest.raises(UserError, match="pattern"):
            Sparsity.parse(None, bad)
    with pytest.raises(UserError, match="contradicts"):
        Sparsity.parse("0.4", "2:4")
