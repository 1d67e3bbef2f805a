"""The study commands end to end: inspect (where the zeros are), sweep (the curve and its knee), report."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_prune import PruneConfig, Sparsity, prune_checkpoint
from llm_prune.cli import main
from llm_prune.study.similarity import load_masks

from .conftest import save_tiny, tiny_llama_config
from .helpers import add_tokenizer, load_dir

PPL = ["--eval", "ppl", "--eval-seqlen", "128", "--eval-ppl-windows", "2", "--eval-data", "local"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- inspect ------------------------------------------------------------------------------------------------
def two_magnitude_blocks(path):
    """Block 0's targets all have |w| = 1, block 1's |w| = 2: a global 0.5 prunes block 0 whole."""
    save_tiny(path, tiny_llama_config(num_hidden_layers=2))
    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if ".layers." in name and t.dim() == 2:
                block = int(name.split(".layers.")[1].split(".")[0])
                tensors[name] = torch.full_like(t, float(block + 1)) * torch.sign(torch.randn(t.shape)).to(t.dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return path


def test_inspect_global_by_hand(tmp_path, capsys):
    src = two_magnitude_blocks(tmp_path / "ck")
    code, out, _ = run(capsys, "inspect", src, "--sparsity", "0.5", "--scope", "global", "--out", tmp_path / "i", "--quiet")
    assert code == 0
    payload = json.loads((tmp_path / "i" / "inspect.json").read_text())
    assert all(v == 1.0 for v in payload["by_block"]["0"].values())
    assert all(v == 0.0 for v in payload["by_block"]["1"].values())
    assert payload["overall"]["fraction"] == 0.5
    assert "self_attn.q_proj" in out and (tmp_path / "i" / "inspect.png").stat().st_size > 0


@pytest.mark.parametrize("kw", [dict(sparsity=0.4, scope="global"), dict(sparsity=0.3, scope="layer"),
                                dict(pattern="2:4", scope="layer")])
def test_inspect_equals_the_exports_sparsity_json(tiny_llama, tmp_path, capsys, kw):
    cfg = PruneConfig(sparsity=Sparsity.parse(kw.get("sparsity"), kw.get("pattern")), scope=kw["scope"])
    report = prune_checkpoint(tiny_llama, cfg, tmp_path / "export", progress=False)
    args = ["--pattern", kw["pattern"]] if "pattern" in kw else ["--sparsity", kw["sparsity"]]
    assert run(capsys, "inspect", tiny_llama, *args, "--scope", kw["scope"], "--out", tmp_path / "i", "--quiet")[0] == 0
    inspected = json.loads((tmp_path / "i" / "inspect.json").read_text())
    assert inspected["tensors"] == report["achieved"]["tensors"]
    # ... and the export itself, inspected as stored, says the same.
    assert run(capsys, "inspect", tmp_path / "export", "--out", tmp_path / "s", "--quiet")[0] == 0
    assert json.loads((tmp_path / "s" / "inspect.json").read_text())["tensors"] == report["achieved"]["tensors"]


def test_inspect_refuses_calibrated_methods_and_bad_sparsity(tiny_llama, tmp_path, capsys):
    code, _, err = run(capsys, "inspect", tiny_llama, "--method", "wanda", "--sparsity", "0.5", "--out", tmp_path / "i")
    assert code == 2 and "prune with it, then run `llm-prune inspect` on the export" in err and err.count("\n") == 1
    code, _, err = run(capsys, "inspect", tiny_llama, "--sparsity", "1.5", "--out", tmp_path / "i")
    assert code == 2 and "sparsity must be in [0, 1)" in err
    assert not (tmp_path / "i").exists() and not (tmp_path / ".i.partial").exists()


# -- sweep ------------------------------------------------------------------------------------------------
def test_sweep_levels_equal_independent_runs(smollm2_dir, tmp_path, capsys):
    code, out, _ = run(capsys, "sweep", smollm2_dir, "--sparsities", "0.2,0.5", *PPL, "--save-mask",
                       "--out", tmp_path / "sw", "--quiet", "--report")
    assert code == 0
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [lv["how"] for lv in sweep["levels"]] == ["pruned while loading", "raised in memory"]
    for i, s in enumerate(["0.2", "0.5"]):
        assert run(capsys, smollm2_dir, "--sparsity", s, *PPL, "--no-save", "--out", tmp_path / f"one{s}",
                   "--quiet")[0] == 0
        one = json.loads((tmp_path / f"one{s}" / "results.json").read_text())
        assert sweep["curves"]["ppl/ppl"]["values"][i] == one["rows"][0]["pruned"]
        assert sweep["curves"]["ppl/ppl"]["dense"] == one["rows"][0]["dense"]
    # the masks a sweep keeps are the export's
    prune_checkpoint(smollm2_dir, PruneConfig(sparsity=Sparsity(0.5)), tmp_path / "e", progress=False)
    exported = load_dir(tmp_path / "e")
    masks, _ = load_masks(tmp_path / "sw" / "masks" / "0.5.safetensors")
    assert masks and all(torch.equal(m, exported[n] != 0) for n, m in masks.items())
    knee = sweep["knees"]["ppl/ppl"]
    assert knee["epsilon_kind"] == "relative" and "5%" in knee["epsilon_text"]
    assert "ppl/ppl: " in out and (tmp_path / "sw" / "knee-ppl-ppl.png").stat().st_size > 0
    assert "## Essential sparsity" in (tmp_path / "sw" / "report.md").read_text()
    assert (tmp_path / "sw" / "sweep.csv").read_text().splitlines()[0].startswith("label,sparsity,achieved,ppl/ppl")


def test_sweep_resumes_and_extends_without_recomputing(smollm2_dir, tmp_path, capsys, monkeypatch):
    from llm_prune.eval import harness

    real, calls = harness.evaluate, []

    def counted(model, tokenizer, tasks, settings):
        calls.append(1)
        if len(calls) == 2 and die:
            raise KeyboardInterrupt
        return real(model, tokenizer, tasks, settings)

    monkeypatch.setattr(harness, "evaluate", counted)
    out = tmp_path / "sw"
    die = True
    assert run(capsys, "sweep", smollm2_dir, "--sparsities", "0.2,0.4", *PPL, "--out", out, "--quiet")[0] == 130
    assert not out.exists() and (tmp_path / ".sw.partial" / "levels" / "0.2.json").is_file()
    die, calls[:] = False, []
    assert run(capsys, "sweep", smollm2_dir, "--sparsities", "0.2,0.4", *PPL, "--out", out, "--quiet", "--resume")[0] == 0
    assert len(calls) == 1  # only 0.4; dense comes from the baseline cache
    calls[:] = []
    assert run(capsys, "sweep", smollm2_dir, "--sparsities", "0.2,0.4,0.6", *PPL, "--out", out, "--quiet",
               "--resume")[0] == 0
    assert len(calls) == 1  # only 0.6
    sweep = json.loads((out / "sweep.json").read_text())
    assert [lv["label"] for lv in sweep["levels"]] == ["0.2", "0.4", "0.6"]
    from llm_prune.eval import api

    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "empty-cache"))  # no dense baseline to read
    monkeypatch.setattr(api, "evaluate_path", lambda *a, **k: pytest.fail("dense evaluated before the refusal"))
    code, _, err = run(capsys, "sweep", smollm2_dir, "--sparsities", "0.2", "--scope", "global", *PPL, "--out", out,
                       "--quiet", "--resume")
    assert code == 2 and "a sweep with other settings" in err


def test_sweep_of_a_calibrated_method(tmp_path, capsys):
    src = add_tokenizer(save_tiny(tmp_path / "ck", tiny_llama_config()))
    calib = tmp_path / "calib.txt"
    from llm_prune.calibration import embedded_passages

    calib.write_text("\n\n".join(embedded_passages("calib")[:12]))
    code, _, _ = run(capsys, "sweep", src, "--method", "wanda", "--sparsities", "0.3,0.6", "--eval", "ppl",
                     "--eval-seqlen", "16", "--eval-ppl-windows", "4", "--eval-data", "local", "--calib", calib,
                     "--nsamples", "4", "--seqlen", "16", "--out", tmp_path / "sw", "--quiet")
    assert code == 0
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [lv["how"] for lv in sweep["levels"]] == ["exported, then loaded"] * 2
    assert [lv["achieved"] for lv in sweep["levels"]] == pytest.approx([0.3, 0.6], abs=0.02)  # per row: round(0.3 * 32) = 10 of 32
    assert not list((tmp_path / "sw").glob("scratch-*"))  # each level's export is deleted once measured
    code, _, _ = run(capsys, "sweep", src, "--method", "ria", "--pattern", "2:4", "--permute", "--eval", "ppl",
                     "--eval-seqlen", "16", "--eval-ppl-windows", "4", "--eval-data", "local", "--calib", calib,
                     "--nsamples", "4", "--seqlen", "16", "--out", tmp_path / "perm", "--quiet")
    assert code == 0
    sweep = json.loads((tmp_path / "perm" / "sweep.json").read_text())
    level = json.loads((tmp_path / "perm" / "levels" / "2of4.json").read_text())
    assert level["key"]["permute"] is True and sweep["levels"][0]["achieved"] == 0.5


@pytest.mark.parametrize("args,match", [
    (["--sparsities", "0.9:0.1:0.1"], "--sparsities 0.9:0.1:0.1"),
    (["--sparsities", "0.5,1.2"], "--sparsities 0.5,1.2"),
    (["--sparsities", "0.3", "--method", "wanda", "--scope", "global"], "--scope global does not apply to wanda"),
    (["--sparsities", "0.3", "--eval", "nonsense_task"], "unknown task 'nonsense_task'"),
    (["--sparsities", "0.3", "--method", "ria", "--permute"], "--permute reorders input channels to choose N:M"),
])
def test_sweep_bad_input_is_one_line_and_writes_nothing(tiny_llama, tmp_path, capsys, args, match):
    code, _, err = run(capsys, "sweep", tiny_llama, *args, "--out", tmp_path / "sw", "--quiet")
    assert code == 2 and match in err and err.count("\n") == 1
    assert not (tmp_path / "sw").exists() and not (tmp_path / ".sw.partial").exists()


def test_report_of_a_directory_without_results(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "report", tmp_path / "empty")
    assert code == 2 and "holds no llm-prune results" in err
