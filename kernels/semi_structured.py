"""2:4 nn.Linear weights on sparse tensor cores, through core torch's semi-structured tensors.

torch has two backends (torch/sparse/semi_structured.py):

* cuSPARSELt (``SparseSemiStructuredTensorCUSPARSELT``, torch's default when available): the
  compressed weight is one opaque buffer made by ``torch._cslt_compress(dense)``; its layout is
  private to cuSPARSELt, so it can only be built from a dense CUDA tensor.
* CUTLASS (``SparseSemiStructuredTensorCUTLASS``): kept values [R, C/2] plus int16 metadata in a
  documented order (2 bits per kept value, then a fixed reordering). Our ``packed24`` values are
  exactly CUTLASS's kept values and our metadata bytes are its metadata before reordering (see
  kernels/formats.py), so ``packed24`` becomes a CUTLASS weight with one gather-free scatter and
  no dense tensor ever exists — that is the direct path.

``to_semi_structured(model, packed24=...)`` takes the direct path for layers whose packed24 parts
are given (backend ``auto`` then means CUTLASS); otherwise it compresses the dense weight with
torch's default backend. Layers that are not 2:4, not fp16/bf16, not on CUDA or not of a shape the
backend accepts stay dense and are listed with the reason.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from llm_prune.errors import UserError

from .formats import _decode_packed24_torch

BACKENDS = ("auto", "cutlass", "cusparselt")
DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class SemiStructuredReport:
    """Which Linear layers run on sparse tensor cores, and why the others do not."""

    converted: dict[str, str] = field(default_factory=dict)  # module name -> backend
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> reason

    def summary(self) -> str:
        return f"{len(self.converted)} Linear layers on 2:4 sparse tensor cores, {len(self.skipped)} kept dense"


def cutlass_parts_from_packed24(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CUTLASS (packed, meta) from packed24 parts, on their device, without a dense tensor.

    Pure tensor code (runs on CPU too, which is how it is tested against torch's own
    ``sparse_semi_structured_from_dense_cutlass``). Needs rows % 32 == 0 and columns % 16 == 0.
    """
    from torch.sparse._semi_structured_conversions import _calculate_meta_reordering_scatter_offsets

    rows, half = values.shape
    cols = 2 * half
    if rows % 32 or cols % 16:
        raise UserError(f"a {rows}x{cols} weight does not fit CUTLASS 2:4 tiles (rows % 32, columns % 16)")
    if sys.byteorder != "little":  # two metadata bytes are read as one little-endian int16
        raise UserError("the packed24 -> CUTLASS conversion assumes a little-endian machine")
    meta16 = meta.contiguous().view(torch.int16)  # [rows, cols/16]: 4 groups per element
    ncols = meta16.shape[1]
    offsets = _calculate_meta_reordering_scatter_offsets(rows, ncols, torch.int16, meta.device)
    reordered = meta16.new_empty(rows * ncols)
    reordered.scatter_(0, offsets, meta16.reshape(-1))
    return values.contiguous(), reordered.view(rows, ncols)


def require_cuda() -> None:
    """The check ``--runtime semi-structured`` makes before anything is loaded."""
    if not torch.cuda.is_available():
        raise UserError("--runtime semi-structured needs a CUDA GPU (Ampere or newer) and a CUDA build of torch; "
                        "on this machine use the default dense runtime, which decodes sparse checkpoints exactly")


def apply_runtime(model: nn.Module, runtime: str) -> nn.Module:
    """``dense``: the model as loaded; ``semi-structured``: eligible 2:4 Linears on sparse tensor cores."""
    if runtime == "semi-structured":
        report = to_semi_structured(model)
        print(report.summary() + (f"; kept dense: {', '.join(sorted(report.skipped))}" if report.skipped else ""))
    return model


def to_semi_structured(model: nn.Module, *, packed24: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                       backend: str = "auto", only: set[str] | None = None) -> SemiStructuredReport:
    """Swap every eligible 2:4 ``nn.Linear`` weight for a semi-structured sparse one, in place.

    ``packed24`` maps parameter names (``"model.layers.0.mlp.up_proj.weight"``) to the stored
    ``(values, meta)`` of that weight; those layers are built without a dense round trip when the
    backend is CUTLASS (``auto`` picks CUTLASS for them). ``only``: module names to consider
    (default all). Raises UserError without CUDA.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown semi-structured backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    require_cuda()
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cusparselt_ok = torch.backends.cusparselt.is_available()
    if backend == "cusparselt" and not cusparselt_ok:
        raise UserError("this torch build has no cuSPARSELt; use --semi-structured-backend cutlass")
    packed24 = packed24 or {}
    report = SemiStructuredReport()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or (only is not None and name not in only):
            continue
        parts = packed24.get(f"{name}.weight" if name else "weight")
        use = backend
        if use == "auto":
            use = "cutlass" if parts is not None or not cusparselt_ok else "cusparselt"
        cls = SparseSemiStructuredTensorCUTLASS if use == "cutlass" else SparseSemiStructuredTensorCUSPARSELT
        reason = _ineligible(mod.weight, cls, parts is not None)
        if reason:
            report.skipped[name] = reason
            continue
        weight = _build(mod.weight, parts, cls)
        mod.weight = nn.Parameter(weight, requires_grad=False)
        report.converted[name] = use + (" (from packed24)" if parts is not None and use == "cutlass" else "")
    return report


def _ineligible(w: torch.Tensor, cls, from_packed: bool) -> str | None:
    """Why ``w`` cannot become a ``cls`` weight, or None. Checked per layer, cheapest first."""
    if w.device.type != "cuda" and not from_packed:  # packed parts may come with a meta/CPU placeholder
        return f"weight is on {w.device}, not CUDA"
    if w.dtype not in DTYPES or w.dtype not in cls._DTYPE_SHAPE_CONSTRAINTS:
        return f"dtype {w.dtype} (sparse tensor cores take fp16 or bf16)"
    rows, cols = w.shape
    c = cls._DTYPE_SHAPE_CONSTRAINTS[w.dtype]
    if rows % c.sparse_min_rows or cols % c.sparse_min_cols or rows < c.sparse_min_rows or cols < c.sparse_min_cols:
        return (f"shape {rows}x{cols} is not a multiple of the {cls.BACKEND} tile "
                f"{c.sparse_min_rows}x{c.sparse_min_cols}")
    if not from_packed:
        groups = (w.detach() != 0).view(rows, cols // 4, 4).sum(-1)
        if bool((groups > 2).any()):
            return "not 2:4 sparse"
    return None


def _build(w: torch.Tensor, parts, cls):
    if parts is None:
        return cls.from_dense(w.detach().contiguous())
    device = w.device if w.device.type == "cuda" else torch.device("cuda")
    values, meta = (p.to(device) for p in parts)
    if tuple(values.shape) != (w.shape[0], w.shape[1] // 2) or values.dtype != w.dtype:
        raise UserError(f"packed24 values of shape {tuple(values.shape)} {values.dtype} do not match a "
                        f"{tuple(w.shape)} {w.dtype} weight")
    if cls.BACKEND != "cutlass":  # cuSPARSELt's layout is private: decode on the GPU, then compress
        return cls.from_dense(_decode_packed24_torch("weight", values, meta, tuple(w.shape), w.dtype))
    packed, meta_reordered = cutlass_parts_from_packed24(values, meta)
    return cls(w.shape, packed=packed, meta=meta_reordered, packed_t=None, meta_t=None,
               compressed_swizzled_bitmask=None, requires_grad=False)
