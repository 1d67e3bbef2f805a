"""A run killed anywhere (SIGKILL: no cleanup, no handler) and resumed gives the bytes of a run never killed.

A child process prunes with one function wrapped to kill the process at a chosen call: in the
middle of a shard (a piece of a target written, the rest not), right before a finished shard is
renamed into place, after a unit is logged, right before the output directory is published,
and, for SparseGPT, in the middle of saving a block's calibration inputs. The parent then
resumes in-process and compares every shard with an uninterrupted export.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from llm_prune import PruneConfig, Sparsity, UserError, prune_checkpoint
from llm_prune.calibration import CalibConfig, embedded_passages
from llm_prune.writer import Stage

from .conftest import save_tiny, tiny_llama_config
from .helpers import add_tokenizer, digest

CHILD = r"""
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
a = json.loads(sys.argv[2])
import llm_prune.pipeline as P, llm_prune.writer as W, llm_prune.sequential as S, llm_prune.paths as paths
from tests.test_faults import export

calls = [0]
def killing(real):
    def wrapper(*args, **kw):
        calls[0] += 1
        if calls[0] == a["at"]:
            if a.get("half_file"):  # a calibration file half written, then the kill
                path = args[0].tmp / S._inputs_file(args[1])
                path.with_name(path.name + ".tmp").write_bytes(b"\0" * 100)
            if a.get("after"):
                real(*args, **kw)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kw)
    return wrapper

owner = {"ShardFile.write": W.ShardFile, "ShardWriter.commit": W.ShardWriter, "ShardWriter.write": W.ShardWriter,
         "StagedShard.finish": W.StagedShard}
if a["point"] in owner:
    cls = owner[a["point"]]
    name = a["point"].split(".")[1]
    setattr(cls, name, killing(getattr(cls, name)))
elif a["point"] == "publish":
    W.publish_dir = killing(W.publish_dir)
elif a["point"] == "save_inputs":
    S._save_inputs = killing(S._save_inputs)
P.PIECE_BYTES = a.get("piece_bytes", P.PIECE_BYTES)
P.DIRECT_IO = a.get("direct_io", P.DIRECT_IO)
P.DIRECT_MIN_BYTES = 0  # the tiny model's shards are staged where the file system allows
export(Path(a["src"]), Path(a["calib"]), Path(a["out"]), a["method"], a["fmt"])
sys.exit(3)  # the kill never came: the test is wrong
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    src = add_tokenizer(save_tiny(root / "src", tiny_llama_config(hidden_size=64, intermediate_size=128)))
    (root / "calib.txt").write_text("\n\n".join(embedded_passages("calib")[:20]))
    return src, root / "calib.txt"


def export(src, calib_text, out, method="omp", fmt="dense", resume=False):
    cfg = PruneConfig(method, Sparsity(0.5))
    calib = CalibConfig(source=str(calib_text), nsamples=8, seqlen=32, blocksize=16)
    return prune_checkpoint(src, cfg, out, fmt=fmt, calib=calib, resume=resume, progress=False)


def killed(source, out, point, at, method="omp", fmt="dense", **extra):
    src, calib = source
    args = {"src": str(src), "calib": str(calib), "out": str(out), "method": method, "fmt": fmt, "point": point,
            "at": at, **extra}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", CHILD, root, json.dumps(args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == -9, f"the child was not killed ({done.returncode}): {done.stderr[-1500:]}"
    assert not out.exists()  # nothing published by a killed run


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    refs = {}
    for method, fmt in [("omp", "dense"), ("omp", "bitmask"), ("sparsegpt", "dense")]:
        out = tmp_path_factory.mktemp("ref") / "o"
        export(*source, out, method, fmt)
        refs[(method, fmt)] = digest(out)
    return refs


@pytest.mark.parametrize("point,at,method,fmt,extra", [
    ("ShardFile.write", 3, "omp", "dense", {"piece_bytes": 256, "direct_io": False}),  # a target half written
    ("StagedShard.finish", 2, "omp", "dense", {}),  # a block staged in memory, not yet written
    ("StagedShard.finish", 2, "omp", "dense", {"after": True}),  # written past the page cache, not renamed
    ("ShardWriter.commit", 2, "omp", "dense", {}),  # a block written, not yet renamed and logged
    ("ShardWriter.commit", 2, "omp", "dense", {"after": True}),  # right after a block is logged
    ("ShardWriter.write", 3, "omp", "bitmask", {}),  # a compressed shard, from the writer thread
    ("publish", 1, "omp", "dense", {}),  # everything written, the final rename not done
    ("save_inputs", 2, "sparsegpt", "dense", {"half_file": True}),  # calibration inputs half saved
    ("ShardWriter.commit", 3, "sparsegpt", "dense", {"after": True}),
], ids=["mid-block", "staged", "staged-written", "before-commit", "after-commit", "compressed", "before-publish", "calibration-save",
        "sparsegpt-after-commit"])
def test_killed_then_resumed_gives_the_same_bytes(source, reference, tmp_path, point, at, method, fmt, extra):
    if point.startswith("StagedShard") and not Stage(tmp_path).direct:
        pytest.skip(f"{tmp_path}'s file system refuses O_DIRECT: exports there never stage shards")
    out = tmp_path / "o"
    killed(source, out, point, at, method, fmt, **extra)
    export(*source, out, method, fmt, resume=True)
    assert digest(out) == reference[(method, fmt)]
    assert not out.with_name(".o.partial").exists()


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_killed_at_random_pieces(source, reference, tmp_path, seed):
    at = random.Random(seed).randint(1, 400)
    out = tmp_path / "o"
    killed(source, out, "ShardFile.write", at, piece_bytes=128, direct_io=False)
    export(*source, out, resume=True)
    assert digest(out) == reference[("omp", "dense")]


def test_a_source_changed_before_resume_is_refused(source, tmp_path):
    import shutil

    src = shutil.copytree(source[0], tmp_path / "src")
    out = tmp_path / "o"
    killed((src, source[1]), out, "ShardWriter.commit", 2, after=True)
    shard = sorted(src.glob("*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # touched: maybe changed
    with pytest.raises(UserError, match="belongs to a run with other settings or another checkpoint"):
        export(src, source[1], out, resume=True)
