"""Evaluation hand-off: MMLU table and aggregation, task configs, perplexity, comparison rows,
baseline cache, CLI plumbing (fast; real SmolLM2 end-to-end runs are in test_eval_smollm2.py)."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

import lm_eval
from llm_prune.errors import UserError
from llm_prune.eval import CATEGORIES, SUBJECTS, EvalSettings, aggregate_categories, compare, token_perplexity
from llm_prune.eval import api, cli, taskfiles
from llm_prune.eval.data import local_dir
from llm_prune.eval.results import format_rows

LM_EVAL_MMLU = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"


class _Loader(yaml.SafeLoader):
    """Reads lm-eval YAML, keeping ``!function`` tags as their text."""


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_Loader)


# --- MMLU subject table and aggregation -------------------------------------------------------

def test_subject_table_is_lm_evals_and_matches_local_data():
    assert len(SUBJECTS) == 57
    assert set(SUBJECTS.values()) == set(CATEGORIES) and len(CATEGORIES) == 4
    assert {c: sum(v == c for v in SUBJECTS.values()) for c in CATEGORIES} == \
        {"stem": 19, "humanities": 13, "social_sciences": 12, "other": 13}
    # lm-eval's own per-subject configs carry the category as a tag: the same table.
    theirs = {}
    for f in LM_EVAL_MMLU.glob("mmlu_*.yaml"):
        cfg = _yaml(f)
        theirs[cfg["dataset_name"]] = re.fullmatch(r"mmlu_(\w+)_tasks", cfg["tag"]).group(1)
    assert theirs == SUBJECTS
    assert sorted(p.name for p in local_dir("mmlu").iterdir() if p.is_dir()) == sorted(SUBJECTS)


def test_category_aggregation_by_hand():
    per_subject = {"anatomy": (0.5, 10), "astronomy": (0.25, 4), "virology": (1.0, 2), "philosophy": (0.0, 5)}
    got = aggregate_categories(per_subject)
    # stem: (5 + 1) / 14 correct; other: 2 / 2; humanities: 0 / 5; overall: 8 / 21.
    assert got["stem"] == {"acc": pytest.approx(6 / 14), "n": 14}
    assert got["other"] == {"acc": 1.0, "n": 2}
    assert got["humanities"] == {"acc": 0.0, "n": 5}
    assert got["overall"] == {"acc": pytest.approx(8 / 21), "n": 21}
    assert "social_sciences" not in got  # no evaluated subject: no number rather than a made-up one
    assert list(got) == ["stem", "humanities", "other", "overall"]


def test_aggregation_rejects_unknown_subject():
    with pytest.raises(KeyError, match="not an MMLU subject"):
        aggregate_categories({"astrology": (1.0, 3)})


# --- local task configs ---------------------------------------------------------------------

def test_task_files_are_generated_and_current():
    rendered = taskfiles.render()
    on_disk = {p.name: p.read_text() for p in taskfiles.TASKS_DIR.iterdir() if p.suffix != ".py" and p.is_file()}
    assert rendered == on_disk
    assert sum(n.startswith("mmlu_local_") for n in rendered) == 57


def test_local_mmlu_prompt_is_lm_evals():
    ours = _yaml(taskfiles.TASKS_DIR / "_mmlu_local_template_yaml")
    theirs = _yaml(LM_EVAL_MMLU / "_default_template_yaml")
    for key in ("test_split", "fewshot_split", "fewshot_config", "output_type", "doc_to_text", "doc_to_choice",
                "doc_to_target", "metric_list"):
        assert ours[key] == theirs[key], key
    assert _yaml(taskfiles.TASKS_DIR / "mmlu_local_high_school_us_history.yaml")["description"] == \
        _yaml(LM_EVAL_MMLU / "mmlu_high_school_us_history.yaml")["description"]
    for cat in CATEGORIES:
        assert _yaml(taskfiles.TASKS_DIR / f"_mmlu_local_{cat}.yaml")["aggregate_metric_list"] == \
            _yaml(LM_EVAL_MMLU / f"_mmlu_{cat}.yaml")["aggregate_metric_list"] == [{"metric": "acc", "weight_by_size": True}]


def test_local_mmlu_task_loads_packaged_data():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(taskfiles.TASKS_DIR), include_defaults=False)
    task = tm.load(["mmlu_local_anatomy"])["tasks"]["mmlu_local_anatomy"]
    test, dev = list(task.test_docs()), list(task.fewshot_docs())
    assert (len(test), len(dev)) == (135, 5)  # MMLU anatomy: 135 test questions, 5 dev examples
    assert task.doc_to_text(test[0]).endswith("\nAnswer:") and "\nD. " in task.doc_to_text(test[0])


# --- perplexity ---------------------------------------------------------------------------------

def test_perplexity_equals_direct_computation(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (5 * 16 + 7,))  # 5 windows of 16 and a remainder that is dropped
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss for w in ids[:80].view(5, 16)]  # HF: mean NLL of 15 tokens
    direct = math.exp(torch.stack(losses).mean().item())
    one = token_perplexity(model, ids, 16, batch_size=1)
    three = token_perplexity(model, ids, 16, batch_size=3)
    assert one["windows"] == 5 and one["predicted_tokens"] == 75
    assert one["ppl"] == pytest.approx(direct, rel=1e-5)
    assert three["ppl"] == pytest.approx(one["ppl"], rel=1e-5)
    capped = token_perplexity(model, ids, 16, max_windows=2)
    assert capped["windows"] == 2 and capped["ppl"] == pytest.approx(math.exp(torch.stack(losses[:2]).mean().item()), rel=1e-5)
    # A random model is near-uniform over its 128 tokens.
    assert 60 < one["ppl"] < 250
    with pytest.raises(UserError, match="fewer than one window"):
        token_perplexity(model, ids[:10], 16)


# --- rows, writers, cache -----------------------------------------------------------------------

def _result(acc, ppl, cats=None):
    tasks = {"arc_easy": {"metrics": {"acc": acc, "acc_norm": acc - 0.1}},
             "ppl": {"metrics": {"ppl": ppl}}}
    if cats:
        tasks["mmlu"] = {"metrics": {"acc": sum(cats.values()) / len(cats)},
                         "categories": {c: {"acc": v, "n": 10} for c, v in cats.items()}}
    return {"tasks": tasks}


def test_compare_rows_and_drop_signs():
    dense = _result(0.6, 20.0, {"stem": 0.3, "other": 0.5})
    pruned = _result(0.5, 25.0, {"stem": 0.25, "other": 0.5})
    rows = {(r["task"], r["metric"]): r for r in compare(dense, pruned)}
    assert set(rows) == {("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("ppl", "ppl"), ("mmlu", "acc"),
                         ("mmlu/stem", "acc"), ("mmlu/other", "acc")}
    assert rows["arc_easy", "acc"]["drop"] == pytest.approx(0.1)  # accuracy lost
    assert rows["ppl", "ppl"]["drop"] == pytest.approx(5.0)  # perplexity gained: also worse, also positive
    assert rows["mmlu/other", "acc"]["drop"] == 0
    alone = compare(None, pruned)
    assert all(r["dense"] is None and r["drop"] is None for r in alone)
    table = format_rows(compare(dense, pruned))
    assert "60.00" in table and "+10.00" in table and "+5.000" in table


def test_dense_baseline_is_cached_per_task_and_settings(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_evaluate_path(path, tasks, settings, tokenizer=None):
        calls.append(list(tasks))
        return {"model": {}, "tasks": {t: {"metrics": {"acc": 0.5 + len(calls) / 100}} for t in tasks}}

    monkeypatch.setattr(api, "evaluate_path", fake_evaluate_path)
    s = EvalSettings(limit=5, data="local")
    first = api.dense_results(tiny_llama, ["arc_easy", "piqa"], s)
    again = api.dense_results(tiny_llama, ["piqa", "arc_easy", "hellaswag"], s)
    assert calls == [["arc_easy", "piqa"], ["hellaswag"]]  # only the new task ran
    assert again["tasks"]["piqa"]["metrics"] == first["tasks"]["piqa"]["metrics"] and again["tasks"]["piqa"]["cached"]
    api.dense_results(tiny_llama, ["piqa"], EvalSettings(limit=6, data="local"))  # other settings: other key
    api.dense_results(tiny_llama, ["piqa"], EvalSettings(limit=5, data="local", batch_size=4))  # same numbers: cached
    assert calls[2:] == [["piqa"]]
    # Changed weights: another fingerprint, so the baseline is recomputed.
    shard = sorted(Path(tiny_llama).glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b" ")
    api.dense_results(tiny_llama, ["piqa"], s)
    assert calls[3:] == [["piqa"]]


# --- settings and CLI plumbing ------------------------------------------------------------------

def _parse(argv):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(argv)


def test_cli_arguments_to_settings():
    args = _parse(["/ckpt", "--tasks", "mmlu, ppl,arc_easy", "--fewshot", "0", "--limit", "7", "--batch-size", "16",
                   "--device", "cpu", "--dtype", "bfloat16", "--seqlen", "512", "--mmlu-subjects", "anatomy,virology"])
    s = cli.settings_from_args(args)
    assert cli.parse_tasks(args.tasks) == ["mmlu", "ppl", "arc_easy"]
    assert (s.fewshot, s.limit, s.batch_size, s.device, s.dtype, s.seqlen) == (0, 7, 16, "cpu", "bfloat16", 512)
    assert s.mmlu_subjects == ("anatomy", "virology") and s.load_in is None
    assert cli.settings_from_args(_parse(["/ckpt"])).batch_size == "auto"
    with pytest.raises(UserError, match="--batch-size"):
        cli.settings_from_args(_parse(["/ckpt", "--batch-size", "big"]))
    with pytest.raises(UserError, match="--limit"):
        EvalSettings(limit=0)


def test_load_in_is_refused_on_cpu_with_a_reason():
    from llm_prune.eval.load import model_kwargs

    with pytest.raises(UserError, match="unsupported on cpu.*CUDA"):
        model_kwargs(EvalSettings(device="cpu", load_in="8bit"))
    assert model_kwargs(EvalSettings(device="cpu")) == {"dtype": torch.float32}


def test_accelerate_launch_hands_lm_eval_the_path(smollm2_dir, monkeypatch):
    """Under ``accelerate launch`` (WORLD_SIZE > 1) lm-eval's HFLM must get the checkpoint path, so
    it loads one replica per process and splits requests; our settings must reach it."""
    import lm_eval.models.huggingface as hf

    seen = {}

    class FakeHFLM:
        def __init__(self, **kw):
            seen["hflm"] = kw

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="needs one GPU per process"):
        api.evaluate_path(smollm2_dir, ["ppl"], EvalSettings(device="cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU node; nothing touches CUDA below
    monkeypatch.setattr(hf, "HFLM", FakeHFLM)
    monkeypatch.setattr(api, "evaluate_lm", lambda lm, tasks, settings: seen.update(lm=lm, tasks=tasks) or None)
    out = api.evaluate_path(smollm2_dir, ["mmlu", "ppl"], EvalSettings(device="cuda", batch_size=8, dtype="bfloat16"))
    assert out is None  # what non-zero ranks get
    kw = seen["hflm"]
    assert kw["pretrained"] == str(smollm2_dir) and kw["tokenizer"] == str(smollm2_dir)
    assert (kw["batch_size"], kw["device"], kw["dtype"]) == (8, "cuda", torch.bfloat16)
    assert isinstance(seen["lm"], FakeHFLM) and seen["tasks"] == ["mmlu", "ppl"]


def test_clear_errors(tmp_path, tiny_llama):
    with pytest.raises(UserError, match="no config.json"):
        api.evaluate_path(tmp_path, ["ppl"], EvalSettings(device="cpu"))
    with pytest.raises(UserError, match="no usable tokenizer"):
        api.evaluate_path(tiny_llama, ["ppl"], EvalSettings(device="cpu"))
    from llm_prune.eval.harness import _check_tasks, _task_manager

    with pytest.raises(UserError, match="unknown task 'mmlu_pro_max'"):
        _task_manager(["mmlu", "mmlu_pro_max"], "local")
    with pytest.raises(UserError, match="twice"):
        _check_tasks(["ppl", "ppl"])


def test_prune_command_flags_with_prefix():
    """The prune command's --eval takes the same settings as eval-prefixed flags (no clash with its own)."""
    p = argparse.ArgumentParser()
    p.add_argument("--seqlen", type=int)  # e.g. a calibration option of the prune command
    cli.add_settings_arguments(p, prefix="eval-")
    args = p.parse_args(["--seqlen", "2048", "--eval-seqlen", "256", "--eval-limit", "3", "--eval-batch-size", "2"])
    s = cli.settings_from_args(args, prefix="eval-", progress=False)
    assert (s.seqlen, s.limit, s.batch_size, s.fewshot, s.progress) == (256, 3, 2, 5, False)


def test_auto_batch_is_16_on_cpu_and_lm_evals_auto_on_a_gpu():
    s = EvalSettings()
    assert s.batch_for("cpu") == 16 and s.batch_for(torch.device("cpu")) == 16
    assert s.batch_for("cuda") == "auto" and s.batch_for("cuda:1") == "auto"
    assert EvalSettings(batch_size=4).batch_for("cpu") == 4
