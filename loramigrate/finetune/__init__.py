"""Finetune stage building blocks: scheduled regularisation toward the initial adapter."""

from loramigrate.finetune.regularise import SCHEDULES, delta_distance_sq, schedule_value

__all__ = ["SCHEDULES", "delta_distance_sq", "schedule_value"]
