"""Eval stage: a base alone and with adapters on a task's test split, against a reference pair."""

from loramigrate.eval.runner import RESULTS, Comparison, Pair, compare, run_eval

__all__ = ["RESULTS", "Comparison", "Pair", "compare", "run_eval"]
