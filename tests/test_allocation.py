"""Per-block allocations (uniform, owl, alpha): exact to the weight, inside the band, the metrics
on inputs worked by hand, and the exports they make."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from llm_prune import allocation as A
from llm_prune.cli import main
from llm_prune.config import PruneConfig, Sparsity
from llm_prune.magnitude import prune_count
from llm_prune.methods.sparsegpt import sparsegpt_prune
from llm_prune.methods.wanda import InputNorms, row_keep
from llm_prune.spectrum import hill_alpha

from .helpers import add_tokenizer, digest, interrupted_after_writes, load_dir


# -- the shares ---------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10, allow_nan=False), st.lists(st.integers(1, 5000), min_size=1, max_size=4)),
                min_size=1, max_size=12),
       st.floats(0, 0.95), st.sampled_from(["owl", "alpha"]), st.floats(0, 0.5))
def test_shares_are_exact_and_inside_the_band(blocks, s, kind, band):
    names = {b: [f"{b}.{i}" for i in range(len(sizes))] for b, (_, sizes) in enumerate(blocks)}
    numels = {f"{b}.{i}": n for b, (_, sizes) in enumerate(blocks) for i, n in enumerate(sizes)}
    metric = {b: m for b, (m, _) in enumerate(blocks)}
    total = sum(numels.values())
    cfg = PruneConfig(sparsity=Sparsity(s), allocation=kind, band=band)
    lo, hi = A.band_edges(s, band)
    his = [min(math.ceil(hi * sum(sz)), sum(sz) - 1) for _, sz in blocks]
    if prune_count(total, s) > sum(his):  # too sparse to leave every block a weight inside the band: refused
        with pytest.raises(A.UserError, match="cannot be shared out"):
            A.allocate(cfg, metric, names, numels)
        return
    shares = A.allocate(cfg, metric, names, numels)
    assert sum(shares.counts.values()) == prune_count(total, s)  # exact, to the weight
    for b, ns in names.items():
        n = sum(numels[x] for x in ns)
        c = sum(shares.counts[x] for x in ns)
        assert math.floor(lo * n) <= c <= math.ceil(hi * n) and c < n  # the band, edges rounded outward
        for x in ns:  # every matrix at its block's sparsity, to the weight
            assert abs(shares.counts[x] - c * numels[x] / n) < 1
            assert prune_count(numels[x], shares.sparsity(x).ratio) == shares.counts[x]


def test_too_sparse_for_the_band_is_refused():
    cfg = PruneConfig(sparsity=Sparsity(0.9), allocation="alpha", band=0.0)
    with pytest.raises(A.UserError, match="cannot be shared out"):
        A.allocate(cfg, {0: 1.0, 1: 2.0}, {0: ["a"], 1: ["b"]}, {"a": 2, "b": 2})


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 2 ** 40).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_a_count_survives_its_ratio(cn):
    count, numel = cn
    assert prune_count(numel, Sparsity.of_count(count, numel).ratio) == count


def test_owl_map_by_hand():
    """OWL: ratios 0.1, 0.3, 0.2 at s = 0.5, λ = 0.08 -> keep (0, 0.16, 0.08) shifted to mean 0.5:
    sparsities 0.58, 0.42, 0.50 (more outliers, less pruned), the mean exactly 0.5."""
    cfg = PruneConfig(sparsity=Sparsity(0.5), allocation="owl")
    blocks = {b: [f"w{b}"] for b in range(3)}
    shares = A.allocate(cfg, {0: 0.1, 1: 0.3, 2: 0.2}, blocks, {f"w{b}": 1000 for b in range(3)})
    assert [shares.counts[f"w{b}"] for b in range(3)] == [580, 420, 500]


def test_lopsided_spread_stays_in_the_band():
    """One block far above the rest: OWL's plain shift would put it at s - 2λ(1 - 1/B); clipped
    to s - λ instead, and the others re-balanced so that the mean holds."""
    cfg = PruneConfig(sparsity=Sparsity(0.5), allocation="owl", band=0.1)
    blocks = {b: [f"w{b}"] for b in range(4)}
    shares = A.allocate(cfg, {0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0}, blocks, {f"w{b}": 300 for b in range(4)})
    assert [shares.counts[f"w{b}"] for b in range(4)] == [120, 160, 160, 160]


def test_unclipped_is_owls_plain_shift():
    """The same lopsided spread with --allocation-unclipped: raw sparsities (0, .2, .2, .2) shifted
    by t = 0.5 - 0.15 = 0.35 to (0.35, 0.55, 0.55, 0.55), as OWL's reference code: block 0 leaves
    the band (0.35 < 0.4) and the mean is still exactly 0.5."""
    cfg = PruneConfig(sparsity=Sparsity(0.5), allocation="owl", band=0.1, clip=False)
    blocks = {b: [f"w{b}"] for b in range(4)}
    shares = A.allocate(cfg, {0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0}, blocks, {f"w{b}": 300 for b in range(4)})
    assert [shares.counts[f"w{b}"] for b in range(4)] == [105, 165, 165, 165]
    assert shares.report({})["clipped"] is False and "clipped" not in A.allocate(
        PruneConfig(sparsity=Sparsity(0.5), allocation="owl", band=0.1), {0: 1.0, 1: 0.0}, {0: ["a"], 1: ["b"]},
        {"a": 10, "b": 10}).report({})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10, allow_nan=False), st.integers(1, 5000)), min_size=1, max_size=12),
       st.floats(0, 0.95), st.floats(0, 0.5))
def test_unclipped_shares_are_exact_and_keep_a_weight(blocks, s, band):
    """Unclipped: still exact to the weight, every block in [0, 1) (a shift past 0 or 1 is clipped
    there and re-balanced), and the plain shift itself whenever it stays inside [0, 1]."""
    names = {b: [f"w{b}"] for b in range(len(blocks))}
    numels = {f"w{b}": n for b, (_, n) in enumerate(blocks)}
    metric = {b: m for b, (m, _) in enumerate(blocks)}
    total = sum(numels.values())
    if prune_count(total, s) > sum(n - 1 for n in numels.values()):
        return  # cannot leave every block a weight at all: refused, as clipped
    cfg = PruneConfig(sparsity=Sparsity(s), allocation="owl", band=band, clip=False)
    shares = A.allocate(cfg, metric, names, numels)
    assert sum(shares.counts.values()) == prune_count(total, s)
    assert all(0 <= shares.counts[f"w{b}"] < n for b, (_, n) in enumerate(blocks))
    raw = A.spread([metric[b] for b in range(len(blocks))], band, False)
    t = s - sum(n * r for (_, n), r in zip(blocks, raw)) / total
    if all(0 <= r + t <= 1 for r in raw):
        assert all(abs(shares.counts[f"w{b}"] - (r + t) * n) <= 1 for b, ((_, n), r) in enumerate(zip(blocks, raw)))


def test_unclipped_needs_an_allocation():
    with pytest.raises(A.UserError, match="--allocation-unclipped .* give it with --allocation owl or alpha"):
        PruneConfig(clip=False)
    assert PruneConfig(allocation="owl", clip=False).to_json()["clip"] is False
    assert "clip" not in PruneConfig(allocation="owl").to_json()  # clipped runs keep their resume keys


# -- the metrics ----------------------------------------------------------------------------------------
def test_outlier_ratio_by_hand():
    """Inputs with norms ||x|| = 1, 1, 1, 10 (the last feature an outlier channel):

        W1 = ones(2, 4) -> scores 1 1 1 10 on each row;  W2 = [0.5 0.5 0.5 0.5] -> 0.5 0.5 0.5 5
    mean of all 12 scores = (2·13 + 6.5) / 12 = 2.708; above 2 × mean = 5.417: the two 10s -> 2/12.
    With M = 1 (above 2.708): the 10s and the 5 -> 3/12."""
    norms = InputNorms(4)
    norms.add(torch.tensor([[1.0, 0, 0, 6], [0, 1, 0, 8], [0, 0, 1, 0]]))
    assert norms.norms.tolist() == [1, 1, 1, 10]
    from llm_prune.methods.wanda import wanda_scores

    scores = [wanda_scores(torch.ones(2, 4), norms.norms), wanda_scores(torch.full((1, 4), 0.5), norms.norms)]
    assert A.outlier_ratio(scores, 2.0) == 2 / 12
    assert A.outlier_ratio(scores, 1.0) == 3 / 12


def test_planted_heavy_tail_has_the_smaller_alpha():
    """Singular values i^-1 make eigenvalues i^-2: a rank-ordered power law whose Hill estimate
    with xmin at the median is 1 + k / (2k) = 1.5. A Gaussian matrix's spectrum (Marchenko-Pastur)
    has no tail: a larger α."""
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(256, 128, generator=g)
    u, _ = torch.linalg.qr(torch.randn(256, 128, generator=g))
    v, _ = torch.linalg.qr(torch.randn(128, 128, generator=g))
    planted = u @ torch.diag(torch.arange(1, 129, dtype=torch.float32) ** -1.0) @ v.T
    assert hill_alpha(planted) == pytest.approx(1.5, abs=0.05)
    assert hill_alpha(gauss) > hill_alpha(planted) + 1
    assert hill_alpha(torch.zeros(8, 8)) == hill_alpha(torch.eye(8))  # no tail at all: the cap


# -- exact counts inside the methods ---------------------------------------------------------------------
@pytest.mark.parametrize("count", [0, 1, 7, 50, 64, 95])
def test_rows_prune_exactly_the_count(count):
    score = torch.rand(8, 12, generator=torch.Generator().manual_seed(count))
    keep = row_keep(score, Sparsity.of_count(count, score.numel()))
    pruned = (~keep).sum(1)
    assert int(pruned.sum()) == count and int(pruned.max() - pruned.min()) <= 1
    if count % 8 == 0:  # whole rows: what the per-row rule gives
        assert torch.equal(keep, row_keep(score, Sparsity(count / 8 / 12)))


@pytest.mark.parametrize("count", [0, 33, 100, 129])
def test_sparsegpt_prunes_exactly_the_count(count):
    g = torch.Generator().manual_seed(1)
    W, X = torch.randn(6, 40, generator=g), torch.randn(200, 40, generator=g)
    _, keep = sparsegpt_prune(W, 2 * X.T @ X / 200, Sparsity.of_count(count, W.numel()), blocksize=16)
    assert int((~keep).sum()) == count


# -- exports ----------------------------------------------------------------------------------------------
def _blocks(out):
    report = json.loads((out / "sparsity.json").read_text())
    return report, {b: v["sparsity"] for b, v in report["allocation"]["blocks"].items()}


def _zeros(out):
    tensors = load_dir(out)
    ts = {n: t for n, t in tensors.items() if ".layers." in n and n.endswith("proj.weight")}
    return sum(int((t == 0).sum()) for t in ts.values()), sum(t.numel() for t in ts.values())


def test_alpha_export_with_omp(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))
    assert main([str(tiny_llama), "--sparsity", "0.6", "--allocation", "alpha", "--out", str(tmp_path / "a"),
                 "--quiet"]) == 0
    report, blocks = _blocks(tmp_path / "a")
    assert len(set(blocks.values())) == len(blocks) > 1  # blocks differ
    zeros, total = _zeros(tmp_path / "a")
    assert zeros == prune_count(total, 0.6) and report["achieved"]["targeted"] == zeros / total
    assert all(0.4 - 1e-3 <= v <= 0.8 + 1e-3 for v in blocks.values())  # edges: to the weight
    # the spectra are cached under the checkpoint's content: a second run computes none
    monkeypatch.setattr("llm_prune.spectrum.hill_alpha", lambda w: pytest.fail("recomputed a spectrum"))
    assert main([str(tiny_llama), "--sparsity", "0.6", "--allocation", "alpha", "--out", str(tmp_path / "b"),
                 "--quiet"]) == 0
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "ria"])
def test_owl_export(tiny_llama, tmp_path, method):
    add_tokenizer(tiny_llama)
    out = tmp_path / method
    assert main([str(tiny_llama), "--sparsity", "0.5", "--method", method, "--allocation", "owl", "--nsamples", "4",
                 "--seqlen", "32", "--out", str(out), "--quiet"]) == 0
    report, blocks = _blocks(out)
    assert len(set(blocks.values())) > 1 and all(0.42 - 1e-3 <= v <= 0.58 + 1e-3 for v in blocks.values())
    zeros, total = _zeros(out)
    assert zeros == prune_count(total, 0.5)
    assert report["allocation"]["owl_m"] == 5.0 and report["allocation"]["band"] == 0.08
    ratios = [v["outlier_ratio"] for v in report["allocation"]["blocks"].values()]
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])  # more outliers, less pruned
    assert [blocks[str(i)] for i in order] == sorted(blocks.values(), reverse=True)


@pytest.mark.parametrize("method", ["omp", "wanda"])
def test_uniform_is_todays_bytes(tiny_llama, tmp_path, method):
    if method != "omp":
        add_tokenizer(tiny_llama)
    common = [str(tiny_llama), "--sparsity", "0.5", "--method", method, "--nsamples", "4", "--seqlen", "32", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--allocation", "uniform", "--out", str(tmp_path / "uniform")]) == 0
    assert digest(tmp_path / "plain") == digest(tmp_path / "uniform")
    report = json.loads((tmp_path / "uniform" / "sparsity.json").read_text())
    assert "allocation" not in report


def test_uniform_config_json_unchanged():
    assert set(PruneConfig().to_json()) == {"method", "sparsity", "scope", "targets", "exclude", "pattern"}
    assert PruneConfig(allocation="alpha").to_json()["band"] == 0.2


def test_load_time_alpha_equals_the_export(tiny_llama, tmp_path, monkeypatch):
    from llm_prune import UserError, prune_checkpoint
    from llm_prune.loading import from_pretrained, set_sparsity
    from transformers import AutoModelForCausalLM

    from .helpers import assert_bitwise

    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))
    cfg = PruneConfig(sparsity=Sparsity(0.55), allocation="alpha", band=0.15)
    prune_checkpoint(tiny_llama, cfg, tmp_path / "out", progress=False)
    model = from_pretrained(tiny_llama, sparsity=0.55, allocation="alpha", allocation_band=0.15, progress=False)
    assert_bitwise(model, AutoModelForCausalLM.from_pretrained(tmp_path / "out"))
    with pytest.raises(UserError, match="shared out by --allocation alpha"):
        set_sparsity(model, 0.6)


def test_sweep_takes_an_allocation(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))
    add_tokenizer(tiny_llama)
    assert main(["sweep", str(tiny_llama), "--sparsities", "0.3,0.6", "--allocation", "alpha", "--eval", "ppl",
                 "--eval-seqlen", "16", "--eval-ppl-windows", "2", "--eval-data", "local", "--out",
                 str(tmp_path / "sw"), "--quiet"]) == 0
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert sweep["allocation"] == {"name": "alpha", "band": 0.2}
    assert [lv["how"] for lv in sweep["levels"]] == ["pruned while loading"] * 2  # each level shared out anew
    total = 27648  # the tiny llama's targets
    assert [lv["achieved"] for lv in sweep["levels"]] == [prune_count(total, 0.3) / total, prune_count(total, 0.6) / total]
    assert "allocation alpha ±0.2" in capsys.readouterr().out


def test_unclipped_plumbing(tiny_llama, tmp_path, monkeypatch, capsys):
    """--allocation-unclipped reaches the export (sparsity.json, closing table) and the sweep, whose
    alpha levels are pruned while loading: each level's zeros are the export's."""
    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))
    add_tokenizer(tiny_llama)
    common = ["--allocation", "alpha", "--allocation-band", "0.15", "--allocation-unclipped", "--quiet"]
    assert main([str(tiny_llama), "--sparsity", "0.5", *common, "--out", str(tmp_path / "x")]) == 0
    report, blocks = _blocks(tmp_path / "x")
    assert report["allocation"]["clipped"] is False
    assert min(blocks.values()) < 0.5 - 0.15 - 1e-3  # the tiny llama's spread is lopsided: one block leaves the band
    zeros, total = _zeros(tmp_path / "x")
    assert zeros == prune_count(total, 0.5)
    assert "(spread 2×0.15, unclipped)" in capsys.readouterr().out
    assert main(["sweep", str(tiny_llama), "--sparsities", "0.5", *common, "--eval", "ppl", "--eval-seqlen", "16",
                 "--eval-ppl-windows", "2", "--eval-data", "local", "--out", str(tmp_path / "sw")]) == 0
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert sweep["allocation"] == {"name": "alpha", "band": 0.15, "clipped": False}
    assert "allocation alpha ±0.15 unclipped" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["--pattern", "2:4", "--allocation", "alpha"], "--allocation alpha does not apply to an N:M pattern"),
    (["--sparsities", "0.3", "--allocation", "owl"], "which omp never reads"),
    (["--sparsities", "0.3", "--allocation", "alpha", "--finetune", "sst2"], "--finetune prunes uniformly"),
])
def test_sweep_refuses_bad_allocations(tiny_llama, tmp_path, capsys, args, match):
    capsys.readouterr()
    assert main(["sweep", str(tiny_llama), *args, "--out", str(tmp_path / "sw"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not (tmp_path / "sw").exists() and not (tmp_path / ".sw.partial").exists()


def test_owl_resume_reads_its_shares_back(tiny_llama, tmp_path, monkeypatch):
    from llm_prune import prune_checkpoint
    from llm_prune.calibration import CalibConfig, embedded_passages

    add_tokenizer(tiny_llama)
    (tmp_path / "calib.txt").write_text("\n\n".join(embedded_passages("calib")[:12]))
    calib = CalibConfig(source=str(tmp_path / "calib.txt"), nsamples=4, seqlen=32, seed=0)
    cfg = PruneConfig(method="wanda", sparsity=Sparsity(0.5), allocation="owl")
    prune_checkpoint(tiny_llama, cfg, tmp_path / "full", calib=calib, progress=False)
    with interrupted_after_writes(monkeypatch), pytest.raises(KeyboardInterrupt):
        prune_checkpoint(tiny_llama, cfg, tmp_path / "resumed", calib=calib, progress=False)
    monkeypatch.setattr("llm_prune.sequential.outlier_ratio", lambda *a: pytest.fail("OWL's first pass ran again"))
    report = prune_checkpoint(tiny_llama, cfg, tmp_path / "resumed", calib=calib, resume=True, progress=False)
    assert report["run"]["resumed_units"] == 2
    assert digest(tmp_path / "full") == digest(tmp_path / "resumed")


def test_alpha_with_a_calibrated_method(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))
    add_tokenizer(tiny_llama)
    out = tmp_path / "ria"
    assert main([str(tiny_llama), "--sparsity", "0.7", "--method", "ria", "--allocation", "alpha",
                 "--allocation-band", "0.1", "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--quiet"]) == 0
    report, blocks = _blocks(out)
    zeros, total = _zeros(out)
    assert zeros == prune_count(total, 0.7) and len(set(blocks.values())) > 1
    assert report["allocation"]["band"] == 0.1 and "owl_m" not in report["allocation"]
