"""Evaluation hand-off: lm-eval tasks (MMLU categories, ARC-Easy, PIQA, HellaSwag) and token
perplexity, for in-memory models or checkpoint directories, beside a cached dense baseline."""

from .api import dense_results, evaluate_path, evaluate_pruned
from .harness import evaluate
from .mmlu import CATEGORIES, SUBJECTS, aggregate_categories
from .perplexity import token_perplexity
from .results import compare, format_rows, write_outputs
from .settings import EvalSettings

__all__ = ["CATEGORIES", "SUBJECTS", "EvalSettings", "aggregate_categories", "compare", "dense_results", "evaluate",
           "evaluate_path", "evaluate_pruned", "format_rows", "token_perplexity", "write_outputs"]
