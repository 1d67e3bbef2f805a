"""Wanda scores |W|·||X||, compared within each output row; N:M within groups; ties deterministic."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_prune.config import Sparsity
from llm_prune.magnitude import is_nm
from llm_prune.methods import get_method
from llm_prune.methods.wanda import InputNorms, wanda_keep, wanda_scores


def test_norms_are_the_l2_norm_of_each_input_feature_over_all_tokens():
    x = torch.tensor([[[3.0, 0.0], [4.0, 1.0]], [[0.0, 2.0], [0.0, 2.0]]])  # 4 tokens, 2 features
    n = InputNorms(2)
    n.add(x[0])
    n.add(x[1])
    assert n.count == 4 and n.norms.tolist() == [5.0, 3.0]


def test_per_row_comparison_not_per_matrix():
    # Row 0 has all the large weights; a per-matrix threshold would empty row 1, per-row prunes 2 of each.
    W = torch.tensor([[10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0]])
    keep = wanda_keep(W, torch.ones(4), Sparsity(0.5))
    assert keep.tolist() == [[False, False, True, True], [False, False, True, True]]


def test_activation_norms_change_the_choice():
    W = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([1.0, 1.0, 4.0, 5.0])  # scores 4 3 8 5
    assert wanda_scores(W, norms).tolist() == [[4.0, 3.0, 8.0, 5.0]]
    assert wanda_keep(W, norms, Sparsity(0.5)).tolist() == [[False, False, True, True]]


def test_ties_prune_the_earlier_weight_first():
    W = torch.ones(1, 8)
    assert wanda_keep(W, torch.ones(8), Sparsity(0.5)).tolist() == [[False] * 4 + [True] * 4]
    # N:M keeps the earlier of tied weights (masks.nm_keep's rule)
    assert wanda_keep(W, torch.ones(8), Sparsity(0.5, 2, 4)).tolist() == [[True, True, False, False] * 2]


def test_nm_groups_along_the_input_dim_and_conv1d_layout():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 32, generator=g).to(torch.bfloat16)
    norms = torch.rand(32, generator=g)
    keep = wanda_keep(W, norms, Sparsity(0.5, 2, 4))
    assert is_nm(keep, 2, 4) and int(keep.sum()) == 16 * 16
    assert torch.equal(wanda_keep(W.t().contiguous(), norms, Sparsity(0.5, 2, 4), weight_in_first=True).t(), keep)
    unstructured = wanda_keep(W, norms, Sparsity(0.25))
    assert (unstructured.sum(1) == 24).all()  # each row keeps 32 - round(0.25·32)


def test_solve_zeroes_pruned_weights_and_keeps_the_rest_bit_for_bit():
    W = torch.tensor([[0.5, -2.0, 1.5, -0.25]], dtype=torch.bfloat16)
    n = InputNorms(4)
    n.add(torch.tensor([[1.0, 1.0, 1.0, 8.0]]))
    new, keep = get_method("wanda").solve(W, n, Sparsity(0.5), weight_in_first=False, calib=None)
    assert keep.tolist() == [[False, True, False, True]]  # scores 0.5 2 1.5 2
    assert new.dtype == torch.bfloat16 and new.tolist() == [[0.0, -2.0, 0.0, -0.25]]


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 40), levels=st.integers(1, 6), k=st.integers(0, 40),
       seed=st.integers(0, 2**31 - 1))
def test_selections_prune_what_a_stable_sort_prunes(rows, cols, levels, k, seed):
    # Few distinct values: rows full of ties, the case where selection and sort could part.
    from llm_prune.methods.wanda import smallest_per_row

    g = torch.Generator().manual_seed(seed)
    score = torch.randint(-levels, levels, (rows, cols), generator=g).to(torch.float32) * 0.25  # any sign
    score[torch.rand(rows, cols, generator=g) < 0.1] = -0.0  # -0.0 ties with 0.0, as in a sort
    k = min(k, cols)
    first_k = torch.sort(score, dim=1, stable=True).indices[:, :k]
    by_sort = torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, first_k, True)
    assert torch.equal(smallest_per_row(score, k), by_sort)
    if 0 < k < cols:  # the compiled kernel row_keep uses: the same mask
        from llm_prune.kernels.select import row_smallest_keep

        assert torch.equal(row_smallest_keep(score, k), ~by_sort)
