"""Frozen configuration objects: the CLI builds them once, the library only reads them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, asdict

from .errors import UserError

SCOPES = ("layer", "global")
# How the requested sparsity is shared out between blocks (``llm_prune.allocation``).
ALLOCATIONS = ("uniform", "owl", "alpha")
# λ, the band's half-width, when --allocation-band is not given. OWL: the paper's LLaMA setting.
# alpha: AlphaPruning scales s by [1-ε, 1+ε] with ε = 0.3 in its LLaMA-7B runs at 70% (±0.21);
# as an additive band, 0.2.
DEFAULT_BAND = {"owl": 0.08, "alpha": 0.2}
# The window SparseGPT and Wanda calibrate with and measure LLaMA-family perplexity on: the
# protocol both reference implementations pin, so our numbers compare with their tables.
REFERENCE_SEQLEN = 2048
# Default targets: every 2-D ``*.weight`` inside a transformer block (the Linear / Conv1D
# weights); embeddings, head, norms and biases live outside blocks or are 1-D.
DEFAULT_TARGETS = ("*.weight",)


@dataclass(frozen=True)
class Sparsity:
    """How many weights to remove: a ratio, optionally as an N:M pattern.

    ``ratio`` is the fraction of targeted weights set to zero. With a pattern, at most ``n`` of
    every ``m`` consecutive weights along the input dimension are kept, so ratio = 1 - n/m.
    """

    ratio: float
    n: int | None = None
    m: int | None = None
    # One matrix's share under a non-uniform allocation: exactly this many of its weights go.
    # None: each method's own rounding of ``ratio`` (per matrix, per output row, per column block).
    count: int | None = None

    @staticmethod
    def of_count(count: int, numel: int) -> "Sparsity":
        """Exactly ``count`` of ``numel`` weights. ``ratio`` = count/numel is exact enough that
        ``magnitude.prune_count(numel, ratio)`` gives ``count`` back (tests check it), so methods
        that round the ratio per matrix prune exactly ``count`` with no change."""
        return Sparsity(count / numel if numel else 0.0, count=count)

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def label(self) -> str:
        """Short form used in directory names and tables: ``0.4`` or ``2of4``."""
        return f"{self.n}of{self.m}" if self.is_nm else f"{self.ratio:g}"

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"

    @staticmethod
    def parse(sparsity: str | float | None = None, pattern: str | None = None) -> "Sparsity":
        """Validate ``--sparsity`` / ``--pattern`` together; raise UserError on any inconsistency."""
        nm = _parse_pattern(pattern) if pattern else None
        ratio = _parse_ratio(sparsity) if sparsity is not None else None
        if nm is None:
            if ratio is None:
                raise UserError("give --sparsity (a fraction in [0, 1)) or --pattern N:M")
            return Sparsity(ratio)
        n, m = nm
        implied = 1 - n / m
        if ratio is not None and abs(ratio - implied) > 1e-9:
            raise UserError(
                f"--sparsity {ratio:g} contradicts --pattern {n}:{m}, which keeps {n} of every {m}"
                f" weights (sparsity {implied:g}); give one of them"
            )
        return Sparsity(implied, n, m)


def _parse_ratio(value: str | float) -> float:
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise UserError(f"sparsity must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= ratio < 1.0:  # also rejects nan
        raise UserError(f"sparsity must be in [0, 1), got {value!r}")
    return ratio


def _parse_pattern(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match:
        raise UserError(f"pattern must look like N:M (for example 2:4), got {text!r}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise UserError(f"pattern {n}:{m} is impossible: it needs 0 < N < M (for example 2:4)")
    return n, m


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides which weights a run removes (and so the output bytes)."""

    method: str = "omp"
    sparsity: Sparsity = field(default_factory=lambda: Sparsity(0.5))
    scope: str = "layer"
    # fnmatch patterns on tensor names relative to their block (e.g. "mlp.*", "*.q_proj.weight").
    targets: tuple[str, ...] = DEFAULT_TARGETS
    exclude: tuple[str, ...] = ()
    allocation: str = "uniform"
    band: float | None = None  # None: the allocation's default (``DEFAULT_BAND``)
    owl_m: float = 5.0  # OWL's M: an outlier scores above M x its block's mean (the paper's LLaMA setting)
    clip: bool = True  # False: OWL's reference shift, which may leave the band (``allocation.balance``)
    permute: bool = False  # N:M: choose groups after permuting input channels the checkpoint can absorb

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise UserError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.permute and not self.sparsity.is_nm:
            raise UserError("--permute reorders input channels to choose N:M groups; give --pattern N:M")
        if self.scope == "global" and self.sparsity.is_nm:
            raise UserError("an N:M pattern is chosen per group of M weights; --scope global does not apply")
        if self.allocation not in ALLOCATIONS:
            raise UserError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation == "uniform":
            if self.band is not None:
                raise UserError("--allocation-band sets how far blocks may differ; give it with --allocation owl or alpha")
            if not self.clip:
                raise UserError("--allocation-unclipped changes how owl/alpha shares are shifted; give it with "
                                "--allocation owl or alpha")
            return
        if self.scope == "global":
            raise UserError(f"--allocation {self.allocation} does not apply to --scope global: one magnitude "
                            "threshold already sets each matrix's share (use --scope layer)")
        if self.sparsity.is_nm:
            raise UserError(f"--allocation {self.allocation} does not apply to an N:M pattern, which fixes every "
                            f"matrix at sparsity 1-N/M (use --sparsity)")
        if self.band is not None and not 0.0 <= self.band < 1.0:  # also rejects nan
            raise UserError(f"--allocation-band must be in [0, 1), got {self.band!r}")
        if not self.owl_m > 0:
            raise UserError(f"--owl-m must be positive, got {self.owl_m!r}")

    @property
    def allocation_band(self) -> float:
        return DEFAULT_BAND[self.allocation] if self.band is None else self.band

    def to_json(self) -> dict:
        d = asdict(self)
        d["sparsity"] = self.sparsity.ratio
        d["pattern"] = f"{self.sparsity.n}:{self.sparsity.m}" if self.sparsity.is_nm else None
        d["targets"], d["exclude"] = list(self.targets), list(self.exclude)
        # Uniform runs keep the keys they had before allocations existed: their run keys (resume),
        # reports and caches stay what they were.
        if not self.permute:  # runs without it keep the keys they had before it existed
            del d["permute"]
        if self.allocation == "uniform" or self.clip:  # clipped runs keep the keys they had before the option
            del d["clip"]
        if self.allocation == "uniform":
            del d["allocation"], d["band"], d["owl_m"]
        else:
            d["band"] = self.allocation_band
            if self.allocation != "owl":
                del d["owl_m"]
        return d
