"""Scheduled regularisation toward the initial adapter: λ(t) · ‖s·B·A − s₀·B₀·A₀‖²_F.

The distance is computed from r × r Gram products, never from the out × in delta:
‖sBA − s₀B₀A₀‖² = s²·tr((BᵀB)(AAᵀ)) − 2·s·s₀·tr((BᵀB₀)(A₀Aᵀ)) + s₀²·tr((B₀ᵀB₀)(A₀A₀ᵀ)).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def delta_distance_sq(b: torch.Tensor, a: torch.Tensor, scale: float, b0: torch.Tensor, a0: torch.Tensor,
                      scale0: float, init_sq: torch.Tensor | None = None) -> torch.Tensor:
    """‖scale·b@a − scale0·b0@a0‖²_F; b (out, r), a (r, in), b0 (out, r0), a0 (r0, in). Differentiable.

    ``init_sq`` = ``init_norm_sq(b0, a0, scale0)``, which a training loop computes once: it does not change.
    """
    own = ((b.T @ b) * (a @ a.T)).sum()
    cross = ((b.T @ b0) * (a @ a0.T)).sum()
    init = init_norm_sq(b0, a0, scale0) if init_sq is None else init_sq
    return scale * scale * own - 2 * scale * scale0 * cross + init


def init_norm_sq(b0: torch.Tensor, a0: torch.Tensor, scale0: float) -> torch.Tensor:
    """‖scale0·b0@a0‖²_F from r × r Grams."""
    return scale0 * scale0 * ((b0.T @ b0) * (a0 @ a0.T)).sum()


def _constant(start: float, final: float, progress: float, switch: float) -> float:
    return start


def _step(start: float, final: float, progress: float, switch: float) -> float:
    return start if progress < switch else final


def _linear(start: float, final: float, progress: float, switch: float) -> float:
    return start + (final - start) * progress


def _cosine(start: float, final: float, progress: float, switch: float) -> float:
    return final + (start - final) * (1 + math.cos(math.pi * progress)) / 2


def _exponential(start: float, final: float, progress: float, switch: float) -> float:
    if start <= 0 or final <= 0:
        raise ValueError("the exponential schedule needs positive start and final values")
    return start * (final / start) ** progress


# λ(t): strong first, then relaxed. ``progress`` = step / total steps in [0, 1].
SCHEDULES: dict[str, Callable[[float, float, float, float], float]] = {
    "constant": _constant,
    "step": _step,
    "linear": _linear,
    "cosine": _cosine,
    "exponential": _exponential,
}


def schedule_value(name: str, start: float, final: float, step: int, total: int, switch: float = 0.5) -> float:
    """λ at ``step`` of ``total`` under schedule ``name`` (``switch`` is the step schedule's switch point)."""
    return SCHEDULES[name](start, final, min(max(step / max(total, 1), 0.0), 1.0), switch)
