"""Which tensors a run prunes: chosen from the headers alone, the same way by the exporter and the loader.

By default every 2-D ``*.weight`` inside the transformer blocks (the Linear / Conv1D weights);
``--targets`` / ``--exclude`` take globs matched on the name inside the block
(``mlp.up_proj.weight``) or on the full name. Everything a run cannot do with the targets
(a dtype the kernels do not take, an N:M pattern that does not divide a layer, a global
threshold over mixed dtypes) is refused here, before any work.
"""

from __future__ import annotations

import fnmatch

import torch

from .arch import Arch
from .config import PruneConfig
from .errors import UserError
from .reader import TensorInfo, Unit

PRUNABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def select_targets(units: list[Unit], infos: dict[str, TensorInfo], arch: Arch, cfg: PruneConfig) -> None:
    """Mark each block's targets and check, from headers alone, that they can be pruned as asked."""
    dtypes = set()
    for unit in units:
        if unit.block is None:
            continue
        for name in unit.names:
            rel = arch.block_of(name)[1]
            info = infos[name]
            if len(info.shape) != 2 or not matches(rel, name, cfg.targets) or matches(rel, name, cfg.exclude):
                continue
            if info.dtype not in PRUNABLE_DTYPES:
                raise UserError(f"{name} has dtype {info.dtype}; targets must be fp16, bf16 or fp32 (see --exclude)")
            if cfg.sparsity.is_nm:
                in_dim = info.shape[0] if arch.weight_in_first else info.shape[1]
                if in_dim % cfg.sparsity.m:
                    raise UserError(f"{name} has input dimension {in_dim}, not a multiple of {cfg.sparsity.m}: "
                                    f"pattern {cfg.sparsity} cannot apply (leave it out with --exclude)")
            unit.targets.append(name)
            dtypes.add(info.dtype)
    if not any(u.targets for u in units):
        raise UserError(f"no tensor inside the transformer blocks matches --targets {' '.join(cfg.targets)}")
    if cfg.scope == "global" and len(dtypes) > 1:
        raise UserError(f"--scope global needs one dtype across targets, found {sorted(map(str, dtypes))}")


def target_order(units: list[Unit]) -> list[str]:
    """Every target in visiting order (blocks in order, names sorted within a block): the order a
    global threshold's ties are pruned in."""
    return [n for u in units for n in u.targets]


def matches(rel: str, full: str, patterns) -> bool:
    """``rel`` (the name inside the block) or ``full`` matches one of the globs."""
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(full, p) for p in patterns)
