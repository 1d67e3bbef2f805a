"""The fused in-place magnitude kernels against the torch reference (llm_prune.magnitude), bit for bit."""

import numpy as np
import pytest
import torch

from llm_prune.config import Sparsity
from llm_prune.kernels import magnitude as K
from llm_prune.kernels import nm as NM
from llm_prune.magnitude import NonFinite, find_threshold, magnitude_keep, magnitude_key, nm_keep, threshold_keep

from .helpers import bits, magnitude_prune_, masked, threshold_prune_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tied(shape, dtype, seed=0):
    """Random weights where every 7th is a copy of one value (and of its negation): many ties."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    flat = w.view(-1)
    if flat.numel() > 8:
        flat[::7] = flat[3]
        flat[1::14] = -flat[3]
        flat[5] = 0.0
    return w


@pytest.mark.parametrize("dtype", DTYPES)
def test_histogram_equals_bincount_of_keys(dtype):
    w = tied((300, 257), dtype)
    shift = 16 if dtype == torch.float32 else 0
    ref = torch.bincount(magnitude_key(w).reshape(-1).long() >> shift, minlength=1 << 15)
    assert torch.equal(torch.from_numpy(K.key_histogram(w)), ref)
    assert torch.equal(torch.from_numpy(K.key_histogram(w, serial=True)), ref)
    assert K.key_histogram(torch.empty(0, 4, dtype=dtype)).sum() == 0
    assert K.key_histogram(torch.empty(0, 4, dtype=dtype), serial=True).sum() == 0


def test_serial_histogram_counts_in_slices_of_int32_range():
    """The serial kernel sums its int32 rows into int64 once per slice: slices smaller than the
    tensor (forced here) give the same counts."""
    w = tied((301, 257), torch.bfloat16)
    u = K.bits(w).view(np.uint16)
    ref = K.key_histogram(w)
    for parts in (1, 2, 7):
        assert np.array_equal(K._histogram_serial(u, K.sign_clear(u), 0, parts), ref)


def test_bucket_histogram_equals_bincount_of_low_halves():
    w = tied((300, 257), torch.float32)  # not a multiple of the kernels' groups: tails too
    key = magnitude_key(w).reshape(-1).long()
    for high in {int(key.median()) >> 16, int(key.max()) >> 16, 0}:
        ref = torch.bincount(key[(key >> 16) == high] & 0xFFFF, minlength=1 << 16)
        assert torch.equal(torch.from_numpy(K.bucket_histogram(w, high)), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frac", [0.0, 1 / 3, 0.5, 0.9, 1.0])
def test_prune_below_equals_threshold_keep(dtype, frac):
    w = tied((64, 96), dtype)
    t = find_threshold(lambda: [w], round(frac * w.numel()))
    for ties in sorted({0, 1, t.ties, t.ties + 3}):
        keep, used = threshold_keep(w, t.key, ties)
        expect = masked(w, keep)
        zeros = w.numel() - int(torch.count_nonzero(expect))
        got = w.clone()
        assert K.prune_below_(got, t.key, ties) == (used, zeros)
        assert torch.equal(bits(got), bits(expect))
        out, before = torch.full_like(w, 7.0), w.clone()  # out of place: the source stays
        assert K.prune_below_(w, t.key, ties, out=out) == (used, zeros)
        assert torch.equal(bits(out), bits(expect)) and torch.equal(bits(w), bits(before))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_prune_below_refuses_inf_and_nan_in_the_same_pass(dtype, bad):
    # Anywhere: the first or last chunk, inside the span where the tie quota runs out, in the tail.
    n = 2 * K.CHUNK + 37
    w = tied((n,), dtype)
    t = find_threshold(lambda: [w], n // 2)
    for at in (0, 5, K.CHUNK + 1, n - 1):
        for key, ties in ((t.key, t.ties), (t.key, 0), (-1, 0)):
            x = w.clone()
            x[at] = bad
            with pytest.raises(NonFinite):
                K.prune_below_(x.clone(), key, ties)
            with pytest.raises(NonFinite):
                K.prune_below_(x, key, ties, out=torch.empty_like(x))
    assert K.prune_below_(w.clone(), t.key, t.ties)[0] == t.ties  # finite: no complaint


def test_ties_across_chunk_boundaries():
    # All weights equal: which ones go is decided by the tie quota alone, split over 4 chunks.
    n = 3 * K.CHUNK + 5
    w = torch.full((n,), 0.25, dtype=torch.float16)
    w[K.CHUNK - 2:K.CHUNK + 2] = -0.25
    key = int(magnitude_key(w)[0])
    for ties in (1, K.CHUNK - 1, K.CHUNK + 7, 2 * K.CHUNK + 3, n, n + 10):
        got = w.clone()
        assert K.prune_below_(got, key, ties) == (min(ties, n), min(ties, n))  # (ties used, zeros)
        expect = w.clone()
        expect[:min(ties, n)] = 0
        assert torch.equal(bits(got), bits(expect)), ties


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3), (3, 7), (5, 16)])
def test_prune_nm_equals_nm_keep(dtype, n, m):
    w = tied((24, 336), dtype)  # 336 = lcm(3, 7, 16)
    expect = masked(w, nm_keep(w, n, m))
    zeros = w.numel() - int(torch.count_nonzero(expect))
    got = w.clone()
    assert NM.prune_nm_(got, n, m) == zeros
    assert torch.equal(bits(got), bits(expect))
    out, before = torch.empty_like(w), w.clone()
    assert NM.prune_nm_(w, n, m, out=out) == zeros
    assert torch.equal(bits(out), bits(expect)) and torch.equal(bits(w), bits(before))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prune_24_words_unaligned_signed_zeros_and_all_ties(dtype):
    # 16-bit 2:4 runs four weights per 64-bit word: a tensor 2 bytes past an 8-byte boundary (as
    # mapped from a safetensors file), -0 among the zeros it counts, and groups of four equal
    # magnitudes (the tie rule alone decides) across several parallel chunks.
    rows = K.CHUNK // 64 + 3
    w = tied((rows, 64), dtype)
    flat = w.view(-1)
    flat[8:12] = torch.tensor([0.5, -0.5, 0.5, -0.5], dtype=dtype)
    flat[16:20] = torch.tensor([-0.0, 0.0, 0.25, -0.0], dtype=dtype)
    flat[-8:] = 0.125
    store = torch.empty(w.numel() + 1, dtype=dtype)
    shifted = store[1:].view(w.shape)
    assert shifted.data_ptr() % 8 != 0
    expect = masked(w, nm_keep(w, 2, 4))
    zeros = int((bits(expect) & 0x7FFF).eq(0).sum())  # -0 counts as a zero
    shifted.copy_(w)
    assert NM.prune_nm_(shifted, 2, 4) == zeros
    assert torch.equal(bits(shifted), bits(expect))
    shifted.copy_(w)
    out = torch.empty_like(w)
    assert NM.prune_nm_(shifted, 2, 4, out=out) == zeros
    assert torch.equal(bits(out), bits(expect)) and torch.equal(bits(shifted), bits(w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [Sparsity(0.0), Sparsity(0.3), Sparsity(0.5), Sparsity(0.97),
                                      Sparsity.parse(None, "2:4"), Sparsity.parse(None, "4:8")])
def test_magnitude_prune_equals_mask(dtype, sparsity):
    w = tied((40, 64), dtype)
    expect = masked(w, magnitude_keep(w, sparsity))
    got = w.clone()
    zeros = magnitude_prune_(got, sparsity)
    assert torch.equal(bits(got), bits(expect))
    assert zeros == w.numel() - int(torch.count_nonzero(expect))
    out, before = torch.empty_like(w), w.clone()
    assert magnitude_prune_(w, sparsity, out=out) == zeros
    assert torch.equal(bits(out), bits(expect)) and torch.equal(bits(w), bits(before))


def test_fallbacks_give_the_same_bits():
    # Not contiguous (a transposed view), and Conv1D-style N:M along dim 0: the torch path.
    w = tied((32, 48), torch.bfloat16)
    t = w.t()
    expect = masked(t, magnitude_keep(t, Sparsity(0.5)))
    assert not K.supported(t)
    magnitude_prune_(t, Sparsity(0.5))
    assert torch.equal(bits(t.contiguous()), bits(expect.contiguous()))
    w = tied((32, 48), torch.float16)
    expect = masked(w, magnitude_keep(w, Sparsity.parse(None, "2:4"), True))
    out = torch.empty_like(w)
    magnitude_prune_(w, Sparsity.parse(None, "2:4"), True, out=out)
    assert torch.equal(bits(out), bits(expect))
    magnitude_prune_(w, Sparsity.parse(None, "2:4"), True)
    assert torch.equal(bits(w), bits(expect))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_is_refused_before_anything_changes(dtype, bad):
    w = tied((16, 32), dtype)
    w[3, 5] = bad
    before = w.clone()
    with pytest.raises(NonFinite):
        magnitude_prune_(w, Sparsity(0.5))
    with pytest.raises(NonFinite):
        threshold_prune_(w, 100, 0)
    with pytest.raises(NonFinite):
        magnitude_prune_(w, Sparsity.parse(None, "2:4"))
    out = torch.zeros_like(w)
    with pytest.raises(NonFinite):
        magnitude_prune_(w, Sparsity(0.5), out=out)
    assert torch.equal(bits(w), bits(before)) and not out.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_key(dtype):
    w = tied((300, 257), dtype)
    assert K.max_key(w) == int(magnitude_key(w).max())
    w.view(-1)[-1] = float("-inf")
    assert K.max_key(w) == int(magnitude_key(w).max())
    assert K.max_key(torch.empty(0, dtype=dtype)) == -1


def test_thread_count_does_not_change_the_bits():
    w = tied((3 * K.CHUNK // 64 + 5, 64), torch.bfloat16)
    t = find_threshold(lambda: [w], w.numel() // 2)
    results = []
    for cores in (1, None):
        K.set_threads(cores)
        try:
            got = w.clone()
            results.append((K.key_histogram(w).tolist(), K.prune_below_(got, t.key, t.ties), bits(got)))
        finally:
            K.set_threads(None)
    assert results[0][:2] == results[1][:2] and torch.equal(results[0][2], results[1][2])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_an_export_leaves_one_core_to_its_other_threads(tmp_path, monkeypatch, scope):
    """The exporter hashes, copies and writes in threads beside the kernels: they get all cores
    but one. On first contact in layer scope the tables are made in a thread of their own, one
    core, serially (``RunTables.made_ahead``); the global pass makes them on the main thread,
    on every core, before any of those threads has work."""
    import threading

    import numba as nb

    from llm_prune import PruneConfig, prune_checkpoint

    from .conftest import save_tiny, tiny_llama_config

    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))
    src = save_tiny(tmp_path / "tiny", tiny_llama_config())
    seen, histogram, prune = [], K.key_histogram, K.prune_below_

    def spy(f):
        return lambda *a, **kw: (seen.append((f.__name__, threading.current_thread().name, nb.get_num_threads(),
                                              a[1:] == (True,) or kw.get("serial", False))), f(*a, **kw))[1]

    monkeypatch.setattr(K, "key_histogram", spy(histogram))
    monkeypatch.setattr(K, "prune_below_", spy(prune))
    before = nb.get_num_threads()
    prune_checkpoint(src, PruneConfig(sparsity=Sparsity(0.5), scope=scope), tmp_path / "out", progress=False)
    on_main = {(f, threads) for f, thread, threads, serial in seen if thread == "MainThread"}
    off_main = {(f, thread.split("_")[0], serial) for f, thread, _, serial in seen if thread != "MainThread"}
    most = max(1, nb.config.NUMBA_NUM_THREADS - 1)
    if scope == "layer":
        assert on_main == {("prune_below_", most)}
        assert off_main == {("key_histogram", "llm-prune-tables", True)}
    else:  # the global pass runs before the threads beside the pruning start: every core
        assert on_main == {("key_histogram", nb.config.NUMBA_NUM_THREADS), ("prune_below_", most)} and not off_main
    assert nb.get_num_threads() == before


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_keeps_keys_in_the_weights_own_width(dtype):
    """numba types ``a & b`` of two int16s as int64; a key left that wide makes LLVM widen every
    lane of the select and of its running maximum (2-4x slower on 16-bit weights, BENCHMARKS.md
    session 24). The largest key the select and the max pass compute must be of the weights' type."""
    import numba as nb

    w = tied((64, 64), dtype)
    x = K.bits(w)
    clear = K.sign_clear(x)
    _, top = K._keep_from(x, x.copy(), clear, x.dtype.type(1))
    width = nb.from_dtype(x.dtype)

    def returned(kernel):
        return [s.return_type for s in kernel.nopython_signatures if s.args[0].dtype == width]

    assert [r[1] for r in returned(K._keep_from)] and all(r[1] == width for r in returned(K._keep_from))
    K._max_seg(x, clear)
    assert returned(K._max_seg) == [width]
    keys = magnitude_key(w).reshape(-1)  # ...and the value is the reference's
    assert top == int(keys.max()) == K.max_key(w)
