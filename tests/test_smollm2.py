"""End to end on the real SmolLM2-135M weights: CLI -> exported checkpoint -> transformers."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_prune.cli import main
from tests.test_masks import reference_keep

TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
        "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
        "Locally nicknamed La dame de fer, it was constructed as the centerpiece of the 1889 World's Fair.")


def perplexity(model, ids):
    with torch.no_grad():
        return model(ids, labels=ids).loss.exp().item()


@pytest.fixture(scope="module")
def dense(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)(TEXT, return_tensors="pt").input_ids


def test_omp_half_on_real_weights(smollm2_dir, dense, ids, tmp_path, capsys):
    out = tmp_path / "smol-omp-0.5"
    assert main(["smollm2-135m", "--method", "omp", "--sparsity", "0.5", "--out", str(out), "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert "mlp.down_proj" in summary and "peak RSS" in summary and "all targets" in summary

    report = json.loads((out / "sparsity.json").read_text())
    assert len(report["source"]["files"]) == 5  # the embedded checkpoint is sharded
    assert report["achieved"]["targeted_params"] == 106_168_320
    assert report["achieved"]["targeted"] == pytest.approx(0.5, abs=1e-6)
    assert report["achieved"]["all_parameters"] == pytest.approx(0.3946, abs=1e-3)

    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # The same pruning done the simple way on the in-memory dense model gives the same logits.
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        for m in reference.model.layers.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(reference_keep(m.weight, int(round(0.5 * m.weight.numel()))))
    reference = reference.float().eval()
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, reference(ids).logits)

    ppl_dense, ppl_pruned = perplexity(dense, ids), perplexity(pruned, ids)
    assert ppl_dense < 15  # real weights: a random init gives tens of thousands
    assert ppl_dense < ppl_pruned < 40 * ppl_dense


def test_global_and_24_on_real_weights(smollm2_dir, dense, ids, tmp_path):
    ppl = {}
    for args in (["--sparsity", "0.3", "--scope", "global"], ["--pattern", "2:4"]):
        out = tmp_path / "-".join(a.strip("-") for a in args)
        assert main(["smollm2-135m", *args, "--out", str(out), "--quiet"]) == 0
        report = json.loads((out / "sparsity.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        ppl[args[1]] = perplexity(model, ids)
        if args[1] == "2:4":
            # Achieved sparsity counts every zero: a few kept weights were exactly zero already.
            assert all(0.5 <= v["sparsity"] < 0.5001 for v in report["achieved"]["by_type"].values())
            from llm_prune.magnitude import is_nm
            assert all(is_nm(m.weight != 0, 2, 4) for m in model.model.layers.modules()
                       if isinstance(m, torch.nn.Linear))
        else:
            assert report["achieved"]["targeted"] == pytest.approx(0.3, abs=1e-7)
            by_type = [v["sparsity"] for v in report["achieved"]["by_type"].values()]
            assert max(by_type) - min(by_type) > 0.05  # a global threshold spreads sparsity unevenly
            assert report["threshold"]["magnitude"] > 0
    assert perplexity(dense, ids) < ppl["0.3"] < ppl["2:4"]
