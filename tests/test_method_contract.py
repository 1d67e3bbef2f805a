"""The method contract: a method is one file, and the exporter and the loader take it as it is."""

from __future__ import annotations

import pytest
import torch

from llm_prune import PruneConfig, Sparsity, UserError, from_pretrained, prune_checkpoint, set_sparsity
from llm_prune.cli import main
from llm_prune.magnitude import is_nm
from llm_prune.methods import METHODS, Method, get_method, score_keep

from .helpers import assert_bitwise, load_dir
from .random_method import RANDOM, random_score


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))


def hf_load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_registering_a_file_is_all_it_takes():
    assert get_method("random") is RANDOM and "random" in METHODS
    assert not RANDOM.needs_calibration and RANDOM.plan is None  # no fast path: the reference runs


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.3, scope="global"), dict(pattern="2:4")])
def test_random_method_exports_and_prunes_at_load_time_alike(tiny_llama, tmp_path, kw):
    cfg = PruneConfig(method="random", sparsity=Sparsity.parse(kw.get("sparsity"), kw.get("pattern")),
                      scope=kw.get("scope", "layer"))
    report = prune_checkpoint(tiny_llama, cfg, tmp_path / "out", progress=False)
    exported = load_dir(tmp_path / "out")
    targets = sorted(report["achieved"]["tensors"])
    assert len(targets) == 3 * 7
    if "pattern" in kw:
        assert all(is_nm(exported[n] != 0, 2, 4) for n in targets)
    elif "scope" not in kw:  # each matrix to its sparsity, exactly (random weights have no zeros to start with)
        assert all(report["achieved"]["tensors"][n] == pytest.approx(0.5, abs=0.5 / exported[n].numel())
                   for n in targets)
    else:
        assert report["achieved"]["targeted"] == pytest.approx(0.3, abs=1e-4)
    assert_bitwise(from_pretrained(tiny_llama, method="random", progress=False, **kw), hf_load(tmp_path / "out"))


def test_random_masks_are_not_magnitude_masks(tiny_llama, tmp_path):
    prune_checkpoint(tiny_llama, PruneConfig(method="random", sparsity=Sparsity(0.5)), tmp_path / "r", progress=False)
    prune_checkpoint(tiny_llama, PruneConfig(method="omp", sparsity=Sparsity(0.5)), tmp_path / "m", progress=False)
    r, m = load_dir(tmp_path / "r"), load_dir(tmp_path / "m")
    name = "model.layers.1.mlp.up_proj.weight"
    same = ((r[name] != 0) == (m[name] != 0)).float().mean().item()
    assert 0.4 < same < 0.6  # two independent halves agree on about half the weights


def test_reference_keep_of_a_score_method():
    w = torch.tensor([[0.5, -0.1, 0.3, -0.8]])
    s = random_score(w)
    keep = score_keep(RANDOM, w, Sparsity(0.5))
    assert keep.tolist() == [[bool(s[0, i] > s[0].median()) or bool(s[0, i] == s[0].max()) for i in range(4)]] \
        or int(keep.sum()) == 2
    assert int(keep.sum()) == 2 and torch.equal(keep, score_keep(RANDOM, w.clone(), Sparsity(0.5)))


def test_the_cli_lists_and_runs_it(tiny_llama, tmp_path, capsys):
    assert main([str(tiny_llama), "--method", "random", "--sparsity", "0.4", "--out", str(tmp_path / "o"),
                 "--quiet", "--json"]) == 0
    assert '"method": "random"' in capsys.readouterr().out


def test_set_sparsity_needs_a_nested_method(tiny_llama):
    model = from_pretrained(tiny_llama, method="random", sparsity=0.3, progress=False)
    with pytest.raises(UserError, match="set_sparsity raises unstructured OMP masks; this model was pruned with random"):
        set_sparsity(model, 0.5)


def test_calibrated_methods_refuse_global_scope_everywhere(tiny_llama, tmp_path):
    cfg = PruneConfig(method="wanda", sparsity=Sparsity(0.5), scope="global")
    with pytest.raises(UserError, match="--scope global does not apply to wanda"):
        prune_checkpoint(tiny_llama, cfg, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_a_method_gives_a_score_or_a_solve():
    with pytest.raises(ValueError, match="exactly one of score and solve"):
        Method("nothing", "gives neither")
    with pytest.raises(ValueError, match="a solve needs an observer"):
        Method("half", "a solve without its statistic", solve=lambda *a, **k: None)


def test_the_sweep_takes_it_too(tmp_path, capsys):
    """A method file the sweep has never heard of: not nested, so every level is pruned while loading."""
    import json

    from .conftest import save_tiny, tiny_llama_config
    from .helpers import add_tokenizer

    src = add_tokenizer(save_tiny(tmp_path / "ck", tiny_llama_config()))
    assert main(["sweep", str(src), "--method", "random", "--sparsities", "0.2,0.4", "--eval", "ppl", "--eval-seqlen",
                 "16", "--eval-ppl-windows", "4", "--eval-data", "local", "--out", str(tmp_path / "sw"), "--quiet"]) == 0
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [lv["how"] for lv in sweep["levels"]] == ["pruned while loading"] * 2
    assert [round(lv["achieved"], 3) for lv in sweep["levels"]] == [0.2, 0.4]
