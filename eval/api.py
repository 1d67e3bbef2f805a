"""Checkpoint-level entry points: evaluate a directory, or a pruned model beside its dense source.

    evaluate_path(path, ["mmlu", "ppl"], settings)                    any checkpoint directory
    evaluate_pruned(dense_dir, pruned_dir_or_model, tasks, settings, out_dir)   + cached dense baseline

Under ``accelerate launch`` with several processes, ``evaluate_path`` hands lm-eval the path (not
a model object) so that lm-eval's HFLM places one replica per process and splits the requests
(data parallel); perplexity windows are split across ranks the same way. Only rank 0 gets results.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

from ..errors import UserError
from ..runtime import require
from .harness import evaluate, evaluate_lm, resolve_data
from .load import load_model, model_kwargs, pick_device
from .results import baseline_key, checkpoint_id, format_rows, load_baseline, store_baseline, write_outputs
from .settings import EvalSettings


def world_size() -> int:
    """Processes in this launch (``accelerate launch`` / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def evaluate_path(path: str | Path, tasks: list[str], settings: EvalSettings = EvalSettings(), *,
                  tokenizer: str | Path | None = None) -> dict | None:
    """Evaluate the checkpoint directory ``path``; None on non-zero ranks of a data-parallel launch."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a checkpoint directory (no config.json)")
    if world_size() > 1:
        if not pick_device(settings.device).startswith("cuda"):
            # lm-eval's HFLM splits requests across processes only on accelerators; on CPU every
            # process would evaluate everything and race to write the same files.
            raise UserError(f"{world_size()} processes were launched, but data-parallel evaluation needs one GPU per "
                            "process (lm-eval splits requests only on CUDA devices); run a single process on CPU")
        result = evaluate_lm(_distributed_hflm(path, settings, tokenizer), tasks, settings)
    else:
        model, tok = load_model(path, settings, tokenizer)
        result = evaluate(model, tok, tasks, settings)
        del model
        gc.collect()
    if result is not None:
        result["model"]["path"] = str(path.resolve())
    return result


def _distributed_hflm(path: Path, settings: EvalSettings, tokenizer):
    from .harness import counting_hflm
    from .load import load_tokenizer

    load_tokenizer(path, tokenizer)  # fail early, with our message, when there is none
    kw = model_kwargs(settings)
    # HFLM's own loader places the replica on this rank's device; it forwards the rest to from_pretrained.
    return counting_hflm(quiet=not settings.progress, pretrained=str(path), tokenizer=str(tokenizer or path),
                         batch_size=settings.batch_for(pick_device(settings.device)),
                         max_batch_size=settings.max_batch_size, device=pick_device(settings.device), **kw)


def dense_results(dense_path: str | Path, tasks: list[str], settings: EvalSettings, *,
                   tokenizer: str | Path | None = None) -> dict:
    """The dense model's results for ``tasks``, from the cache where possible (one entry per task,
    keyed by the checkpoint fingerprint and the settings that change the numbers)."""
    require("lm_eval", "evaluation")
    import lm_eval

    dense_path = Path(dense_path)
    fp = checkpoint_id(dense_path)
    data = resolve_data(settings.data)
    keys = {t: baseline_key(fp, t, settings.to_json(), data, lm_eval.__version__) for t in tasks}
    cached = {t: e for t in tasks if (e := load_baseline(keys[t])) is not None}
    missing = [t for t in tasks if t not in cached]
    result = None
    if missing:
        result = evaluate_path(dense_path, missing, settings, tokenizer=tokenizer)
        if result is None:
            return None
        for t in missing:
            store_baseline(keys[t], result["tasks"][t])
    if result is None:  # everything cached: describe the run from what we know
        result = {"model": {"path": str(dense_path.resolve())}, "settings": {**settings.to_json(), "data_resolved": data},
                  "versions": {"lm_eval": lm_eval.__version__}}
    result["tasks"] = {t: {**cached[t], "cached": True} if t in cached else result["tasks"][t] for t in tasks}
    result["model"]["fingerprint"] = fp
    return result


def evaluate_pruned(dense_path: str | Path, pruned, tasks: list[str], settings: EvalSettings = EvalSettings(),
                    out_dir: str | Path | None = None, dense_baseline: bool = True, *,
                    tokenizer=None, label: str | None = None, echo: bool = True) -> dict | None:
    """Evaluate ``pruned`` (a checkpoint directory, or a model object with ``tokenizer``) and, when
    ``dense_baseline``, the dense source (cached); print the table and write results.json and
    report.md to ``out_dir`` (default: the pruned checkpoint directory). Returns results.json's payload."""
    if isinstance(pruned, (str, Path)):
        pruned_result = evaluate_path(pruned, tasks, settings, tokenizer=tokenizer)
        out_dir = out_dir or pruned
        label = label or Path(pruned).name
    else:
        if out_dir is None:
            raise UserError("evaluating an in-memory model needs an output directory")
        if tokenizer is None:
            from .load import load_tokenizer

            tokenizer = load_tokenizer(Path(dense_path))
        pruned_result = evaluate(pruned, tokenizer, tasks, settings)
        label = label or "pruned"
    dense = dense_results(dense_path, tasks, settings) if dense_baseline else None
    if pruned_result is None:
        return None  # non-zero rank
    payload = write_outputs(Path(out_dir), pruned_result, dense,
                            labels={"pruned": label, "dense": str(dense_path) if dense_baseline else None})
    if echo:
        print(format_rows(payload["rows"], label))
    return payload
