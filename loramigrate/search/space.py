"""The search space, scaled to the base pair.

Between separately trained bases a wide space wastes a small trial budget: on Qwen2.5-Coder 0.5B → 1.5B,
12 GP trials with β up to ±0.9 of W_new − W_old and α up to 2 never beat the transfer as is. So α stays in
a band around 1, and β (the base evolution) is searched only where it means something: same shapes and
every layer and head mapped to itself, i.e. the new base is the old one trained further.
"""

from __future__ import annotations

import logging

from loramigrate.alignment import Alignment

log = logging.getLogger(__name__)
Space = dict[str, tuple[float, float]]  # parameter name → (low, high)
DRIFT_BETA_MAX = 1.0  # β range of a drifted pair: up to the whole evolution, either sign
SHAPES = ("model_type", "n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "intermediate")


def only_drifted(alignment: Alignment) -> bool:
    """Same shapes, and the alignment maps every layer and every head to itself: W_new − W_old is then
    the base's own update. Between separately trained bases it is mostly noise in another basis."""
    old, new = alignment.old, alignment.new
    if any(getattr(old, f) != getattr(new, f) for f in SHAPES):
        return False
    heads = list(range(new.n_heads))
    return (alignment.layer_map == list(range(new.n_layers))
            and all(la.head_map == heads for la in alignment.layers.values()))


def resolve_beta_max(beta_max: float | None, alignment: Alignment) -> float:
    """An explicit ``beta_max``, or the pair's: ``DRIFT_BETA_MAX`` for a drifted pair, else 0 (β off)."""
    if beta_max is not None:
        return beta_max
    drifted = only_drifted(alignment)
    log.info("auto β range: %s", f"±{DRIFT_BETA_MAX:g} (same shapes, layers and heads map to themselves)"
             if drifted else "off (the bases differ in shape or in layer/head order: separately trained)")
    return DRIFT_BETA_MAX if drifted else 0.0


def search_space(kind: str, groups: list[str], alpha: tuple[float, float], beta_max: float,
                 gamma_max: float) -> Space:
    """``global``: one α and one β for every module (the paper's two coefficients); ``groups``: α, β, γ per
    module group. A coefficient whose range is 0 is left out, so no trial is spent on it. α's range always holds
    1: trial 0, the transfer as is, is a point of the space (the samplers learn from it like any other trial)."""
    held = (min(alpha[0], 1.0), max(alpha[1], 1.0))
    if held != tuple(alpha):
        log.info("α range [%g, %g] widened to [%g, %g]: it holds α = 1, trial 0 (the transfer as is)", *alpha, *held)
    ranges = {"alpha": held, "beta": (-beta_max, beta_max), "gamma": (0.0, gamma_max)}
    names = ("alpha", "beta") if kind == "global" else ("alpha", "beta", "gamma")
    wanted = [n for n in names if ranges[n][1] > 0]
    if kind == "global":
        return {n: ranges[n] for n in wanted}
    return {f"{n}.{g}": ranges[n] for g in groups for n in wanted}


def coefficients(params: dict[str, float], group: str) -> tuple[float, float, float]:
    """(α, β, γ) of one module group under either space; a coefficient left out of the space is 0."""
    def value(name: str) -> float:
        return params.get(name, params.get(f"{name}.{group}", 0.0))
    return value("alpha"), value("beta"), value("gamma")


def as_is(space: Space) -> dict[str, float]:
    """The transfer-as-is point: α = 1, β = γ = 0."""
    return {name: 1.0 if name.startswith("alpha") else 0.0 for name in space}
