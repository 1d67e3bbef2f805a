"""End-to-end evaluation of the real SmolLM2-135M, dense beside a 50% OMP copy, through the CLI
module. The default test is kept small (a few documents: the 2-core CPU does ~1 request/s); the
slow one checks accuracies against chance with enough documents and MMLU's categories against
lm-eval's own group aggregation. (Data-parallel runs need GPUs: lm-eval splits requests only on
CUDA devices; the argument plumbing is tested in test_eval.py.)"""

from __future__ import annotations

import argparse
import json
import pytest

from llm_prune import PruneConfig, Sparsity, prune_checkpoint
from llm_prune.eval import cli


@pytest.fixture(scope="module")
def pruned_dir(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "smollm2-omp-0.5"
    prune_checkpoint(smollm2_dir, PruneConfig(sparsity=Sparsity(0.5)), out, progress=False)
    return out


def _run(argv):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return cli.run(p.parse_args(argv))


def _rows(out):
    data = json.loads((out / "results.json").read_text())
    return data, {(r["task"], r["metric"]): r for r in data["rows"]}


def test_eval_cli_dense_vs_pruned(smollm2_dir, pruned_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))  # a cold baseline cache: really evaluate dense
    import lm_eval.evaluator

    diagnostics = []  # lm-eval's environment report costs seconds per call and is not used: skipped
    spy = lambda *a, **k: diagnostics.append(a)  # noqa: E731
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", spy)
    out = tmp_path / "report"
    rc = _run([str(pruned_dir), "--dense", str(smollm2_dir), "--tasks", "mmlu,arc_easy,ppl", "--fewshot", "0",
               "--limit", "2", "--mmlu-subjects", "anatomy,marketing", "--batch-size", "8", "--device", "cpu",
               "--data", "local", "--seqlen", "128", "--ppl-windows", "4", "--out", str(out), "--quiet"])
    assert rc == 0
    assert diagnostics == [] and lm_eval.evaluator.add_env_info is spy  # skipped, then put back
    printed = capsys.readouterr().out
    assert "drop (+ = worse)" in printed and "mmlu/stem" in printed
    data, rows = _rows(out)
    assert set(rows) == {("mmlu", "acc"), ("mmlu/stem", "acc"), ("mmlu/other", "acc"), ("arc_easy", "acc"),
                         ("arc_easy", "acc_norm"), ("ppl", "ppl")}
    for r in rows.values():
        assert r["dense"] is not None and r["pruned"] is not None and r["drop"] is not None
    ev = data["evaluated"]["tasks"]
    assert ev["mmlu"]["n"] == 4 and ev["mmlu"]["categories"]["stem"]["n"] == 2  # 2 questions x 2 subjects
    assert ev["mmlu"]["metrics"]["acc"] in (0, 0.25, 0.5, 0.75, 1)
    assert ev["arc_easy"]["n"] == 2 and ev["arc_easy"]["throughput"]["requests"] >= 6  # 3-5 choices each
    # Token perplexity of real weights on Wikipedia text: tens at this short window (a random init
    # gives ~50,000); removing half of every matrix by magnitude costs a lot at 135M.
    dense_ppl, pruned_ppl = rows["ppl", "ppl"]["dense"], rows["ppl", "ppl"]["pruned"]
    assert 10 < dense_ppl < 80, dense_ppl
    assert pruned_ppl > 2 * dense_ppl
    proto = ev["ppl"]["protocol"]
    assert (proto["seqlen"], proto["windows"], proto["predicted_tokens"]) == (128, 4, 4 * 127)
    assert "BoolQ" in proto["source"]
    assert data["evaluated"]["versions"]["lm_eval"] and ev["arc_easy"]["version"] == 1.0
    report = (out / "report.md").read_text()
    assert "| ppl | ppl |" in report and "seqlen 128" in report


@pytest.mark.slow
def test_eval_above_chance_and_categories_match_lm_eval(smollm2_dir, pruned_dir, tmp_path, monkeypatch):
    from llm_prune.eval import EvalSettings, evaluate_pruned

    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))
    s = EvalSettings(fewshot=5, limit=1, batch_size=8, device="cpu", data="local", progress=False)
    payload = evaluate_pruned(smollm2_dir, pruned_dir, ["mmlu"], s, tmp_path / "mmlu", echo=False)
    mmlu = payload["dense_baseline"]["tasks"]["mmlu"]
    assert mmlu["n"] == 57 and {c: v["n"] for c, v in mmlu["categories"].items()} == \
        {"stem": 19, "humanities": 13, "social_sciences": 12, "other": 13}
    # Our category numbers are lm-eval's own group aggregation.
    assert mmlu["metrics"]["acc"] == pytest.approx(mmlu["lm_eval_groups"]["mmlu_local"])
    for c, v in mmlu["categories"].items():
        assert v["acc"] == pytest.approx(mmlu["lm_eval_groups"][f"mmlu_local_{c}"])
    s = EvalSettings(limit=100, batch_size=8, device="cpu", data="local", progress=False)
    payload = evaluate_pruned(smollm2_dir, pruned_dir, ["arc_easy", "piqa"], s, tmp_path / "zs", echo=False)
    dense = payload["dense_baseline"]["tasks"]
    assert dense["arc_easy"]["metrics"]["acc"] > 0.40  # chance 0.25
    assert dense["piqa"]["metrics"]["acc"] > 0.58  # chance 0.5
