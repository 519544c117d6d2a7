"""Attention-head matching between a mapped old/new layer pair, data-free from the weights.

Each old head's QK circuit (Qᵀ K, hidden × hidden) and OV circuit (O V) is compared with each new
head's, in the old model's hidden coordinates through the transfer matrix T, by cosine similarity.
Inner products use the trace identity ⟨QᵀK, PᵀR⟩ = Σ (Q Pᵀ) ⊙ (K Rᵀ), so only head_dim × head_dim
blocks are formed, never a hidden × hidden matrix per head pair.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from scipy.optimize import linear_sum_assignment

from loramigrate.arch import LayerWeights

HeadMap = list[int | None]


def _expand_groups(g: torch.Tensor, n_old: int, n_new: int) -> torch.Tensor:
    """(G_old, G_new, …) kv-group blocks → (H_old, H_new, …) by each query head's group."""
    rep_old, rep_new = n_old // g.shape[0], n_new // g.shape[1]
    return g.repeat_interleave(rep_old, 0).repeat_interleave(rep_new, 1)


def _cosine(inner: torch.Tensor, norm_old: torch.Tensor, norm_new: torch.Tensor) -> torch.Tensor:
    return inner / (norm_old[:, None] * norm_new[None, :]).sqrt().clamp_min(1e-30)


def _self_inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖aᵀ b‖²_F per head as ⟨a aᵀ, b bᵀ⟩ (head_dim × head_dim). a, b: (H, hd, d)."""
    return torch.einsum("hab,hab->h", a @ a.transpose(1, 2), b @ b.transpose(1, 2))


def head_similarity(old: LayerWeights, new: LayerWeights, transfer: torch.Tensor) -> torch.Tensor:
    """Mean of QK and OV circuit cosines for every (new head, old head): (H_new, H_old).

    Args:
        old, new: head-split weights of the mapped layers (see ``LayerWeights``).
        transfer: T (d_new, d_old) with h_new ≈ T h_old.
    """
    # float32 is plenty for cosines and halves the cost of the (H·hd)² × hidden products.
    t = transfer.float()
    q_o, k_o, v_o, o_o = (w.float() for w in (old.q, old.k, old.v, old.o))
    q_n, k_n, v_n = (w.float() @ t for w in (new.q, new.k, new.v))  # new inputs in old coordinates
    o_n = new.o.float()
    o_ot = o_o @ t.T  # old head outputs in new coordinates: (H_old, hd_old, d_new)
    h_old, h_new = q_o.shape[0], q_n.shape[0]

    g_q = torch.einsum("iad,jbd->ijab", q_o, q_n)
    g_k = _expand_groups(torch.einsum("iad,jbd->ijab", k_o, k_n), h_old, h_new)
    qk = _cosine((g_q * g_k).sum((2, 3)),
                 _self_inner(q_o, _expand_groups_heads(k_o, h_old)),
                 _self_inner(q_n, _expand_groups_heads(k_n, h_new)))

    g_o = torch.einsum("iad,jbd->ijab", o_ot, o_n)
    g_v = _expand_groups(torch.einsum("iad,jbd->ijab", v_o, v_n), h_old, h_new)
    ov = _cosine((g_o * g_v).sum((2, 3)),
                 _self_inner(o_ot, _expand_groups_heads(v_o, h_old)),
                 _self_inner(o_n, _expand_groups_heads(v_n, h_new)))
    return ((qk + ov) / 2).T


def _expand_groups_heads(kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    return kv.repeat_interleave(n_heads // kv.shape[0], 0)


def assign_hungarian(sim: torch.Tensor) -> HeadMap:
    """One-to-one assignment maximising total similarity; surplus new heads get None."""
    rows, cols = linear_sum_assignment(sim.double().numpy(), maximize=True)
    result: HeadMap = [None] * sim.shape[0]
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        result[r] = c
    return result


def assign_identity(sim: torch.Tensor) -> HeadMap:
    """New head i ← old head i (an ablation and the same-shape default)."""
    n_new, n_old = sim.shape
    return [i if i < n_old else None for i in range(n_new)]


HEAD_MATCHERS: dict[str, Callable[[torch.Tensor], HeadMap]] = {
    "hungarian": assign_hungarian,
    "identity": assign_identity,
}


def kv_group_map(head_map: HeadMap, old_group_size: int, new_group_size: int, n_new_kv: int
                 ) -> list[int | None]:
    """Old kv group for each new kv group: the most common group of its query heads' sources."""
    result: list[int | None] = []
    for g in range(n_new_kv):
        sources = [head_map[h] // old_group_size for h in range(g * new_group_size, (g + 1) * new_group_size)
                   if head_map[h] is not None]
        result.append(max(sorted(set(sources)), key=sources.count) if sources else None)
    return result
