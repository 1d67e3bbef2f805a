"""How a requested sparsity is shared out between blocks: uniform, OWL or AlphaPruning.

* ``uniform``: every matrix at the requested sparsity s, each method rounding it its own way
  (per matrix, per output row, per column block): what every run did before allocations existed.
* ``owl`` (Yin et al. 2024): a block with more activation outliers is pruned less. Its metric is
  the outlier ratio D, the fraction of the block's Wanda scores |W_ij|·||X_j|| (all its targets
  together) above M × their mean (``outlier_ratio``); the scores need calibration activations.
* ``alpha`` (AlphaPruning, Lu et al. 2024): a block whose matrices have lighter-tailed spectra
  (a larger Hill α, so less shaped by training) is pruned more. Data-free (``llm_prune.spectrum``).

Both go the same way from a metric per block to a count per matrix:

    metric per block --spread--> raw sparsities in [0, 2λ] (the lowest/highest metric at an end)
      --balance--> shifted so that Σ n_b s_b = s N, clipped to the band [s-λ, s+λ] ∩ [0, 1]
      --block_counts--> an integer count per block, Σ = round(s N), each block inside the band
                        to the weight (its edges rounded outward to whole weights)
      --matrix_counts--> each block's count over its matrices in proportion to their sizes

so the sparsity over all targets is the requested one exactly, to the weight. Sizes n_b are the
blocks' target weight counts, so the mean is over weights, not blocks (the same thing for the
equal blocks of a LLaMA). OWL's reference code only shifts its [0, 2λ] spread to the mean,
which leaves the band whenever the spread is lopsided; here the band holds, and the spread is
re-balanced inside it (the same numbers whenever OWL's own stay inside). ``clip=False``
(``--allocation-unclipped``) reproduces the reference's shift instead, for comparisons with tools
that use it: the band then only sets the spread's width, and each block is held inside [0, 1)
alone (clipped there, if a shift leaves it, by the same balancing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import PruneConfig, Sparsity
from .errors import UserError
from .magnitude import prune_count

# Which way a metric pushes: OWL's outliers protect a block, AlphaPruning's large α exposes it.
HIGHER_PRUNES_MORE = {"owl": False, "alpha": True}
METRIC_NAME = {"owl": "outlier_ratio", "alpha": "mean_hill_alpha"}


@dataclass
class Shares:
    """A non-uniform allocation: each target's exact prune count, and what decided it."""

    kind: str
    band: float
    metric: dict[int, float]  # per block
    blocks: dict[int, list[str]]  # block -> its target names
    numels: dict[str, int]
    counts: dict[str, int]
    clipped: bool = True  # False: --allocation-unclipped

    def sparsity(self, name: str) -> Sparsity:
        return Sparsity.of_count(self.counts[name], self.numels[name])

    def to_state(self) -> dict:
        """What a resumed run needs to prune the remaining blocks the same way (progress.jsonl)."""
        return {"kind": self.kind, "band": self.band, "metric": {str(b): v for b, v in self.metric.items()},
                "counts": self.counts, **({"clipped": False} if not self.clipped else {})}

    @staticmethod
    def from_state(state: dict, blocks: dict[int, list[str]], numels: dict[str, int]) -> "Shares":
        return Shares(state["kind"], state["band"], {int(b): v for b, v in state["metric"].items()}, blocks,
                      numels, {n: int(c) for n, c in state["counts"].items()}, state.get("clipped", True))

    def report(self, per_tensor: dict[str, list[int]], owl_m: float | None = None) -> dict:
        """``sparsity.json``'s ``allocation``: per block its metric, planned and achieved sparsity."""
        rows = {}
        for b, names in self.blocks.items():
            n = sum(self.numels[x] for x in names)
            zeros = sum(per_tensor[x][1] for x in names if x in per_tensor)
            rows[str(b)] = {"params": n, METRIC_NAME[self.kind]: self.metric[b],
                            "planned": sum(self.counts[x] for x in names) / n, "sparsity": zeros / n}
        out = {"name": self.kind, "band": self.band, "metric": METRIC_NAME[self.kind], "blocks": rows}
        return out | ({"owl_m": owl_m} if owl_m is not None else {}) | ({"clipped": False} if not self.clipped else {})


def allocate(cfg: PruneConfig, metric: dict[int, float], blocks: dict[int, list[str]],
             numels: dict[str, int]) -> Shares:
    """The shares of ``cfg.allocation`` (owl or alpha) from a metric per block."""
    band, s = cfg.allocation_band, cfg.sparsity.ratio
    order = sorted(blocks)
    sizes = [sum(numels[n] for n in blocks[b]) for b in order]
    raw = spread([metric[b] for b in order], band, HIGHER_PRUNES_MORE[cfg.allocation])
    edges = band_edges(s, band) if cfg.clip else (0.0, 1.0)
    per_block = block_counts(balance(raw, sizes, s, edges), sizes, s, edges, band)
    counts = {}
    for b, c in zip(order, per_block):
        counts |= dict(zip(blocks[b], matrix_counts(c, [numels[n] for n in blocks[b]])))
    return Shares(cfg.allocation, band, {b: metric[b] for b in order}, {b: blocks[b] for b in order}, numels, counts,
                  cfg.clip)


def spread(metric: list[float], band: float, higher_prunes_more: bool) -> list[float]:
    """The metric mapped linearly onto [0, 2λ]: the lowest at 0, the highest at 2λ (or the reverse).
    Equal metrics (or one block) spread nothing: uniform."""
    lo, hi = min(metric), max(metric)
    if not hi > lo:
        return [0.0] * len(metric)
    x = [(v - lo) / (hi - lo) * 2 * band for v in metric]
    return x if higher_prunes_more else [2 * band - v for v in x]


def band_edges(s: float, band: float) -> tuple[float, float]:
    return max(0.0, s - band), min(1.0, s + band)


def balance(raw: list[float], sizes: list[int], s: float, edges: tuple[float, float]) -> list[float]:
    """``raw`` + t, clipped to ``edges`` (the band's, or [0, 1]), with the one shift t that makes the
    weighted mean s.

    Σ n_b clip(raw_b + t) grows continuously with t from lo N to hi N, so t exists; without
    clipping it is s minus raw's weighted mean (OWL's shift), otherwise bisection finds it."""
    lo, hi = edges
    total = sum(sizes)
    clip = lambda t: [min(hi, max(lo, r + t)) for r in raw]  # noqa: E731
    mean = lambda t: sum(n * v for n, v in zip(sizes, clip(t))) / total  # noqa: E731
    t = s - sum(n * r for n, r in zip(sizes, raw)) / total
    if all(lo <= r + t <= hi for r in raw):
        return [r + t for r in raw]
    a, b = lo - max(raw), hi - min(raw)
    for _ in range(200):  # halves a bracket of width <= 2: far below float resolution
        m = (a + b) / 2
        a, b = (m, b) if mean(m) < s else (a, m)
    return clip((a + b) / 2)


def block_counts(sparsities: list[float], sizes: list[int], s: float, edges: tuple[float, float],
                 band: float) -> list[int]:
    """Whole prune counts per block: Σ = round(s N) exactly, each block's inside ``edges`` rounded
    outward (and below its size), closest to ``sparsities`` by largest remainder."""
    lo_s, hi_s = edges
    total = prune_count(sum(sizes), s)
    lo = [math.floor(lo_s * n) for n in sizes]
    hi = [min(math.ceil(hi_s * n), n - 1) for n in sizes]
    if not sum(lo) <= total <= sum(hi):
        raise UserError(f"sparsity {s:g} cannot be shared out inside the band ±{band:g} while leaving every "
                        "block a weight (lower the sparsity or widen --allocation-band)")
    ideal = [v * n for v, n in zip(sparsities, sizes)]
    counts = [min(h, max(lw, math.floor(y))) for y, lw, h in zip(ideal, lo, hi)]
    for _ in range(total - sum(counts)):  # short: one step per block at most, unless clipped
        i = max((i for i in range(len(sizes)) if counts[i] < hi[i]), key=lambda i: (ideal[i] - counts[i], -i))
        counts[i] += 1
    for _ in range(sum(counts) - total):
        i = min((i for i in range(len(sizes)) if counts[i] > lo[i]), key=lambda i: (ideal[i] - counts[i], i))
        counts[i] -= 1
    return counts


def matrix_counts(count: int, numels: list[int]) -> list[int]:
    """``count`` over matrices in proportion to their sizes, in exact integers (largest remainder,
    ties to the earlier matrix): every matrix of a block at the block's sparsity, to the weight."""
    total = sum(numels)
    base = [count * n // total for n in numels]
    order = sorted(range(len(numels)), key=lambda i: (-(count * numels[i] % total), i))
    for i in order[:count - sum(base)]:
        base[i] += 1
    return base


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """OWL's D of one block: the fraction of its scores (all its targets' together) above m × their
    mean. The mean is over every score of the block, summed in fp64; nothing is concatenated."""
    total = sum(int(x.numel()) for x in scores)
    mean = sum(float(x.sum(dtype=torch.float64)) for x in scores) / total
    return sum(int((x > m * mean).sum()) for x in scores) / total


def target_blocks(units, infos) -> tuple[dict[int, list[str]], dict[str, int]]:
    """(block -> its target names, in visiting order; target -> weight count) of a run's units."""
    blocks = {}
    for u in units:
        if u.targets:
            if u.block is None:
                raise UserError(f"--allocation shares sparsity between blocks; {u.targets[0]} is in none")
            blocks[u.block] = list(u.targets)
    return blocks, {n: infos[n].numel for names in blocks.values() for n in names}


def finite(pairs, file_of):
    """(name, tensor) pairs passed through, refusing a damaged tensor by name before its SVD."""
    from .magnitude import all_finite

    for name, w in pairs:
        if not all_finite(w):
            raise UserError(f"{name} (in {file_of(name)}) has inf or nan values: the checkpoint is damaged")
        yield name, w


def alpha_shares(cfg: PruneConfig, units, infos, cache, read, progress: bool = False) -> Shares:
    """AlphaPruning's shares: every target's α (cached, else one streaming pass of SVDs), the
    block means, then ``allocate``. ``read(names)`` yields (name, tensor) one at a time."""
    from .spectrum import block_metric

    blocks, numels = target_blocks(units, infos)
    alphas = cache.alphas([n for names in blocks.values() for n in names], read, progress)
    return allocate(cfg, block_metric(alphas, blocks), blocks, numels)
