"""RIA (relative importance x activations): a 2x4 layer worked by hand beside Wanda, the transposed
([in, out]) layout, N:M validity, rows and columns of zeros."""

from __future__ import annotations

import math

import pytest
import torch

from llm_prune.config import Sparsity
from llm_prune.magnitude import is_nm
from llm_prune.methods import get_method
from llm_prune.methods.ria import ria_keep, ria_scores
from llm_prune.methods.wanda import InputNorms, wanda_keep

HALF, TWO_FOUR = Sparsity(0.5), Sparsity(0.5, 2, 4)


def hand_layer():
    """Input norms ||x|| = 1, 2, 1, 1 (feature 1 fires twice as hard), so ||x||^0.5 = 1, √2, 1, 1.

        W = [1.5  1.0  2.2  1.2]   row sums 5.9, 4.7; column sums 2.0, 4.0, 2.4, 2.2
            [0.5  3.0  0.2  1.0]

    Row 0, RIA = (|w|/5.9 + |w|/column sum)·||x||^0.5:
        1.5/5.9 + 1.5/2.0 = 1.0042    (1/5.9 + 1/4)·√2 = 0.5932    2.2/5.9 + 2.2/2.4 = 1.2895    1.2/5.9 + 1.2/2.2 = 0.7488
        -> keeps {0, 2}; Wanda (|w|·||x|| = 1.5 2.0 2.2 1.2) keeps {1, 2}: w1 is large only
           because input 1 is, and column 1 also holds row 1's 3.0, which RIA counts against it.
    Row 1: 0.3564, (3/4.7 + 3/4)·√2 = 1.9634, 0.1259, 0.6673 -> keeps {1, 3}, as Wanda.
    """
    X = torch.tensor([[1.0, 0, 0, 1], [0, 2, 0, 0], [0, 0, 1, 0]])
    W = torch.tensor([[1.5, 1.0, 2.2, 1.2], [0.5, 3.0, 0.2, 1.0]])
    norms = InputNorms(4)
    norms.add(X)
    return W, norms.norms


def test_ria_by_hand_beside_wanda():
    W, norms = hand_layer()
    r2 = math.sqrt(2)
    expected = torch.tensor([[1.5 / 5.9 + 1.5 / 2.0, (1 / 5.9 + 1 / 4) * r2, 2.2 / 5.9 + 2.2 / 2.4, 1.2 / 5.9 + 1.2 / 2.2],
                             [0.5 / 4.7 + 0.5 / 2.0, (3 / 4.7 + 3 / 4) * r2, 0.2 / 4.7 + 0.2 / 2.4, 1 / 4.7 + 1 / 2.2]])
    torch.testing.assert_close(ria_scores(W, norms), expected, rtol=1e-6, atol=0)
    assert ria_keep(W, norms, HALF).tolist() == [[True, False, True, False], [False, True, False, True]]
    assert wanda_keep(W, norms, HALF).tolist() == [[False, True, True, False], [False, True, False, True]]
    assert ria_keep(W, norms, TWO_FOUR).tolist() == ria_keep(W, norms, HALF).tolist()  # one group of 4 per row


def test_solve_keeps_the_kept_weights_and_the_layout():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 16, generator=g, dtype=torch.bfloat16)
    norms = InputNorms(16)
    norms.add(torch.randn(40, 16, generator=g))
    method = get_method("ria")
    new, keep = method.solve(W, norms, Sparsity(0.75), weight_in_first=False, calib=None)
    assert new.dtype == W.dtype and torch.equal(new, W * keep)
    assert (keep.sum(1) == 4).all()  # 75% of each output row
    # a Conv1D-style weight stored [in, out]: the same choice, transposed
    new_t, keep_t = method.solve(W.t().contiguous(), norms, Sparsity(0.75), weight_in_first=True, calib=None)
    assert torch.equal(keep_t.t(), keep) and torch.equal(new_t.t(), new)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_groups_hold(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    W = torch.randn(8, 32, generator=g)
    keep = ria_keep(W, torch.rand(32, generator=g) + 0.1, Sparsity(1 - n / m, n, m))
    assert is_nm(keep, n, m) and (keep.reshape(8, -1, m).sum(-1) == n).all()


def test_rows_and_columns_of_zeros_give_finite_scores():
    W = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, -2.0, 0.5]])
    norms = torch.tensor([1.0, 0.0, 1.0, 1.0])  # input 1 never fires
    s = ria_scores(W, norms)
    assert torch.isfinite(s).all() and (s[0] == 0).all() and s[1, 1] == 0
    keep = ria_keep(W, norms, HALF)
    assert keep[1].tolist() == [False, False, True, True]
