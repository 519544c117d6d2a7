"""Initialisation blends: α·(transferred delta) + β·(base evolution) + γ·(seeded fresh direction), per
module group, re-factorised to the transferred rank so a trial can swap weights in place.

Everything here works on factors (out × r, r × in); no dense ΔW is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramigrate.lora import Delta, refactor

KINDS = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "qkv": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}
DEPTHS = ("early", "middle", "late")


def module_group(layer: int, n_layers: int, role: str) -> str:
    """``attn.early`` … ``mlp.late``: attention or MLP, and which third of the depth."""
    return f"{KINDS[role]}.{DEPTHS[min(3 * layer // max(n_layers, 1), 2)]}"


@dataclass(frozen=True)
class Ingredients:
    """One module's ingredients, each as (B, A) with the LoRA scale folded into B.

    transfer: the transferred delta; evolution: a rank-k view of W_new − W_old in new coordinates (None
    where the module has no source); fresh: a seeded random direction with ‖B·A‖_F = ‖transfer‖_F.
    """

    group: str
    rank: int
    transfer: tuple[torch.Tensor, torch.Tensor]
    evolution: tuple[torch.Tensor, torch.Tensor] | None
    fresh: tuple[torch.Tensor, torch.Tensor]


def fresh_direction(out_dim: int, in_dim: int, rank: int, norm: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random factors whose product has Frobenius norm ``norm``."""
    g = torch.Generator().manual_seed(seed)
    b, a = torch.randn(out_dim, rank, generator=g), torch.randn(rank, in_dim, generator=g)
    return b * (norm / max(Delta(b, a, 1.0).norm(), 1e-30)), a


def blend(parts: Ingredients, alpha: float, beta: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """α·transfer + β·evolution + γ·fresh, as rank-``parts.rank`` factors (scale folded into B)."""
    bs, as_ = [alpha * parts.transfer[0]], [parts.transfer[1]]
    if parts.evolution is not None and beta != 0.0:
        bs.append(beta * parts.evolution[0])
        as_.append(parts.evolution[1])
    if gamma != 0.0:
        bs.append(gamma * parts.fresh[0])
        as_.append(parts.fresh[1])
    if len(bs) == 1:  # α·transfer alone: keep its factors, so the as-is point is the transferred adapter itself
        return bs[0], as_[0]
    b, a, _ = refactor(torch.cat(bs, 1), torch.cat(as_, 0), rank=parts.rank)
    return _pad(b, a, parts.rank)


def _pad(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero columns/rows up to ``rank`` (refactor drops directions of a lower-rank sum)."""
    if b.shape[1] < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1)
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], 0)
    return b, a
