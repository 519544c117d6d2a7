"""Align stage: compare an OLD and a NEW base model (no adapter) and map one onto the other."""

from loramigrate.align.core import align_models
from loramigrate.align.runner import run_align

__all__ = ["align_models", "run_align"]
