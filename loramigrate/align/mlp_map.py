"""Intermediate (MLP neuron) maps between a mapped old/new layer pair.

A neuron is described by its input rows (gate and up) and its output column (down). New input rows
are brought into old hidden coordinates through T, old output columns into new ones, and neurons
are compared by the mean of the two cosines. A map has one entry per NEW neuron: the OLD neuron
index, or -1 (no source).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from scipy.optimize import linear_sum_assignment

from loramigrate.arch import LayerWeights

_HUNGARIAN_MAX = 2048  # above this a dense assignment costs minutes per layer on a CPU


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def neuron_similarity(old: LayerWeights, new: LayerWeights, transfer: torch.Tensor) -> torch.Tensor:
    """(I_new, I_old) mean cosine of input rows and output columns, computed on the weights' device."""
    t = transfer.float().to(old.up.device)
    in_old = torch.cat([w for w in (old.gate, old.up) if w is not None], 1)
    in_new = torch.cat([w @ t for w in (new.gate, new.up) if w is not None], 1)
    out_old = (t @ old.down).T  # (I_old, d_new)
    out_new = new.down.T
    sim_in = _unit_rows(in_new) @ _unit_rows(in_old).T
    sim_out = _unit_rows(out_new) @ _unit_rows(out_old).T
    return ((sim_in + sim_out) / 2).cpu()


def match_hungarian(sim: torch.Tensor) -> torch.Tensor:
    rows, cols = linear_sum_assignment(sim.double().numpy(), maximize=True)
    result = torch.full((sim.shape[0],), -1, dtype=torch.long)
    result[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return result


def match_mutual_best(sim: torch.Tensor) -> torch.Tensor:
    """Keep the pairs that are each other's best match: one-to-one, linear time in the matrix."""
    best_old = sim.argmax(1)
    best_new = sim.argmax(0)
    mutual = best_new[best_old] == torch.arange(sim.shape[0])
    return torch.where(mutual, best_old, torch.full_like(best_old, -1))


def match_greedy(sim: torch.Tensor) -> torch.Tensor:
    """Each old neuron claims its best new neuron, most similar pairs first; one-to-one, and it
    covers far more neurons than mutual best matches at the same linear cost."""
    best_sim, best_new = sim.max(0)
    result = torch.full((sim.shape[0],), -1, dtype=torch.long)
    for old in torch.argsort(best_sim, descending=True).tolist():
        new = int(best_new[old])
        if result[new] < 0:
            result[new] = old
    return result


def match_identity(sim: torch.Tensor) -> torch.Tensor:
    n_new, n_old = sim.shape
    idx = torch.arange(n_new)
    return torch.where(idx < n_old, idx, torch.full_like(idx, -1))


MLP_MATCHERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hungarian": match_hungarian,
    "mutual_best": match_mutual_best,
    "greedy": match_greedy,
    "identity": match_identity,
}


def resolve_mlp_matcher(name: str, n_old: int, n_new: int) -> str:
    """``auto``: exact Hungarian when small enough, mutual best matches otherwise."""
    if name != "auto":
        return name
    return "hungarian" if max(n_old, n_new) <= _HUNGARIAN_MAX else "mutual_best"
