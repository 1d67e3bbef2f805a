"""Same inputs, seed and settings: the same bytes, in another process and on another number of threads.

The magnitude kernels, Wanda and the sparse formats give identical bytes on 1 or 2 threads.
SparseGPT's solver runs BLAS (Cholesky, matmuls), whose float sums depend on the thread count:
identical bytes across processes at one thread count, and across thread counts the same masks
with weights within a rounding step of the checkpoint's dtype (tested below, and recorded:
sparsity.json's run.environment holds the versions and thread counts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numba
import pytest
import torch

from llm_prune import PruneConfig, Sparsity, prune_checkpoint
from llm_prune.calibration import CalibConfig, embedded_passages

from .conftest import save_tiny, tiny_llama_config
from .helpers import add_tokenizer, digest, load_dir

CASES = [("omp", None, 0.5, "layer", "dense"), ("omp", None, 0.4, "global", "bitmask"),
         ("omp", "2:4", None, "layer", "packed24"), ("wanda", None, 0.5, "layer", "dense"),
         ("wanda", "2:4", None, "layer", "packed24"), ("sparsegpt", None, 0.5, "layer", "dense")]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    src = add_tokenizer(save_tiny(root / "src", tiny_llama_config(hidden_size=64, intermediate_size=128)))
    (root / "calib.txt").write_text("\n\n".join(embedded_passages("calib")[:20]))
    return src, root / "calib.txt"


def export(src, calib_text, out, method, pattern, sparsity, scope, fmt):
    cfg = PruneConfig(method, Sparsity.parse(sparsity, pattern), scope)
    calib = CalibConfig(source=str(calib_text), nsamples=8, seqlen=32, blocksize=16)
    return prune_checkpoint(src, cfg, out, fmt=fmt, calib=calib, progress=False)


def on_threads(n: int, fn):
    """Run ``fn`` with n threads for torch and the kernels (numba's OpenMP layer shares torch's)."""
    before = (torch.get_num_threads(), numba.get_num_threads())
    torch.set_num_threads(n)
    numba.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])


@pytest.mark.parametrize("case", CASES, ids=["-".join(str(x) for x in c if x) for c in CASES])
def test_same_bytes_on_one_or_two_threads(source, tmp_path, case):
    src, calib = source
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba was started with one thread")
    reports = [on_threads(n, lambda n=n: export(src, calib, tmp_path / f"t{n}", *case)) for n in (1, 2)]
    assert reports[0]["run"]["environment"]["torch_threads"] == 1
    assert reports[1]["run"]["environment"]["torch_threads"] == 2
    if case[0] != "sparsegpt":
        assert digest(tmp_path / "t1") == digest(tmp_path / "t2")
        return
    # SparseGPT: BLAS sums in another order; the same masks, weights within a rounding step
    a, b = load_dir(tmp_path / "t1"), load_dir(tmp_path / "t2")
    for name in reports[0]["achieved"]["tensors"]:
        x, y = a[name].float(), b[name].float()
        assert torch.equal(x != 0, y != 0), name
        assert (x - y).abs().max() <= 2 ** -7 * x.abs().max(), name  # bf16 keeps 8 significant bits


CHILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.test_determinism import export
a = json.loads(sys.argv[2])
export(Path(a["src"]), Path(a["calib"]), Path(a["out"]), *a["case"])
"""


@pytest.mark.parametrize("method", ["omp", "wanda", "sparsegpt"])
def test_same_bytes_in_another_process(source, tmp_path, method):
    src, calib = source
    case = next(c for c in CASES if c[0] == method)
    export(src, calib, tmp_path / "here", *case)
    args = json.dumps({"src": str(src), "calib": str(calib), "out": str(tmp_path / "there"), "case": list(case)})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", CHILD, root, args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-1500:]
    assert digest(tmp_path / "here") == digest(tmp_path / "there")
    env = json.loads((tmp_path / "there" / "sparsity.json").read_text())["run"]["environment"]
    assert {"torch", "transformers", "torch_threads", "numba_threads"} <= env.keys()
    if method == "sparsegpt":  # its bytes follow the BLAS threads of the triangular inverse too
        pytest.importorskip("threadpoolctl", reason="the BLAS thread counts are read with threadpoolctl")
        assert any("openblas" in lib and n >= 1 for lib, n in env["blas_threads"].items()), env["blas_threads"]
