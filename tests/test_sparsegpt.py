"""SparseGPT math: a 1x4 layer checked by hand, the Hessian, dead inputs, dampening escalation,
N:M validity, and lower reconstruction error than magnitude and Wanda on real SmolLM2 layers."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_prune.config import Sparsity
from llm_prune.errors import UserError
from llm_prune.magnitude import is_nm
from llm_prune.magnitude import magnitude_keep
from llm_prune.methods.sparsegpt import Hessian, _inverse_upper, inverse_cholesky, sparsegpt_prune
from llm_prune.methods.wanda import InputNorms, wanda_keep

HALF, TWO_FOUR = Sparsity(0.5), Sparsity(0.5, 2, 4)


def hand_layer():
    """Inputs 0 and 3 are the same feature; feature 1 has norm 2, the others norm 1.

        tokens  x0 x1 x2 x3          W = [1.5, 1.0, 2.2, 1.2]
          t1     1  0  0  1          magnitude keeps the two largest |w|:   {0, 2}
          t2     0  2  0  0          Wanda scores |w|·||x|| = 1.5 2 2.2 1.2: {1, 2}
          t3     0  0  1  0          SparseGPT (blocks of 2 columns):
    block {0,1}: x0 = x3, so pruning w0 costs almost nothing once w3 absorbs it -> prune 0, w3 += w0·h/(h+λ)
    block {2,3}: scores w² / Hinv_jj² = w²·H_jj: 2.2² < 2.67² -> prune 2, keep {1, 3}
    """
    X = torch.tensor([[1.0, 0, 0, 1], [0, 2, 0, 0], [0, 0, 1, 0]])
    W = torch.tensor([[1.5, 1.0, 2.2, 1.2]])
    return W, X


def test_magnitude_wanda_sparsegpt_disagree_on_a_hand_example():
    W, X = hand_layer()
    H = Hessian(4)
    H.add(X)
    norms = InputNorms(4)
    norms.add(X)
    assert magnitude_keep(W, HALF).tolist() == [[True, False, True, False]]
    assert wanda_keep(W, norms.norms, HALF).tolist() == [[False, True, True, False]]
    new, keep = sparsegpt_prune(W, H.H, HALF, blocksize=2, damp=0.01)
    assert keep.tolist() == [[False, True, False, True]]
    # The OBS update of w3 after pruning w0, by hand: H = 2/3·XᵀX, h = H_00 = H_03 = 2/3,
    # λ = 0.01·mean(diag H) = 0.01·(2/3)·(7/4); inverting the damped 2x2 block {0,3} gives δw3 = w0·h/(h+λ).
    h = 2 / 3
    lam = 0.01 * h * 7 / 4
    expected = torch.tensor([[0.0, 1.0, 0.0, 1.2 + 1.5 * h / (h + lam)]])
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-6)
    # ...and its output error is the lowest of the three (magnitude 1² ·4 + 1.2² = 5.44, Wanda 2.7² = 7.29).
    err = lambda w: float(((W - w) @ X.t()).square().sum())
    assert err(W * magnitude_keep(W, HALF)) == pytest.approx(5.44)
    assert err(W * wanda_keep(W, norms.norms, HALF)) == pytest.approx(7.29)
    assert err(new) == pytest.approx(2.2**2 + (2.7 - float(new[0, 3])) ** 2)
    assert err(new) < 5.44


def test_hessian_is_the_running_mean_of_2xxt_in_fp32():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, 7, 5, generator=g, dtype=torch.bfloat16) for _ in range(3)]
    H = Hessian(5)
    for c in chunks:
        H.add(c)
    X = torch.cat([c.reshape(-1, 5) for c in chunks]).double()
    assert H.H.dtype == torch.float32 and H.count == 42
    torch.testing.assert_close(H.H.double(), 2 * X.t() @ X / 42, rtol=1e-5, atol=1e-6)


def test_hessian_read_between_updates_stays_symmetric_and_exact():
    # Each update fills one triangle; reading H mirrors it, and later updates must still land in
    # both halves (a 2,000-column Hessian: 8 bands per update, the mirror in bands of 1,024 rows).
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(300, 2000, generator=g) for _ in range(3)]
    H = Hessian(2000)
    H.add(chunks[0])
    assert torch.equal(H.H, H.H.t())
    for c in chunks[1:]:
        H.add(c)
    X = torch.cat(chunks).double()
    assert torch.equal(H.H, H.H.t())
    torch.testing.assert_close(H.H.double(), 2 * X.t() @ X / 900, rtol=1e-5, atol=1e-5)


def test_mirror_copies_the_upper_triangle_in_bands():
    from llm_prune.methods.sparsegpt import _bands, _mirror_upper

    a = torch.randn(10, 10)
    expected = a.triu() + a.triu(1).t()
    _mirror_upper(a, step=3)
    assert torch.equal(a, expected)
    assert _bands(100) == [(0, 100)] and _bands(2000) == [(a, min(a + 250, 2000)) for a in range(0, 2000, 250)]


def test_dead_inputs_are_pruned_and_the_rest_stays_finite():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 8, generator=g)
    X[:, 3] = 0  # an input that never fires
    W = torch.randn(4, 8, generator=g)
    H = Hessian(8)
    H.add(X)
    new, keep = sparsegpt_prune(W, H.H, HALF)
    assert torch.isfinite(new).all()
    assert (new[:, 3] == 0).all()
    assert int((~keep).sum()) == 16


def test_singular_hessian_raises_dampening_and_logs(caplog):
    H = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # PSD but singular: plain Cholesky fails at damp 0
    with caplog.at_level(logging.WARNING, logger="llm_prune.methods.sparsegpt"):
        U = inverse_cholesky(H, damp=0.0)
    assert "not positive definite with dampening 0" in caplog.text
    assert "succeeded with dampening 0.01" in caplog.text
    Hd = H + 0.01 * torch.eye(2)
    torch.testing.assert_close(U.t() @ U, torch.linalg.inv(Hd), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [1, 7, 96])
def test_inverse_factor_is_the_cholesky_factor_of_the_inverse(n):
    """One factorisation and a triangular inverse give the factor the reference code's three
    steps give: upper, UᵀU = (H + λI)⁻¹, within fp32 rounding of the fp64 answer."""
    g = torch.Generator().manual_seed(n)
    X = torch.randn(4 * n, n, generator=g) * torch.rand(n, generator=g) ** 3  # badly scaled inputs
    H = 2 * X.t() @ X / X.shape[0]
    U = inverse_cholesky(H, damp=0.01)
    Hd = H.double() + 0.01 * float(H.diagonal().mean()) * torch.eye(n, dtype=torch.float64)
    reference = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    assert U.dtype == torch.float32 and U.is_contiguous() and bool((torch.tril(U, -1) == 0).all())
    assert float((U.double() - reference).abs().max() / reference.abs().max()) < 1e-5
    three_steps = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd.float())), upper=True)
    torch.testing.assert_close(U, three_steps, rtol=1e-4, atol=1e-5 * float(three_steps.abs().max()))


def test_triangular_inverse_lapack_and_torch_agree():
    g = torch.Generator().manual_seed(3)
    U = torch.triu(torch.randn(40, 40, generator=g)) + 8 * torch.eye(40)
    inv = _inverse_upper(U.clone())
    torch.testing.assert_close(inv, _inverse_upper(U.clone(), lapack=False), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(U @ inv, torch.eye(40), rtol=0, atol=1e-5)
    singular = U.clone()
    singular[5, 5] = 0
    assert _inverse_upper(singular) is None


def test_non_finite_hessian_is_a_user_error():
    with pytest.raises(UserError, match="inf or nan"):
        inverse_cholesky(torch.tensor([[float("nan")]]))


def test_blocksize_must_hold_whole_nm_groups():
    with pytest.raises(UserError, match="multiple of M=4"):
        sparsegpt_prune(torch.ones(2, 8), torch.eye(8), TWO_FOUR, blocksize=6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_are_exactly_sparse_and_nm_valid(dtype):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(300, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    W = torch.randn(32, 64, generator=g).to(dtype)
    H = Hessian(64)
    H.add(X)
    new, keep = sparsegpt_prune(W, H.H, TWO_FOUR, blocksize=16)
    assert new.dtype == dtype and is_nm(keep, 2, 4) and int(keep.sum()) == 32 * 32
    assert ((new != 0) <= keep).all()
    new, keep = sparsegpt_prune(W, H.H, Sparsity(0.3), blocksize=16)
    assert int((~keep).sum()) == 4 * round(0.3 * 32 * 16)  # exactly per block of 16 columns
    newt, keept = sparsegpt_prune(W.t().contiguous(), H.H, Sparsity(0.3), blocksize=16, weight_in_first=True)
    assert torch.equal(newt.t(), new) and torch.equal(keept.t(), keep)


# -- real layers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_layer_inputs(smollm2_dir):
    """Inputs of every Linear of SmolLM2 block 3 (dense blocks 0-2 before it) on 8 x 256 real tokens."""
    from llm_prune.arch import arch_for
    from llm_prune.blocks import build_skeleton, capture_block_inputs, load_block, run_block
    from llm_prune.calibration import draw_windows, embedded_passages, tokenize
    from llm_prune.reader import CheckpointReader
    from llm_prune.runtime import load_tokenizer

    reader = CheckpointReader(smollm2_dir)
    arch = arch_for(reader.config)
    ids = tokenize(load_tokenizer(smollm2_dir, "calibration"), embedded_passages("calib")[:60])
    windows = draw_windows(ids, 8, 256, seed=0)
    skeleton = build_skeleton(smollm2_dir)
    blocks = skeleton.get_submodule(arch.blocks_attr)
    cpu = torch.device("cpu")
    x, kwargs = capture_block_inputs(skeleton, reader, arch, blocks[0], windows, cpu, torch.float32, cpu)
    units = reader.units(arch)
    with torch.no_grad():
        for i in range(3):
            block = load_block(blocks[i], reader.read(units[i].names), arch, cpu, torch.float32)
            x = run_block(block, x, kwargs, cpu, torch.float32, collect=True)
        tensors = reader.read(units[3].names)
        block = load_block(blocks[3], tensors, arch, cpu, torch.float32)
        seen = {}
        hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
                 for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        run_block(block, x, kwargs, cpu, torch.float32, collect=False)
        for h in hooks:
            h.remove()
    return {n: (tensors[f"model.layers.3.{n}.weight"], torch.cat(v)) for n, v in seen.items()}


@pytest.mark.parametrize("sparsity", [HALF, TWO_FOUR], ids=["50%", "2:4"])
@pytest.mark.parametrize("layer", ["self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"])
def test_sparsegpt_reconstructs_real_layers_better_than_magnitude_and_wanda(smollm2_layer_inputs, layer, sparsity):
    W, X = smollm2_layer_inputs[layer]
    H, norms = Hessian(X.shape[1]), InputNorms(X.shape[1])
    H.add(X)
    norms.add(X)
    ref = X @ W.float().t()
    err = lambda w: float((ref - X @ w.float().t()).norm() / ref.norm())
    e_mag = err(W * magnitude_keep(W, sparsity))
    e_wanda = err(W * wanda_keep(W, norms.norms, sparsity))
    new, keep = sparsegpt_prune(W, H.H, sparsity)
    e_sgpt = err(new)
    assert new.dtype == W.dtype
    assert int(keep.sum()) == W.numel() // 2
    if sparsity.is_nm:
        assert is_nm(new != 0, 2, 4) and is_nm(keep, 2, 4)
    # Clear margins, not ties: SparseGPT at most 0.8x Wanda's error, Wanda below magnitude's.
    assert e_sgpt < 0.8 * e_wanda and e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pattern", ["0.5", "0.7", "2:4", "4:8", "count"])
@pytest.mark.parametrize("shape, blocksize", [((48, 200), 128), ((300, 256), 64), ((7, 96), 32)])
def test_compiled_column_loop_gives_the_torch_loops_bits(pattern, shape, blocksize, dtype):
    # The numba kernel is a drop-in for the torch column loop: same weights bit for bit, same mask,
    # including ties in N:M groups, dead inputs, a block narrower than the others at the end and
    # a last tile of rows the kernel pads (300 = 4 × 64 + 44; 7 and 48 are one partial tile).
    g = torch.Generator().manual_seed(sum(shape) + blocksize)
    rows, cols = shape
    W = torch.randn(rows, cols, generator=g).to(dtype)
    W[:, 3] = W[:, 2]  # ties inside N:M groups
    X = torch.randn(2 * cols, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    X[:, 5] = 0  # a dead input
    H = Hessian(cols)
    H.add(X)
    sparsity = (Sparsity.parse(None, pattern) if ":" in pattern
                else Sparsity(0.4, count=int(0.4 * rows * cols) + 3) if pattern == "count" else Sparsity.parse(float(pattern)))
    ref, ref_keep = sparsegpt_prune(W, H.H, sparsity, blocksize=blocksize, use_kernel=False)
    got, got_keep = sparsegpt_prune(W, H.H, sparsity, blocksize=blocksize, use_kernel=True)
    assert torch.equal(got_keep, ref_keep)
    ints = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]
    assert torch.equal(got.view(ints), ref.view(ints))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1), st.sampled_from([2, 7, 1000]),
       st.floats(0, 1))
def test_compiled_block_mask_is_unstructured_keeps(rows, cols, seed, levels, ratio):
    # The compiled mask of a block is unstructured_keep's, ties included: few distinct values
    # (levels) make most scores tie, and ±0 are one magnitude.
    from llm_prune.kernels.select import smallest_keep
    from llm_prune.magnitude import prune_count, unstructured_keep

    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, levels, (rows, cols), generator=g).float() / levels
    score[torch.rand(rows, cols, generator=g) < 0.1] = -0.0
    k = prune_count(score.numel(), ratio)
    got = smallest_keep(score, k)
    assert torch.equal(got, unstructured_keep(score, ratio))
    assert int((~got).sum()) == k
