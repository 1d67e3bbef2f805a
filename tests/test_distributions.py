"""``llm-prune distributions``: exact |w| histograms, zeros and near-zeros, checked against direct torch counts."""

import json
import math

import pytest
import torch

from llm_prune.cli import main
from llm_prune.study.distributions import QUANTILES, bin_edges, eps_key
from tests.conftest import save_tiny, tiny_llama_config, tiny_opt_config
from tests.helpers import load_dir

EPS = 1e-3


def save_planted(path, dtype, seed=0):
    """A tiny Llama whose every target starts with planted zeros (+0 and -0), values just either
    side of eps, and one magnitude far below the rest (it stretches the bin range)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config()).to(dtype)
    below_eps = torch.nextafter(torch.tensor(EPS, dtype=torch.float32), torch.tensor(0.0))
    planted = torch.tensor([0.0, 0.0, 0.0, -0.0, 1e-4, -5e-4, EPS, -EPS, float(below_eps), 1e-30])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.view(-1)[:len(planted)] = planted.to(dtype)
    model.save_pretrained(path, max_shard_size="40KB")
    return path


def targets_by_type(path) -> dict[str, list[torch.Tensor]]:
    """The default targets (2-D block weights), read directly, grouped by their name inside the block."""
    out = {}
    for name, t in load_dir(path).items():
        if name.startswith("model.layers.") and t.dim() == 2:
            out.setdefault(name.split(".", 3)[3].removesuffix(".weight"), []).append(t.reshape(-1))
    return {k: torch.cat(v) for k, v in out.items()}


def run_json(capsys, *argv):
    capsys.readouterr()
    code = main(["distributions", *map(str, argv), "--quiet"])
    captured = capsys.readouterr()
    return code, captured


def check_against_torch(stats, w: torch.Tensor, edges):
    """Every number of one group equals a direct count on its weights."""
    a = w.double().abs()
    assert stats["params"] == w.numel()
    assert stats["zeros"] == int((a == 0).sum())
    assert stats["near_zeros"] == int((a < EPS).sum())
    direct = [int(((a >= lo) & (a < hi)).sum()) for lo, hi in zip(edges, edges[1:])]
    assert stats["counts"] == direct
    assert sum(stats["counts"]) + stats["zeros"] == stats["params"]
    assert math.isclose(sum(stats["fractions"]) + stats["zero_fraction"], 1.0, rel_tol=1e-12)
    ranked = a.sort().values
    for q in QUANTILES:
        true = ranked[math.floor(q * (w.numel() - 1))]  # the k-th smallest, k = floor(q(n-1)) + 1
        # fp32: the lower end of the 2^16-key bucket holding it (bf16 precision); 16-bit: exact
        bucket = (true.float().view(torch.int32) & ~0xFFFF).view(torch.float32) if w.dtype == torch.float32 else true
        assert stats["quantiles"][f"{q:g}"] == float(bucket), q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_counts_equal_direct_torch_counts(capsys, tmp_path, dtype):
    src = save_planted(tmp_path / "m", dtype)
    out = tmp_path / "out"
    code, captured = run_json(capsys, src, "--out", out, "--bins", "40")
    assert code == 0, captured.err
    payload = json.loads((out / "distributions.json").read_text())
    edges = payload["bins"]["edges"]
    weights = targets_by_type(src)
    assert list(payload["by_type"]) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # in forward order
    for kind, w in weights.items():
        check_against_torch(payload["by_type"][kind]["m"], w, edges)
    check_against_torch(payload["overall"]["m"], torch.cat(list(weights.values())), edges)
    # Planted in each of the 21 targets: 4 zeros (fp16 also flushes 1e-30 to zero)
    assert payload["overall"]["m"]["zeros"] == 21 * (5 if dtype == torch.float16 else 4)
    assert (out / "distributions.png").is_file()
    assert "median |w|" in captured.out and "eps = 0.001" in captured.out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cached_key_tables_give_the_same_payload_without_reading(capsys, tmp_path, monkeypatch, dtype):
    from llm_prune.study import distributions as D

    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))
    src = save_planted(tmp_path / "m", dtype)
    assert run_json(capsys, src, "--out", tmp_path / "read")[0] == 0  # nothing cached yet: every target read
    assert main([str(src), "--sparsity", "0.5", "--out", str(tmp_path / "pruned"), "--quiet"]) == 0  # caches the tables

    def no_read(*a, **k):
        raise AssertionError("the cached key tables should have served every target")

    monkeypatch.setattr(D, "key_table", no_read)
    assert run_json(capsys, src, "--out", tmp_path / "cached")[0] == 0
    read, cached = (json.loads((tmp_path / d / "distributions.json").read_text()) for d in ("read", "cached"))
    for section in ("bins", "by_type", "by_block", "overall"):
        assert cached[section] == read[section], section


def test_by_block_sums_to_overall(capsys, tmp_path):
    src = save_planted(tmp_path / "m", torch.float32)
    assert run_json(capsys, src, "--out", tmp_path / "o")[0] == 0
    payload = json.loads((tmp_path / "o" / "distributions.json").read_text())
    blocks = [per["m"] for per in payload["by_block"].values()]
    assert len(blocks) == 3
    for key in ("params", "zeros", "near_zeros"):
        assert sum(b[key] for b in blocks) == payload["overall"]["m"][key]
    assert [sum(c) for c in zip(*(b["counts"] for b in blocks))] == payload["overall"]["m"]["counts"]


def test_eps_key_is_the_exact_boundary():
    for dtype, int_dtype in [(torch.float32, torch.int32), (torch.bfloat16, torch.int16), (torch.float16, torch.int16)]:
        for eps in (1e-3, 1e-4, 0.5, 2.0 ** -10):
            key = eps_key(eps, dtype)
            value = lambda k: float(torch.tensor([k], dtype=int_dtype).view(dtype)[0])
            assert value(key) >= eps > value(key - 1), (dtype, eps)


def test_bin_edges_are_bf16_values_around_the_data():
    values = torch.tensor([3e-7, 0.0123, 0.5], dtype=torch.float64)
    edges = bin_edges([values], 10)
    assert len(edges) == 11 and edges == sorted(set(edges))
    assert edges[0] <= 3e-7 and edges[-1] > 0.5
    for e in edges:
        bits = torch.tensor([e], dtype=torch.float32).view(torch.int32)
        assert int(bits) & 0xFFFF == 0 and float(torch.tensor([e], dtype=torch.float32)) == e  # a bf16 value


def test_two_checkpoints_side_by_side(capsys, tmp_path):
    """Dense vs its OMP-pruned export: two series on shared bins, each exact."""
    dense = save_planted(tmp_path / "dense", torch.float32)
    assert main([str(dense), "--sparsity", "0.5", "--out", str(tmp_path / "pruned"), "--quiet"]) == 0
    out = tmp_path / "cmp"
    code, captured = run_json(capsys, dense, tmp_path / "pruned", "--labels", "dense,omp50", "--out", out)
    assert code == 0, captured.err
    payload = json.loads((out / "distributions.json").read_text())
    assert [c["label"] for c in payload["checkpoints"]] == ["dense", "omp50"]
    edges = payload["bins"]["edges"]
    for label, path in [("dense", dense), ("omp50", tmp_path / "pruned")]:
        for kind, w in targets_by_type(path).items():
            check_against_torch(payload["by_type"][kind][label], w, edges)
    # OMP at 0.5 per layer: exactly half of every matrix is zero, and its near-zeros are those zeros
    for per in payload["by_type"].values():
        assert per["omp50"]["zeros"] * 2 == per["omp50"]["params"] == per["dense"]["params"]
        assert per["omp50"]["near_zeros"] == per["omp50"]["zeros"]
    assert "zeros dense" in captured.out and "zeros omp50" in captured.out


def test_bad_input_one_line_nothing_written(capsys, tmp_path):
    llama = save_tiny(tmp_path / "llama", tiny_llama_config())
    deeper = save_tiny(tmp_path / "deeper", tiny_llama_config(num_hidden_layers=4))
    opt = save_tiny(tmp_path / "opt", tiny_opt_config())
    cases = [
        (["no-such-model"], "is not a checkpoint directory"),
        ([llama, opt], "is a model of family opt"),
        ([llama, deeper], "differ in their targets"),
        ([llama, deeper, "--labels", "a"], "--labels needs 2 distinct names"),
        ([llama, "--eps", "0"], "--eps must be a positive number"),
        ([llama, "--bins", "0"], "--bins must be at least 1"),
        ([llama, "--targets", "*.nothing"], "no tensor inside the transformer blocks matches"),
    ]
    for argv, match in cases:
        code, captured = run_json(capsys, *argv, "--out", tmp_path / "o")
        err = captured.err.strip()
        assert code == 2 and err.startswith("llm-prune: error: ") and "\n" not in err, err
        assert match in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["deeper", "llama", "opt"]
