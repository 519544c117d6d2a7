"""Finetune stage building blocks: scheduled regularisation toward the initial adapter, RefLoRA
rebalancing of the factors."""

from loramigrate.finetune.rebalance import rebalance_full, rebalance_scalar
from loramigrate.finetune.regularise import SCHEDULES, delta_distance_sq, schedule_value

__all__ = ["SCHEDULES", "delta_distance_sq", "rebalance_full", "rebalance_scalar", "schedule_value"]
