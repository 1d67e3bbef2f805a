"""``custom_dataset`` loaders for the task configs in this folder (lm-eval imports this file by
path through ``!function``). lm-eval calls them with the task's metadata and ``dataset_kwargs``
as keyword arguments; only ``subject`` matters here."""

from llm_prune.eval.data import load_local


def mmlu(subject=None, **_):
    return load_local("mmlu", subject)


def arc_easy(**_):
    return load_local("arc_easy")


def piqa(**_):
    return load_local("piqa")


def hellaswag(**_):
    return load_local("hellaswag")


def hellaswag_process_docs(dataset):
    # lm-eval's own preprocessing, so prompts match its hellaswag task exactly.
    from lm_eval.tasks.hellaswag.utils import process_docs

    return process_docs(dataset)
