"""The essential-sparsity curve: the dense model once, then every sparsity level, and the knee of each metric.

    llm-prune sweep MODEL --method omp --sparsities 0.1:0.7:0.05 --eval ppl,arc_easy [--scope global]
    llm-prune sweep MODEL --method wanda --sparsities 0.5:0.7:0.1 --allocation owl     the knee, moved by allocation

How a level is made depends on what the method is, never on its name:

* nested data-free methods (OMP): one load, pruned while loading at the lowest level, then raised
  in memory to every next level (``set_sparsity`` reads each threshold off the key tables kept
  from loading: no reload, no sort);
* other data-free methods, and any under a non-uniform allocation: pruned while loading, once per
  level;
* calibrated methods (SparseGPT, Wanda): each level exported (calibration runs per level) into a
  scratch directory, loaded and evaluated, then deleted.

The dense baseline comes from the evaluation cache (one evaluation per checkpoint and settings).
Each finished level is written to ``levels/`` at once: ``--resume`` continues an interrupted
sweep, and extends a finished one with new levels, without recomputing any finished level.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..config import PruneConfig, Sparsity
from ..errors import UserError
from ..methods import get_method
from .knee import Metric, find_knee
from .output import Output

LOWER_IS_BETTER = {"ppl"}


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep prunes and measures (everything its results depend on, but the evaluation settings)."""

    method: str = "omp"
    scope: str = "layer"
    levels: tuple[Sparsity, ...] = ()
    targets: tuple[str, ...] = ("*.weight",)
    exclude: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("ppl",)
    epsilon_points: float = 1.0  # accuracy metrics: absolute, in points (1.0 = 0.01)
    ppl_epsilon: float = 0.05  # perplexity: relative to dense (0.05 = +5%)
    save_masks: bool = False
    allocation: str = "uniform"  # as PruneConfig's: every level shared out between blocks the same way
    band: float | None = None
    owl_m: float = 5.0
    clip: bool = True
    permute: bool = False  # N:M levels: PruneConfig's --permute

    def __post_init__(self):
        if not self.levels:
            raise UserError("the sweep has no sparsity levels (e.g. --sparsities 0.1:0.7:0.05)")
        if len({lv.label for lv in self.levels}) != len(self.levels):
            raise UserError("a sparsity level is listed twice")
        if self.epsilon_points < 0 or self.ppl_epsilon < 0:
            raise UserError("--epsilon and --ppl-epsilon must be >= 0")

    def prune_config(self, level: Sparsity) -> PruneConfig:
        return PruneConfig(self.method, level, self.scope, self.targets, self.exclude, self.allocation, self.band,
                           self.owl_m, self.clip, self.permute)

    def key(self) -> dict:
        """What a resumed sweep must share with the levels it finds (the levels themselves may differ)."""
        d = asdict(self)
        del d["levels"], d["save_masks"], d["epsilon_points"], d["ppl_epsilon"]
        if not self.permute:
            del d["permute"]
        if self.allocation == "uniform" or self.clip:  # the keys of sweeps made before the option
            del d["clip"]
        if self.allocation == "uniform":  # the keys of sweeps made before allocations existed
            del d["allocation"], d["band"], d["owl_m"]
        return d


def run_sweep(src: Path, cfg: SweepConfig, settings, out: Output, *, calib=None, finetune=None, progress: bool = True,
              source_name: str | None = None) -> tuple[dict, dict]:
    """Evaluate dense and every level not already in ``out``; returns (sweep.json's payload, the
    ``Knee`` of each curve). With ``finetune`` (a ``finetune.run.FinetuneConfig``) each level, and
    dense, is fine-tuned on its task and measured there (the paper's encoder curves)."""
    if finetune is not None:
        tuning = {k: v for k, v in finetune.to_json().items() if k not in ("sparsity", "pattern")}  # per level
        if finetune.method == "lth":
            tuning["chain"] = "one chain of rounds up the levels, --rounds between consecutive levels"
        key = {**cfg.key(), "source": str(Path(src).resolve()), "finetune": tuning}
        make, dense = _finetuned(src, cfg, finetune, out, progress)
    else:
        make, dense, key = _evaluated(src, cfg, settings, calib, out, progress)
    key = json.loads(json.dumps(key))  # as it reads back from a level's file (tuples become lists)
    done = _finished_levels(out, key)  # a partial sweep of other settings is refused before any dense work
    dense = dense()
    todo = [lv for lv in cfg.levels if lv.label not in done]
    if todo:
        bar = tqdm(total=len(todo), desc=f"sweep {cfg.method}", unit="level", disable=not progress)
        for level, record in make(todo):
            out.write_json(f"levels/{level.label}.json", {"key": key, **record})
            done[level.label] = record
            bar.update()
            bar.set_postfix(level=str(level))
        bar.close()
    records = [done[lv.label] for lv in sorted(cfg.levels, key=lambda lv: lv.ratio)]
    return summarize(cfg, records, dense, source_name or str(src), finetune=key.get("finetune"))


def _evaluated(src: Path, cfg: SweepConfig, settings, calib, out: Output, progress: bool):
    """(level maker, dense results when called, resume key) for a sweep measured by evaluation."""
    from ..eval.api import dense_results
    from ..eval.harness import check_tasks, resolve_data

    check_tasks(list(cfg.tasks), settings)
    method = get_method(cfg.method)
    for lv in cfg.levels:  # every level's settings checked before any work
        method.check(cfg.prune_config(lv))
    key = {**cfg.key(), "source": str(Path(src).resolve()), "eval": _eval_key(settings, resolve_data(settings.data)),
           "calibration": calib.to_json() if calib is not None and method.needs_calibration else None}
    levels = _levels_exported if method.needs_calibration else _levels_in_memory
    make = lambda todo: levels(src, cfg, todo, settings, out, calib, progress)  # noqa: E731
    return make, lambda: dense_results(src, list(cfg.tasks), settings), key


def _finetuned(src: Path, cfg: SweepConfig, ft, out: Output, progress: bool):
    """(level maker, dense results when called) for a sweep measured by fine-tuning each level on a task."""
    from dataclasses import replace

    from ..finetune.run import as_eval_result, dense_run, prepare_task, pruned_run

    for lv in cfg.levels:  # every level's settings checked before any work
        replace(ft, sparsity=lv)
    task = prepare_task(src, ft)
    dense = lambda: as_eval_result([dense_run(src, task, ft, seed, progress) for seed in ft.seeds], task)  # noqa: E731

    chain = ft.method == "lth"  # one chain of rounds through the levels, every level a point on it

    def make(todo):
        before = _ticket_chain_start(cfg, todo, out) if chain else None
        for level in sorted(todo, key=lambda lv: lv.ratio):
            t0 = time.perf_counter()
            lvl = replace(ft, sparsity=level)
            runs = []
            for seed in ft.seeds:
                start = _saved_ticket(out, before, seed) if before is not None else None
                result, model, _ = pruned_run(src, task, lvl, seed, out.tmp, out / "masks" / level.label, progress,
                                              start=start)
                if chain:
                    _save_ticket(out, level, seed, model)
                runs.append(result)
            if before is not None:  # the chain goes on from this level: the previous tickets are spent
                shutil.rmtree(out / "tickets" / before["label"], ignore_errors=True)
            before = {"label": level.label, "sparsity": level.ratio, "runs": runs} if chain else None
            yield level, {"label": level.label, "sparsity": level.ratio,
                          "pattern": f"{level.n}:{level.m}" if level.is_nm else None,
                          "achieved": sum(r["achieved"] for r in runs) / len(runs), "how": "pruned, then fine-tuned",
                          "prune_s": 0.0, "eval_s": round(time.perf_counter() - t0, 3),
                          "result": as_eval_result(runs, task), "runs": runs}

    return make, dense


def _ticket_chain_start(cfg: SweepConfig, todo, out: Output) -> dict | None:
    """The finished level a lottery-ticket chain continues from (None: from dense). A chain runs
    up the levels, so a level below a finished one cannot join it."""
    done = sorted((lv for lv in cfg.levels if lv not in todo), key=lambda lv: lv.ratio)
    if done and todo and min(lv.ratio for lv in todo) < done[-1].ratio:
        low = min(todo, key=lambda lv: lv.ratio)
        raise UserError(f"a lottery-ticket sweep is one chain of rounds up its levels: {low.label} is below the "
                        f"finished {done[-1].label}; sweep it into another --out")
    if not done:
        return None
    record = out.read_json(f"levels/{done[-1].label}.json")
    return {"label": done[-1].label, "sparsity": done[-1].ratio, "runs": record["runs"]}


def _saved_ticket(out: Output, before: dict, seed: int) -> tuple[float, dict, dict]:
    """(sparsity, result, trained state dict) of this seed's ticket at the level ``before``."""
    from safetensors.torch import load_file

    path = out / "tickets" / before["label"] / f"seed{seed}.safetensors"
    if not path.is_file():
        raise UserError(f"{path} is missing: a lottery-ticket chain continues from the trained tickets of its last "
                        "level; sweep into a new --out")
    result = next(r for r in before["runs"] if r["seed"] == seed)
    return before["sparsity"], {k: v for k, v in result.items() if k not in ("seed", "rounds")}, load_file(path)


def _save_ticket(out: Output, level: Sparsity, seed: int, model) -> None:
    from ..finetune.run import save_state

    save_state(out / "tickets" / level.label / f"seed{seed}.safetensors", model)


def _eval_key(settings, data: str) -> dict:
    from ..eval.results import KEY_SETTINGS

    s = settings.to_json()
    return {**{k: s.get(k) for k in KEY_SETTINGS}, "data": data}


def _finished_levels(out: Output, key: dict) -> dict[str, dict]:
    done = {}
    for f in sorted((out / "levels").glob("*.json")):
        record = out.read_json(f"levels/{f.name}")
        if record is None:
            continue  # torn by a kill: that level runs again
        if record.pop("key", None) != key:
            raise UserError(f"{out.tmp} holds levels of a sweep with other settings (method, scope, targets, tasks, "
                            "evaluation or calibration); choose another --out or pass --overwrite")
        done[record["label"]] = record
    return done


# -- making and measuring the levels ------------------------------------------------------------------------
def _levels_in_memory(src, cfg: SweepConfig, todo, settings, out: Output, calib, progress):
    """Data-free methods: pruned while loading; a nested method loads once and is raised in memory."""
    from ..eval.load import load_tokenizer
    from ..loading import from_pretrained, set_sparsity

    method = get_method(cfg.method)
    tokenizer = load_tokenizer(Path(src))
    model, loaded_at = None, None
    for level in sorted(todo, key=lambda lv: lv.ratio):
        t0 = time.perf_counter()
        # A non-uniform allocation shares each level out anew: no raising in memory.
        if model is not None and method.nested and not level.is_nm and not loaded_at.is_nm and cfg.allocation == "uniform":
            set_sparsity(model, level.ratio)
            how = "raised in memory"
        else:
            model = None
            gc.collect()
            model = from_pretrained(src, **_prune_kwargs(cfg, level), progress=False, **_placement(settings))
            loaded_at, how = level, "pruned while loading"
        prune_s = time.perf_counter() - t0
        yield level, _measure(model, tokenizer, cfg, level, settings, out, prune_s, how)


def _levels_exported(src, cfg: SweepConfig, todo, settings, out: Output, calib, progress):
    """Calibrated methods: each level exported (calibration per level), loaded, measured, deleted."""
    from ..eval.load import load_tokenizer
    from ..loading import load
    from ..pipeline import prune_checkpoint

    tokenizer = load_tokenizer(Path(src))
    for level in sorted(todo, key=lambda lv: lv.ratio):
        scratch = out / f"scratch-{level.label}"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(scratch.parent / f".{scratch.name}.partial", ignore_errors=True)
        t0 = time.perf_counter()
        prune_checkpoint(src, cfg.prune_config(level), scratch, calib=calib, progress=progress)
        model = load(scratch, progress=False, **_placement(settings))
        prune_s = time.perf_counter() - t0
        try:
            yield level, _measure(model, tokenizer, cfg, level, settings, out, prune_s, "exported, then loaded")
        finally:
            del model
            shutil.rmtree(scratch, ignore_errors=True)


def _prune_kwargs(cfg: SweepConfig, level: Sparsity) -> dict:
    nm = f"{level.n}:{level.m}" if level.is_nm else None
    return dict(method=cfg.method, sparsity=None if nm else level.ratio, pattern=nm, scope=cfg.scope,
                targets=cfg.targets, exclude=cfg.exclude, allocation=cfg.allocation, allocation_band=cfg.band,
                allocation_clip=cfg.clip)


def _placement(settings) -> dict:
    """dtype and device for a model evaluated in memory, as for a checkpoint path."""
    from ..eval.load import pick_device, pick_dtype

    device = pick_device(settings.device)
    return {"dtype": pick_dtype(settings.dtype, device), "device_map": {"": device}}


def _measure(model, tokenizer, cfg: SweepConfig, level: Sparsity, settings, out: Output, prune_s: float, how: str):
    from ..eval.harness import evaluate

    targets = _target_params(model, cfg)
    zeros = sum(int((p == 0).sum()) for p in targets.values())
    numel = sum(p.numel() for p in targets.values())
    if cfg.save_masks:
        from .similarity import save_masks

        save_masks(out / f"masks/{level.label}.safetensors", {n: p.detach().cpu() != 0 for n, p in targets.items()},
                   {"method": cfg.method, "scope": cfg.scope, "sparsity": str(level)})
    t0 = time.perf_counter()
    result = evaluate(model, tokenizer, list(cfg.tasks), settings)
    return {"label": level.label, "sparsity": level.ratio, "pattern": f"{level.n}:{level.m}" if level.is_nm else None,
            "achieved": zeros / max(numel, 1), "how": how, "prune_s": round(prune_s, 3),
            "eval_s": round(time.perf_counter() - t0, 3), "result": result}


def _target_params(model, cfg: SweepConfig) -> dict:
    """The pruned matrices of a model from ``from_pretrained`` or ``load``, by checkpoint name."""
    from ..loading import prune_state

    state = prune_state(model)
    params = dict(model.named_parameters())
    if state is not None:
        return {state.checkpoint_names.get(n, n): params[n] for n in state.order}
    from ..arch import arch_for
    from ..targets import matches

    arch = arch_for(model.config.to_dict())
    out = {}
    for name, p in params.items():
        where = arch.block_of(name)
        if where and p.dim() == 2 and matches(where[1], name, cfg.targets) and not matches(where[1], name, cfg.exclude):
            out[name] = p
    return out


# -- the curve and its knees --------------------------------------------------------------------------------
def series(records: list[dict], dense: dict) -> dict[tuple[str, str], dict]:
    """(task, metric) -> {values, stderr, dense, dense_stderr} over the levels in order."""
    from ..eval.results import metric_rows

    out: dict[tuple[str, str], dict] = {}
    for task, entry in dense["tasks"].items():
        for t, m, v in metric_rows(entry, task):
            out[(t, m)] = {"dense": v, "dense_stderr": _stderr(entry, t, m, v), "values": [], "stderr": []}
    for rec in records:
        for task, entry in rec["result"]["tasks"].items():
            for t, m, v in metric_rows(entry, task):
                if (t, m) in out:
                    out[(t, m)]["values"].append(v)
                    out[(t, m)]["stderr"].append(_stderr(entry, t, m, v))
    return out


def _stderr(entry: dict, task: str, metric: str, value: float) -> float | None:
    """lm-eval's standard error when it gave one; for accuracies, the closed form lm-eval uses for a
    mean of 0/1 scores, sqrt(p(1-p)/(n-1)); none for perplexity."""
    given = entry.get("stderr", {}).get(metric)
    if isinstance(given, (int, float)) and math.isfinite(given):
        return float(given)
    if metric in LOWER_IS_BETTER:
        return None
    n = entry.get("categories", {}).get(task.split("/", 1)[1], {}).get("n") if "/" in task else entry.get("n")
    if not n or n < 2 or not 0 <= value <= 1:
        return None
    return math.sqrt(value * (1 - value) / (n - 1))


def summarize(cfg: SweepConfig, records: list[dict], dense: dict, source_name: str,
              finetune: dict | None = None) -> tuple[dict, dict]:
    levels = [r["sparsity"] for r in records]
    knees, curves = {}, {}
    for (task, metric), s in series(records, dense).items():
        if len(s["values"]) != len(levels):
            continue
        lower = metric in LOWER_IS_BETTER
        m = (Metric.perplexity(f"{task}/{metric}", relative=cfg.ppl_epsilon) if lower
             else Metric.accuracy(f"{task}/{metric}", points=cfg.epsilon_points))
        stderr = s["stderr"] if all(e is not None for e in s["stderr"]) else None
        knee = find_knee(levels, s["values"], s["dense"], m, stderr=stderr, dense_stderr=s["dense_stderr"])
        name = f"{task}/{metric}"
        knees[name] = knee
        curves[name] = {"task": task, "metric": metric, "dense": s["dense"], "dense_stderr": s["dense_stderr"],
                        "values": s["values"], "stderr": s["stderr"], "lower_is_better": lower}
    payload = {
        "model": source_name, "method": cfg.method, "scope": cfg.scope, "targets": list(cfg.targets),
        **({"allocation": _allocation_json(cfg)} if cfg.allocation != "uniform" else {}),
        "exclude": list(cfg.exclude), "tasks": list(cfg.tasks),
        "epsilon": {"accuracy": f"{cfg.epsilon_points:g} point(s) absolute", "perplexity": f"+{100 * cfg.ppl_epsilon:g}% relative"},
        "levels": [{k: r[k] for k in ("label", "sparsity", "pattern", "achieved", "how", "prune_s", "eval_s")}
                   for r in records],
        "curves": curves, "knees": {k: v.to_dict() for k, v in knees.items()},
        "dense": {"tasks": dense["tasks"], "settings": dense.get("settings"), "model": dense.get("model")},
        "protocol": _protocols(records[0]["result"] if records else dense, finetune),
        "time": {"prune_s": round(sum(r["prune_s"] for r in records), 3),
                 "eval_s": round(sum(r["eval_s"] for r in records), 3)},
    }
    return payload, knees


def _allocation_json(cfg: SweepConfig) -> dict:
    d = cfg.prune_config(next(lv for lv in cfg.levels)).to_json()
    return {"name": cfg.allocation, "band": d["band"], **({"owl_m": d["owl_m"]} if "owl_m" in d else {}),
            **({"clipped": False} if not cfg.clip else {})}


def allocation_label(payload: dict) -> str:
    """", allocation owl ±0.08" for a sweep shared out between blocks, else nothing."""
    a = payload.get("allocation")
    return f", allocation {a['name']} ±{a['band']:g}{' unclipped' if a.get('clipped') is False else ''}" if a else ""


def _protocols(result: dict, finetune: dict | None) -> list[str]:
    from ..eval.results import protocol_lines

    if isinstance(result.get("protocol"), str):  # a fine-tuned curve: the split is the fine-tune path's to say
        train = (finetune or {}).get("train", {})
        length = "max_steps" if (train.get("max_steps") or -1) > 0 else "epochs"  # max_steps overrides epochs
        how = ", ".join(f"{k} {train[k]:g}" for k in (length, "lr", "batch_size") if isinstance(train.get(k), (int, float)))
        if (finetune or {}).get("chain"):
            how += (f"; lottery tickets: one chain per seed up the levels, {finetune['rounds']} round(s) of pruning "
                    "between consecutive levels, rewound to the pre-trained weights")
        return [f"{task}: {result['protocol']}; accuracy on n={entry['n']} test examples, mean over seeds "
                f"{', '.join(map(str, entry.get('seeds', [])))}" + (f"; fine-tuned with {how}" if how else "")
                for task, entry in result["tasks"].items()]
    return protocol_lines(result)


def markdown(payload: dict) -> list[str]:
    """sweep.json as a report section: the curve as a table, the knee of each metric."""
    from .report import md_table

    curves = payload["curves"]
    fmt = lambda v, c: f"{v:.3f}" if c["lower_is_better"] else f"{100 * v:.2f}"  # noqa: E731
    header = ["level", "achieved", *[n + ("" if c["lower_is_better"] else " (%)") for n, c in curves.items()]]
    rows = [["dense", "", *[fmt(c["dense"], c) for c in curves.values()]]]
    rows += [[lv["pattern"] or f"{lv['sparsity']:g}", f"{lv['achieved']:.4f}",
              *[fmt(c["values"][i], c) for c in curves.values()]] for i, lv in enumerate(payload["levels"])]
    lines = [f"## Essential sparsity: {payload['method']} ({payload['scope']} scope{allocation_label(payload)}) "
             f"on {payload['model']}", ""]
    lines += md_table(header, rows)
    lines += [f"- {k['summary']}" for k in payload["knees"].values()]
    lines += ["", f"Rule: {next(iter(payload['knees'].values()))['rule']}" if payload["knees"] else "", ""]
    lines += [f"- {p}" for p in payload["protocol"]]
    lines += ["", f"Time: pruning {payload['time']['prune_s']:.1f} s, evaluation {payload['time']['eval_s']:.1f} s.", ""]
    return lines
