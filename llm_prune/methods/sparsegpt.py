"""SparseGPT (Frantar & Alistarh, 2023): prune a layer and fix up the weights that stay.

For one Linear with weight W [rows, cols] and calibration inputs X [cols, tokens], SparseGPT
minimises ||WX - ŴX||² over Ŵ with the chosen sparsity. H = 2XXᵀ is the Hessian of that loss.
Columns are visited left to right in blocks of ``blocksize``; each pruned weight's error is
spread over the not-yet-visited columns of its row with the optimal brain surgeon (OBS) update
``W[:, j:] -= err · Hinv[j, j:]``, where Hinv is the upper Cholesky factor of H⁻¹ (which makes
every row update exact for the columns still to come). The mask is chosen per block of columns
(adaptive mask selection, score w² / Hinv[j, j]²), or per group of M columns for N:M — inside
the update, so later choices see the weights as earlier pruning left them.

Everything here is pure tensor code, fp32 throughout; the result is cast back to the weight's
dtype. The reference code this follows: github.com/IST-DASLab/sparsegpt (``fasterprune``).
"""

from __future__ import annotations

import logging

import torch

from ..config import Sparsity
from ..errors import UserError
from ..magnitude import all_finite, nm_keep, prune_count, select_kernels, unstructured_keep
from . import Method, register

log = logging.getLogger(__name__)

# Each failed Cholesky multiplies the dampening by this; after _MAX_TRIES the Hessian is
# dominated by the diagonal term, so a further failure means the statistics are not finite.
_DAMP_STEP = 10.0
_MAX_TRIES = 8


class Hessian:
    """Running mean of 2·x·xᵀ over every input row (token) a layer sees, accumulated in fp32.

    A running mean rather than a sum keeps the entries of order |x|² however many tokens are
    seen; the scale does not change the solution (dampening is relative to the mean diagonal).
    Each update computes only the upper triangle, in bands of rows (``_BANDS``: about 0.6× the
    arithmetic and time of the full product, BENCHMARKS.md); the lower one is filled in when
    ``H`` is read.
    """

    def __init__(self, columns: int, device: torch.device | str | None = None):
        self._acc = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self._upper_only = False  # the lower triangle is stale (updates since the last read)
        self.count = 0
        self._inverse: tuple[float, torch.Tensor] | None = None

    @property
    def H(self) -> torch.Tensor:
        if self._upper_only:
            _mirror_upper(self._acc)
            self._upper_only = False
        return self._acc

    def inverse(self, damp: float) -> torch.Tensor:
        """``inverse_cholesky`` of H with its dead inputs given a unit diagonal, computed once: the
        targets that share an input (q/k/v, gate/up) share it."""
        if self._inverse is None or self._inverse[0] != damp:
            self._inverse = (damp, _live_inverse(self.H, damp))
        return self._inverse[1]

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self._acc.device, torch.float32)
        total = self.count + x.shape[0]
        if total == 0:
            return
        for a, b in _bands(x.shape[1]):
            self._acc[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:], beta=self.count / total, alpha=2.0 / total)
        self._upper_only = True
        self.count = total
        self._inverse = None


_BANDS = 8  # bands of rows per update; none narrower than _MIN_BAND rows
_MIN_BAND = 128


def _bands(n: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) covering 0..n: band a:b of the Hessian takes columns a: (the diagonal
    block and everything right of it), so the bands together hold the upper triangle."""
    width = max(_MIN_BAND, -(-n // _BANDS))
    return [(a, min(a + width, n)) for a in range(0, n, width)]


def _mirror_upper(a: torch.Tensor, step: int = 1024) -> None:
    """Copy the upper triangle of square ``a`` onto its lower one, in place, in bands of ``step``
    rows (no n × n temporary: a 7B down projection's Hessian is 485 MB)."""
    n = a.shape[0]
    for i in range(0, n, step):
        j = min(i + step, n)
        d = a[i:j, i:j]
        d.copy_(d.triu() + d.triu(1).t())
        if j < n:
            a[j:, i:j] = a[i:j, j:].t()


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, i.e. (H + λI)⁻¹ = UᵀU, with λ = damp · mean(diag H).

    One factorisation and one triangular inverse: with rows and columns reversed, the lower
    Cholesky factor of the reversed matrix, reversed back, is an upper Ũ with H + λI = ŨŨᵀ; so
    (H + λI)⁻¹ = Ũ⁻ᵀŨ⁻¹ and U = Ũ⁻¹ (upper, positive diagonal: the unique factor). The reference
    code's factorise, invert, factorise again is twice the arithmetic for the same factor, and
    on the 11008-column Hessians of a 7B block that arithmetic is most of the solve.

    When a factorisation fails (H only positive semi-definite in floating point, e.g. with fewer
    tokens than columns), λ grows by ``_DAMP_STEP`` and the failure is logged, instead of crashing.
    """
    if not all_finite(H):
        raise UserError("the calibration Hessian has inf or nan entries: the activations overflowed "
                        "(try --act-dtype float32) or the checkpoint is damaged")
    mean_diag = float(torch.diagonal(H).mean())
    ratio = damp
    for attempt in range(_MAX_TRIES):
        Hd = H.flip(0, 1)  # a copy, rows and columns reversed
        Hd.diagonal().add_(ratio * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        U = _inverse_upper(L.flip(0, 1)) if int(info) == 0 else None
        if U is not None:
            if attempt:
                log.warning("Cholesky succeeded with dampening %g of the mean diagonal", ratio)
            return U
        nxt = ratio * _DAMP_STEP if ratio > 0 else 0.01
        log.warning("Hessian not positive definite with dampening %g of the mean diagonal; retrying with %g",
                    ratio, nxt)
        ratio = nxt
    raise UserError(f"the calibration Hessian stayed singular up to dampening {ratio / _DAMP_STEP:g}")


def _inverse_upper(U: torch.Tensor, lapack: bool = True) -> torch.Tensor | None:
    """The inverse of an upper triangular ``U`` (None if singular). On the CPU LAPACK's triangular
    inverse (scipy's ``strtri``: a third of the arithmetic of a triangular solve against the
    identity, which is what runs elsewhere), in place: ``U``'s memory is reused (no second
    n × n buffer, 485 MB for a 7B down projection), so pass a tensor nobody else holds."""
    if lapack and U.device.type == "cpu" and U.dtype == torch.float32:
        from scipy.linalg.lapack import strtri

        # U's memory read as Fortran order is Uᵀ (lower); its inverse, read back, is U⁻¹.
        inv, info = strtri(U.contiguous().numpy().T, lower=1, overwrite_c=1)
        return torch.from_numpy(inv.T) if info == 0 else None
    eye = torch.eye(U.shape[0], dtype=U.dtype, device=U.device)
    inv = torch.linalg.solve_triangular(U, eye, upper=True)
    return inv if bool(torch.isfinite(inv).all()) else None


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: Sparsity, *, blocksize: int = 128,
                    damp: float = 0.01, weight_in_first: bool = False, use_kernel: bool = True,
                    hinv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(updated weight in ``weight``'s dtype, keep-mask). ``hessian`` is [cols, cols] for the
    input dimension; ``weight_in_first`` means ``weight`` is stored [in, out] (GPT-2 Conv1D).
    On the CPU the column loop runs compiled (``llm_prune.kernels.sparsegpt``, the same bits);
    ``use_kernel=False`` runs the torch loop below, the reference. ``hinv``: the inverse factor
    when already known (``Hessian.inverse``), else computed here."""
    if sparsity.is_nm and blocksize % sparsity.m:
        raise UserError(f"--blocksize {blocksize} must be a multiple of M={sparsity.m} for pattern {sparsity}")
    W = (weight.t() if weight_in_first else weight).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    rows, cols = W.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} does not fit a weight with {cols} input columns")
    # Inputs that were always zero carry no information: their weights can go at no cost.
    W[:, torch.diagonal(hessian).to(W.device) == 0] = 0
    if hinv is None:
        hinv = _live_inverse(hessian.to(W.device), damp)
    Hinv = hinv.to(W.device)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    kernel = _kernel(W) if use_kernel else None
    select = select_kernels(W) if use_kernel and not sparsity.is_nm else None  # the block masks' selection
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1)
        err1 = torch.zeros_like(W1)
        if sparsity.is_nm:
            keep1 = torch.ones_like(W1, dtype=torch.bool)  # chosen group by group inside the loop
        else:
            score, ratio = W1.square() / d.square(), _block_ratio(sparsity, rows, cols, i1, i2)
            keep1 = (select.smallest_keep(score, prune_count(score.numel(), ratio)) if select is not None
                     else unstructured_keep(score, ratio))
        if kernel is not None:
            kernel.solve_block_(W1, Hinv1, keep1, err1, *((sparsity.n, sparsity.m) if sparsity.is_nm else (0, 0)))
        else:
            _column_loop(W1, Hinv1, keep1, err1, sparsity)
        W[:, i1:i2] = W1
        keep[:, i1:i2] = keep1
        # in place: the GEMM adds into W's columns, with no rows × (cols - i2) temporary and no
        # second pass over it (with MKL, the same bits as subtracting the product)
        W[:, i2:].addmm_(err1, Hinv[i1:i2, i2:], alpha=-1)
    out = torch.where(keep, W, torch.zeros((), dtype=W.dtype, device=W.device)).to(weight.dtype)
    if weight_in_first:
        out, keep = out.t().contiguous(), keep.t().contiguous()
    return out, keep


def _live_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``inverse_cholesky`` of ``H`` with its dead inputs given a unit diagonal (which keeps it
    invertible), in a copy when there are any; ``H`` itself is left as it is."""
    dead = torch.diagonal(H) == 0
    H = H.to(torch.float32, copy=bool(dead.any()))
    H[dead, dead] = 1  # nothing to write (and no copy made) when no input is dead
    return inverse_cholesky(H, damp)


def _column_loop(W1: torch.Tensor, Hinv1: torch.Tensor, keep1: torch.Tensor, err1: torch.Tensor,
                 sparsity: Sparsity) -> None:
    """One block's columns, left to right: prune the column (N:M: choose each group's mask
    first, from the weights as the updates left them), spread its error over the columns to come."""
    d = torch.diagonal(Hinv1)
    for i in range(W1.shape[1]):
        if sparsity.is_nm and i % sparsity.m == 0:
            g = slice(i, i + sparsity.m)
            keep1[:, g] = nm_keep(W1[:, g].square() / d[g].square(), sparsity.n, sparsity.m)
        w = W1[:, i]
        q = w * keep1[:, i]
        err = (w - q) / d[i]
        W1[:, i:].sub_(err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0))
        W1[:, i] = q  # exact zeros (the update leaves rounding residue there)
        err1[:, i] = err


def _kernel(W: torch.Tensor):
    """The compiled column loop when it can take ``W`` (fp32 on the CPU), else None."""
    try:
        from ..kernels import sparsegpt as K
    except ImportError:  # numba missing: the torch loop
        return None
    return K if K.supported(W) else None


def _block_ratio(sparsity: Sparsity, rows: int, cols: int, i1: int, i2: int) -> float:
    """The ratio pruned in columns i1:i2: the sparsity itself, or, for an exact ``count`` (a share
    of a non-uniform allocation), the block's part of it by cumulative rounding, so the blocks'
    counts sum to ``count`` exactly (``prune_count`` gives back count/numel · numel exactly)."""
    if sparsity.count is None:
        return sparsity.ratio
    part = round(sparsity.count * i2 / cols) - round(sparsity.count * i1 / cols)
    return part / (rows * (i2 - i1))


def _solve(weight, stat: Hessian, sparsity: Sparsity, *, weight_in_first: bool, calib) -> tuple[torch.Tensor, torch.Tensor]:
    return sparsegpt_prune(weight, stat.H, sparsity, blocksize=calib.blocksize, damp=calib.damp,
                           weight_in_first=weight_in_first, hinv=stat.inverse(calib.damp))


register(Method("sparsegpt", "SparseGPT: second-order (OBS) pruning with weight updates from calibration Hessians",
                solve=_solve, observer=Hessian, calib_fields=("damp", "blocksize")))
