"""Search stage: Bayesian optimisation (Optuna) over initialisation blends before fine-tuning."""

from loramigrate.search.runner import run_search

__all__ = ["run_search"]
