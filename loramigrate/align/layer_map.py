"""Old→new layer maps. Every mapper is one-to-one and order preserving: each new layer takes the
adapter of at most one old layer, and each old layer feeds at most one new layer, so an adapter's
effect is never applied twice. New layers left without a source are filled by transfer's policy.

A map is a list with one entry per NEW layer: the OLD layer index, or None.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LayerMap = list[int | None]


def _increasing_match(score: torch.Tensor) -> list[int]:
    """Strictly increasing columns c_0 < … < c_{n-1} maximising Σ score[i, c_i] (rows ≤ cols)."""
    n, m = score.shape
    s = score.double()
    best = torch.full((n, m), float("-inf"), dtype=torch.float64)
    back = torch.zeros((n, m), dtype=torch.long)
    best[0] = s[0]
    for i in range(1, n):
        prev_max, prev_arg = torch.cummax(best[i - 1], 0)  # best over columns ≤ j
        best[i, 1:] = s[i, 1:] + prev_max[:-1]
        back[i, 1:] = prev_arg[:-1]
    cols = [int(torch.argmax(best[n - 1]))]
    for i in range(n - 1, 0, -1):
        cols.append(int(back[i, cols[-1]]))
    return cols[::-1]


def map_cka_dp(sim: torch.Tensor) -> LayerMap:
    """Order-preserving one-to-one map maximising the summed similarity (dynamic programming)."""
    n_old, n_new = sim.shape
    if n_new >= n_old:
        result: LayerMap = [None] * n_new
        for old, new in enumerate(_increasing_match(sim)):
            result[new] = old
        return result
    return list(_increasing_match(sim.T))


def map_uniform(sim: torch.Tensor) -> LayerMap:
    """Spread the shorter stack evenly over the longer one."""
    n_old, n_new = sim.shape
    def spread(i: int, short: int, long: int) -> int:
        return round(i * (long - 1) / (short - 1)) if short > 1 else 0
    if n_new >= n_old:
        result: LayerMap = [None] * n_new
        for old in range(n_old):
            result[spread(old, n_old, n_new)] = old
        return result
    return [spread(new, n_new, n_old) for new in range(n_new)]


def map_first(sim: torch.Tensor) -> LayerMap:
    """Align the bottoms of the stacks: new layer i ← old layer i."""
    n_old, n_new = sim.shape
    return [i if i < n_old else None for i in range(n_new)]


def map_last(sim: torch.Tensor) -> LayerMap:
    """Align the tops of the stacks."""
    n_old, n_new = sim.shape
    shift = n_old - n_new
    return [i + shift if 0 <= i + shift < n_old else None for i in range(n_new)]


LAYER_MAPPERS: dict[str, Callable[[torch.Tensor], LayerMap]] = {
    "cka_dp": map_cka_dp,
    "uniform": map_uniform,
    "first": map_first,
    "last": map_last,
}
