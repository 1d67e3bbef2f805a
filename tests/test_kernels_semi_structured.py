"""2:4 Linear weights for sparse tensor cores: the packed24 -> CUTLASS path checked on CPU against
torch's own conversion; the matmuls themselves need CUDA and skip with a reason without it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from llm_prune.errors import UserError
from llm_prune.kernels import formats as F
from llm_prune.kernels.semi_structured import cutlass_parts_from_packed24, to_semi_structured

from llm_prune.magnitude import nm_keep

from .helpers import pruned_24

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="semi-structured sparse matmul runs only on a CUDA GPU "
                                                 "(Ampere or newer); this machine has none")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed24_to_cutlass_equals_torch_conversion(dtype):
    w = pruned_24(64, 96, dtype)
    w[5, :16] = 0  # groups with fewer than two non-zeros: explicit zeros at CUTLASS's positions
    w[6, 0:4] = torch.tensor([0, 0, 0, 1.0], dtype=dtype)
    w[7, 4:8] = torch.tensor([0, 1.0, 0, 0], dtype=dtype)
    stored, _ = F.encode("w", w, "packed24")
    packed, meta = cutlass_parts_from_packed24(stored["w.values"], stored["w.meta"])
    ref_packed, ref_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert torch.equal(packed.view(torch.int16), ref_packed.view(torch.int16))
    assert torch.equal(meta, ref_meta)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta).view(torch.int16), w.view(torch.int16))


def test_packed24_to_cutlass_rejects_untileable_shape():
    stored, _ = F.encode("w", pruned_24(48, 64, torch.float16), "packed24")  # 48 rows: not a multiple of 32
    with pytest.raises(UserError, match="does not fit CUTLASS"):
        cutlass_parts_from_packed24(stored["w.values"], stored["w.meta"])


@pytest.mark.skipif(CUDA, reason="checks the message shown when no CUDA GPU is present")
def test_cpu_says_it_needs_cuda():
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        to_semi_structured(nn.Sequential(nn.Linear(64, 64)))


def test_unknown_backend_rejected():
    with pytest.raises(UserError, match="unknown semi-structured backend"):
        to_semi_structured(nn.Sequential(nn.Linear(64, 64)), backend="magic")


def _model(dtype, device):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 128, bias=False), nn.Linear(128, 96),
                      nn.Linear(96, 256)).to(dtype).to(device)
    with torch.no_grad():
        for lin in list(m)[:3]:
            lin.weight.copy_(torch.where(nm_keep(lin.weight.cpu(), 2, 4).to(device), lin.weight, 0))
    return m  # layer 3 stays dense (not 2:4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "cutlass", "cusparselt"])
def test_semi_structured_matches_dense(dtype, backend):
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        pytest.skip("this torch build has no cuSPARSELt")
    m = _model(dtype, "cuda")
    x = torch.randn(3, 7, 256, dtype=dtype, device="cuda")  # token counts below the tile minimum
    ref = m(x)
    report = to_semi_structured(m, backend=backend)
    assert sorted(report.converted) == ["0", "1", "2"]
    assert "3" in report.skipped and "not 2:4" in report.skipped["3"]
    out = m(x)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_direct_from_packed24_matches_dense(dtype):
    m = _model(dtype, "cuda")
    x = torch.randn(64, 256, dtype=dtype, device="cuda")
    ref = m(x)
    packed = {}
    for i in range(3):
        stored, _ = F.encode("w", m[i].weight.detach().cpu(), "packed24")
        packed[f"{i}.weight"] = (stored["w.values"], stored["w.meta"])
    report = to_semi_structured(m, packed24=packed)
    assert all(report.converted[str(i)] == "cutlass (from packed24)" for i in range(3))
    torch.testing.assert_close(m(x), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_ineligible_layers_listed():
    m = nn.Sequential(nn.Linear(64, 64).float().cuda(), nn.Linear(64, 64).half().cpu(),
                      nn.Linear(60, 64).half().cuda())
    report = to_semi_structured(m)
    assert not report.converted
    assert "dtype" in report.skipped["0"] and "not CUDA" in report.skipped["1"] and "shape" in report.skipped["2"]
