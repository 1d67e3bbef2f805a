"""Properties that must hold for every input, checked on many generated ones (hypothesis).

Masks against the stable-sort reference, N:M groups, exact thresholds with ties across tensors,
the kernels against the torch reference, the sparse formats' round trips, and the parsing of
--sparsity / --pattern.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_prune.config import Sparsity
from llm_prune.errors import UserError
from llm_prune.kernels import formats as F
from llm_prune.kernels import magnitude as K
from llm_prune.kernels import nm as NM
from llm_prune.magnitude import deal_ties, find_threshold, magnitude_key, nm_keep, prune_count, threshold_keep, unstructured_keep

from .helpers import bits, masked, reference_keep

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
# Few distinct magnitudes, both signs and both zeros: ties everywhere, the hard case for exactness.
VALUES = st.sampled_from([0.0, -0.0, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0, 3.0, 1e-3])


@st.composite
def matrices(draw, cols_multiple=1, min_cols=1):
    rows = draw(st.integers(1, 6))
    cols = cols_multiple * draw(st.integers(max(1, min_cols // cols_multiple), 6))
    dtype = draw(DTYPES)
    values = draw(st.lists(VALUES, min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.float32).view(rows, cols).to(dtype)


@SETTINGS
@given(matrices(), st.floats(0, 0.999))
def test_unstructured_keep_is_the_stable_sort(w, ratio):
    keep = unstructured_keep(w, ratio)
    assert int((~keep).sum()) == prune_count(w.numel(), ratio)
    assert torch.equal(keep, reference_keep(w, prune_count(w.numel(), ratio)))



@SETTINGS
@given(w=matrices(), ratio=st.floats(0, 0.999))
def test_own_threshold_is_the_tables_threshold_of_one_tensor(w, ratio):
    """``own_threshold`` (numpy, one table) gives what ``table_threshold`` over that one table
    gives, and pruning at it is the stable-sort reference (16-bit keys only: fp32 tables hold bins)."""
    from llm_prune.magnitude import key_table, own_threshold, table_threshold

    if w.dtype == torch.float32:
        w = w.to(torch.bfloat16)
    table = key_table(w)
    t, _ = table_threshold([table], prune_count(w.numel(), ratio))
    assert own_threshold(table, ratio) == (t.key, t.ties)
    key, ties = own_threshold(table, ratio)
    assert torch.equal(threshold_keep(magnitude_key(w), key, ties)[0], reference_keep(w, prune_count(w.numel(), ratio)))

@SETTINGS
@given(matrices(cols_multiple=4), st.sampled_from([(1, 4), (2, 4), (3, 4)]))
def test_nm_keeps_n_of_every_m_the_largest_earliest_first(w, nm):
    n, m = nm
    keep = nm_keep(w, n, m)
    groups, kept = w.abs().float().view(-1, m), keep.view(-1, m)
    assert (kept.sum(-1) == n).all()
    order = torch.sort(-groups, dim=-1, stable=True).indices[:, :n]  # stable descending
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(-1, order, True))


@SETTINGS
@given(matrices(cols_multiple=4), st.sampled_from([(2, 4), (1, 4), (3, 4)]))
def test_nm_kernel_equals_the_reference(w, nm):
    got = w.clone()
    zeros = NM.prune_nm_(got, *nm)
    expect = masked(w, nm_keep(w, *nm))
    assert torch.equal(bits(got), bits(expect)) and zeros == int((magnitude_key(expect) == 0).sum())


@SETTINGS
@given(st.lists(matrices(), min_size=1, max_size=4), st.floats(0, 0.999))
def test_a_global_threshold_is_one_stable_sort_over_all_tensors(tensors, ratio):
    dtype = tensors[0].dtype
    tensors = [t.to(dtype) for t in tensors]
    total = sum(t.numel() for t in tensors)
    k = prune_count(total, ratio)
    t = find_threshold(lambda: iter(tensors), k)
    flat = torch.cat([x.reshape(-1) for x in tensors])
    expect = reference_keep(flat, k)
    keeps, used_each, ties = [], [], t.ties
    for x in tensors:
        keep, used = threshold_keep(x, t.key, ties)
        keeps.append(keep.reshape(-1))
        used_each.append(used)
        ties -= used
    assert torch.equal(torch.cat(keeps), expect)
    # ... and the ties dealt out before any tensor is read, from per-tensor counts, are the same
    names = [str(i) for i in range(len(tensors))]
    counts = {n: int((magnitude_key(x) == t.key).sum()) for n, x in zip(names, tensors)}
    assert [deal_ties(names, t.key, t.ties, counts)[n][1] for n in names] == used_each


@SETTINGS
@given(matrices(), st.integers(0, 40))
def test_the_threshold_kernel_equals_the_reference(w, k):
    k = min(k, w.numel())
    t = find_threshold(lambda: [w], k)
    got = w.clone()
    used, _ = K.prune_below_(got, t.key, t.ties)
    keep, ref_used = threshold_keep(w, t.key, t.ties)
    assert used == ref_used and torch.equal(bits(got), bits(masked(w, keep)))


@SETTINGS
@given(matrices())
def test_bitmask_round_trip_is_bit_exact(w):
    stored, meta = F.encode("w", w, "bitmask")
    assert torch.equal(bits(F.decode("w", stored, meta)), bits(w))


@SETTINGS
@given(matrices(cols_multiple=4))
def test_packed24_round_trip_is_bit_exact(w):
    w = masked(w, nm_keep(w, 2, 4))
    stored, meta = F.encode("w", w, "packed24")
    assert torch.equal(bits(F.decode("w", stored, meta)), bits(w))


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_sparsity_parsing_accepts_exactly_the_unit_interval(x):
    if 0 <= x < 1:
        assert Sparsity.parse(repr(x)).ratio == x
    else:
        with pytest.raises(UserError, match="sparsity must be"):
            Sparsity.parse(repr(x))


@settings(max_examples=200, deadline=None)
@given(st.integers(-3, 20), st.integers(-3, 20))
def test_pattern_parsing(n, m):
    if 0 < n < m:
        s = Sparsity.parse(pattern=f"{n}:{m}")
        assert (s.n, s.m) == (n, m) and math.isclose(s.ratio, 1 - n / m)
    else:
        with pytest.raises(UserError):
            Sparsity.parse(pattern=f"{n}:{m}")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=12))
def test_any_text_is_a_sparsity_or_one_clear_error(text):
    try:
        s = Sparsity.parse(text)
    except UserError as e:
        assert "\n" not in str(e) and "sparsity must be" in str(e)
    else:
        assert 0 <= s.ratio < 1
