"""The CLI's evaluation paths on real SmolLM2: export+eval, on-the-fly eval, and `llm-prune eval`."""

import json

import pytest

from llm_prune.cli import main

FAST = ["--eval-seqlen", "128", "--eval-ppl-windows", "2", "--eval-data", "local", "--quiet"]


def ppl_of(path):
    payload = json.loads((path / "results.json").read_text())
    return {r["metric"]: r for r in payload["rows"] if r["task"] == "ppl"}["ppl"]


@pytest.mark.parametrize("fmt", ["dense", "packed24"])
def test_on_the_fly_eval_equals_export_then_eval(smollm2_dir, tmp_path, fmt):
    exported, fly = tmp_path / "exported", tmp_path / "fly"
    assert main(["smollm2-135m", "--pattern", "2:4", "--format", fmt, "--out", str(exported), "--eval", "ppl", *FAST]) == 0
    assert main(["smollm2-135m", "--pattern", "2:4", "--out", str(fly), "--eval", "ppl", "--no-save", *FAST]) == 0
    a, b = ppl_of(exported), ppl_of(fly)
    assert a["pruned"] == b["pruned"]  # the same weights, so the same number to the last bit
    assert a["dense"] == b["dense"] and a["dense"] < a["pruned"]
    assert not list(fly.glob("*.safetensors")) and (fly / "report.md").is_file()
    assert (exported / "sparsity.json").is_file()


def test_eval_subcommand(smollm2_dir, tmp_path, capsys):
    assert main(["eval", str(smollm2_dir), "--tasks", "ppl", "--seqlen", "128", "--ppl-windows", "2",
                 "--data", "local", "--out", str(tmp_path), "--quiet"]) == 0
    assert "results.json" in capsys.readouterr().out
    payload = json.loads((tmp_path / "results.json").read_text())
    assert 5 < payload["rows"][0]["pruned"] < 100  # real weights on Wikipedia text, short windows


def test_no_save_needs_eval(capsys, tmp_path):
    assert main(["smollm2-135m", "--sparsity", "0.5", "--no-save", "--out", str(tmp_path / "o")]) == 2
    assert "--no-save only makes sense with --eval" in capsys.readouterr().err


def test_calibration_method_through_cli(capsys, tiny_llama, tmp_path):
    # tiny_llama has no tokenizer: the calibration error must be one line, nothing written.
    capsys.readouterr()
    assert main([str(tiny_llama), "--method", "wanda", "--sparsity", "0.5", "--out", str(tmp_path / "o"),
                 "--nsamples", "2", "--seqlen", "16", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llm-prune: error: no usable tokenizer in {tiny_llama}") and err.count("\n") == 1
    assert "calibration needs one" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_eval_subcommand_reads_compressed_export(smollm2_dir, tmp_path):
    dense_out, packed_out = tmp_path / "dense", tmp_path / "packed"
    for out, fmt in [(dense_out, "dense"), (packed_out, "packed24")]:
        assert main(["smollm2-135m", "--pattern", "2:4", "--format", fmt, "--out", str(out), "--quiet"]) == 0
        assert main(["eval", str(out), "--tasks", "ppl", "--seqlen", "128", "--ppl-windows", "2",
                     "--data", "local", "--quiet"]) == 0
    assert ppl_of(dense_out)["pruned"] == ppl_of(packed_out)["pruned"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("argv", [["smollm2-135m", "--pattern", "2:4", "--eval", "ppl", "--runtime", "semi-structured"],
                                  ["eval", "DIR", "--tasks", "ppl", "--runtime", "semi-structured"]])
def test_semi_structured_runtime_needs_cuda(capsys, smollm2_dir, tmp_path, argv):
    argv = [str(smollm2_dir) if a == "DIR" else a for a in argv] + ["--quiet"]
    if argv[0] != "eval":
        argv += ["--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--runtime semi-structured needs a CUDA GPU" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
