"""AlphaPruning's heavy-tail metric of a weight matrix, and its cache.

The eigenvalues of WᵀW (the squared singular values of W) of a well-trained layer follow a
power law in their tail, p(λ) ~ λ^-α: the more training shaped the layer, the heavier the tail
and the smaller α (Martin & Mahoney's heavy-tailed self-regularisation). AlphaPruning (Lu et al.
2024) estimates α per matrix with the Hill estimator and xmin at the median eigenvalue (its
default, ``xmin_mid``):

    λ_1 <= ... <= λ_N ascending,  i = N // 2,  tail = λ_i..λ_N (k = N - i values, xmin = λ_i)
    α = 1 + k / Σ_tail ln(λ_j / xmin)

(xmin itself is in the tail and adds ln 1 = 0, as in AlphaPruning's ``net_esd_estimator``).
Singular values are computed in fp32 (as AlphaPruning does; fp64 doubles the time of the one
expensive step for no change in the ordering of blocks), the sum of logs in fp64.

Metrics are cached under the checkpoint's content hash (``cache_dir()/spectra/<fingerprint>.json``,
as the key tables are): the SVDs are the only costly part, and a later run, any sparsity, any
method, any band, reads them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from .fingerprint import checkpoint_fingerprint, file_digest
from .paths import atomic_write_text, cache_dir

ESTIMATOR = "hill-xmin-median-fp32-v1"
# A spectrum with no spread in its tail (all equal, or no positive eigenvalue: a zero or
# orthogonal matrix) has no power law; it counts as the lightest tail measured here.
ALPHA_MAX = 1e3


def hill_alpha(weight: torch.Tensor) -> float:
    """α of the eigenvalue spectrum of WᵀW (Hill estimator, xmin at the median eigenvalue)."""
    sv = torch.linalg.svdvals(weight.detach().to("cpu", torch.float32))
    eigs = sv.to(torch.float64).square().sort().values
    eigs = eigs[eigs > 0]  # a rank-deficient matrix: its zero eigenvalues have no logarithm
    if eigs.numel() < 2:
        return ALPHA_MAX
    i = eigs.numel() // 2
    tail = eigs[i:]
    logs = float(torch.log(tail / tail[0]).sum())
    return min(ALPHA_MAX, 1.0 + tail.numel() / logs) if logs > 0 else ALPHA_MAX


class SpectrumCache:
    """Per-target α of one checkpoint, computed once and kept under its content hash."""

    def __init__(self, path: Path, files: list[str]):
        self.root, self.files = Path(path), list(files)
        self._path: Path | None = None

    def path(self) -> Path:
        if self._path is None:
            fp = checkpoint_fingerprint({f: file_digest(self.root / f) for f in self.files})
            self._path = cache_dir() / "spectra" / f"{fp}.json"
        return self._path

    def alphas(self, names: list[str], read: Callable[[list[str]], Iterable[tuple[str, torch.Tensor]]],
               progress: bool = False) -> dict[str, float]:
        """α of ``names``: from the cache, the missing ones from ``read(names)`` (one tensor at a
        time, in the reader's order), then cached."""
        cached = _read(self.path())
        missing = [n for n in names if n not in cached]
        if missing:
            bar = tqdm(read(missing), total=len(missing), desc="spectra (once)", unit="matrix",
                       disable=not progress, leave=False)
            for name, w in bar:
                cached[name] = hill_alpha(w)
                del w
            self.path().parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path(), json.dumps({"estimator": ESTIMATOR, "alpha": cached}, sort_keys=True))
        return {n: cached[n] for n in names}


def block_metric(alphas: dict[str, float], blocks: dict[int, list[str]]) -> dict[int, float]:
    """Per block, the mean α of its targets (AlphaPruning's block-wise mapping)."""
    return {b: sum(alphas[n] for n in names) / len(names) for b, names in blocks.items()}


def _read(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged: recompute
        return {}
    return dict(data.get("alpha", {})) if data.get("estimator") == ESTIMATOR else {}
