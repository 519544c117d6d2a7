"""Attention-head matching between a mapped old/new layer pair, data-free from the weights.

Each old head's QK circuit (Qᵀ K, hidden × hidden) and OV circuit (O V) is compared with each new
head's, in the old model's hidden coordinates through the transfer matrix T, by cosine similarity.
Inner products use the trace identity ⟨QᵀK, PᵀR⟩ = Σ (Q Pᵀ) ⊙ (K Rᵀ), so only head_dim × head_dim
blocks are formed, never a hidden × hidden matrix per head pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from scipy.optimize import linear_sum_assignment

from loramigrate.arch import LayerWeights, ModelSpec

HeadMap = list[int | None]


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per head pair a_i b_jᵀ as one matmul: (I, ha, d), (J, hb, d) → (I, ha, J, hb)."""
    return (a.reshape(-1, a.shape[-1]) @ b.reshape(-1, b.shape[-1]).T).view(a.shape[0], a.shape[1], b.shape[0], b.shape[1])


def _circuit_inner(g_heads: torch.Tensor, g_groups: torch.Tensor) -> torch.Tensor:
    """Σ_ab G_heads[i,a,j,b] · G_groups[g(i),a,g(j),b] → (H_old, H_new), kv groups broadcast, not copied."""
    h_old, hd_o, h_new, hd_n = g_heads.shape
    g_old, g_new = g_groups.shape[0], g_groups.shape[2]
    heads = g_heads.view(g_old, h_old // g_old, hd_o, g_new, h_new // g_new, hd_n)
    groups = g_groups.view(g_old, 1, hd_o, g_new, 1, hd_n)
    return (heads * groups).sum((2, 5)).reshape(h_old, h_new)


def _self_inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a_hᵀ b_g(h)‖²_F per head as ⟨a aᵀ, b bᵀ⟩ (head_dim²). a: (H, hd, d), b: (G, hd, d)."""
    aa = (a @ a.transpose(1, 2)).view(b.shape[0], a.shape[0] // b.shape[0], a.shape[1], a.shape[1])
    bb = (b @ b.transpose(1, 2))[:, None]
    return (aa * bb).sum((2, 3)).reshape(-1)


def _cosine(inner: torch.Tensor, norm_old: torch.Tensor, norm_new: torch.Tensor) -> torch.Tensor:
    return inner / (norm_old[:, None] * norm_new[None, :]).sqrt().clamp_min(1e-30)


def _sketch(dim: int, size: int | None, seed: int) -> torch.Tensor | None:
    if size is None or size >= dim:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, size, generator=g) / size**0.5


def head_similarity(old: LayerWeights, new: LayerWeights, transfer: torch.Tensor, sketch: int | None = None,
                    seed: int = 0) -> torch.Tensor:
    """Mean of QK and OV circuit cosines for every (new head, old head): (H_new, H_old).

    Args:
        old, new: head-split weights of the mapped layers (see ``LayerWeights``).
        transfer: T (d_new, d_old) with h_new ≈ T h_old.
        sketch: project the hidden dimension onto this many random directions first (seeded):
            8× less work at 512 for hidden 4096, at the price of approximate cosines.
    """
    # float32 is plenty for cosines and halves the cost of the (H·hd)² × hidden products; on the weights' device
    t = transfer.float().to(old.q.device)
    s_in, s_out = (None if s is None else s.to(t.device)
                   for s in (_sketch(t.shape[1], sketch, seed), _sketch(t.shape[0], sketch, seed + 1)))
    t_in = t if s_in is None else t @ s_in  # new inputs → (sketched) old coordinates
    t_out = t.T if s_out is None else t.T @ s_out  # old outputs → (sketched) new coordinates

    def old_in(w: torch.Tensor) -> torch.Tensor:
        return w.float() if s_in is None else w.float() @ s_in

    q_o, k_o, v_o = old_in(old.q), old_in(old.k), old_in(old.v)
    q_n, k_n, v_n = (w.float() @ t_in for w in (new.q, new.k, new.v))
    o_o = old.o.float() @ t_out
    o_n = new.o.float() if s_out is None else new.o.float() @ s_out

    qk = _cosine(_circuit_inner(_cross(q_o, q_n), _cross(k_o, k_n)), _self_inner(q_o, k_o), _self_inner(q_n, k_n))
    ov = _cosine(_circuit_inner(_cross(o_o, o_n), _cross(v_o, v_n)), _self_inner(o_o, v_o), _self_inner(o_n, v_n))
    return ((qk + ov) / 2).T.cpu()


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


def rope_pairs(rot_old: int, rot_new: int, theta_old: float, theta_new: float) -> list[tuple[int, int]]:
    """(new pair, old pair) of rotary frequency pairs: each new pair takes the old pair of the nearest
    log-frequency (one-to-one). Rotary (rotate_half layout) pairs dims (i, i + rot/2) at θ^(-2i/rot)."""
    log_fo = -2 * torch.arange(rot_old // 2, dtype=torch.float64) / rot_old * math.log(theta_old)
    log_fn = -2 * torch.arange(rot_new // 2, dtype=torch.float64) / rot_new * math.log(theta_new)
    rows, cols = linear_sum_assignment((log_fn[:, None] - log_fo[None, :]).abs().numpy())
    return list(zip(rows.tolist(), cols.tolist(), strict=True))


def rope_dim_map(hd_old: int, hd_new: int, rot_old: int, rot_new: int, theta_old: float, theta_new: float,
                 cross: torch.Tensor | None = None) -> torch.Tensor:
    """(hd_new, hd_old) map of query/key coordinates that keeps rotary pairs and frequencies.

    Each new pair takes its ``rope_pairs`` old pair through a 2×2 rotation, which commutes with the rotary
    embedding, so mapped coordinates rotate exactly as before; 64 → 128 dims at one θ sends old pair i to
    new pair 2i. The rotation of a pair is the orthogonal Procrustes fit in 2D on ``cross`` (hd_new, hd_old),
    Σ new rows · old rowsᵀ of the heads' q/k weights, and the identity where that block is zero (no data) or
    ``cross`` is None. Non-rotary tail dims map in order.
    """
    po, pn = rot_old // 2, rot_new // 2
    m = torch.zeros(hd_new, hd_old)
    for i_new, i_old in rope_pairs(rot_old, rot_new, theta_old, theta_new):
        rows, cols = [i_new, i_new + pn], [i_old, i_old + po]
        angle = 0.0
        if cross is not None:  # argmax_θ tr(R(θ)ᵀ C) for the pair's 2×2 block C
            c = cross[rows][:, cols].double()
            angle = math.atan2(float(c[1, 0] - c[0, 1]), float(c[0, 0] + c[1, 1]))
        cos, sin = math.cos(angle), math.sin(angle)
        m[i_new, i_old], m[i_new, i_old + po], m[i_new + pn, i_old], m[i_new + pn, i_old + po] = cos, -sin, sin, cos
    for k in range(min(hd_new - rot_new, hd_old - rot_old)):
        m[rot_new + k, rot_old + k] = 1.0
    return m


def procrustes_map(new_rows: torch.Tensor, old_rows: torch.Tensor) -> torch.Tensor:
    """(hd_new, hd_old) map with orthonormal rows or columns best taking old head coordinates to new.

    ``new_rows`` (hd_new, d) and ``old_rows`` (hd_old, d) are head weights in the same input space.
    """
    u, _, vh = torch.linalg.svd(new_rows.double() @ old_rows.double().T, full_matrices=False)
    return (u @ vh).float()


def head_space_maps(old: LayerWeights, new: LayerWeights, transfer: torch.Tensor, head_map: HeadMap,
                    old_spec: ModelSpec, new_spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Per NEW query head, the map from its source head's coordinates to its own: (H_new, hd_new, hd_old)
    for q, k and v (k and v between the two heads' kv groups). Zeros where a head has no source.

    With rotary embeddings q/k use ``rope_dim_map``, rotations fitted per new kv group on the q weights of its
    heads and the k weights of their groups (scores need one rotation for a query head and its keys; any other
    mixing would break positions); v, and q/k without rotary embeddings, use an orthogonal Procrustes fit of the
    head weights through T.
    """
    t = transfer.float().to(old.q.device)  # the fits run on the weights' device; the maps return to the CPU
    hd_o, hd_n = old_spec.head_dim, new_spec.head_dim
    maps = {role: torch.zeros(new_spec.n_heads, hd_n, hd_o, device=t.device) for role in ("q", "k", "v")}
    rope = old_spec.rope_theta and new_spec.rope_theta
    cross = torch.zeros(new_spec.n_kv_heads, hd_n, hd_o, device=t.device)  # Σ of new · oldᵀ q/k rows per new kv group
    for h_new, h_old in enumerate(head_map):
        if h_old is None:
            continue
        g_new, g_old = h_new // new_spec.group_size, h_old // old_spec.group_size
        pairs = {"q": (new.q[h_new], old.q[h_old]), "k": (new.k[g_new], old.k[g_old]), "v": (new.v[g_new], old.v[g_old])}
        for role, (w_new, w_old) in pairs.items():
            if rope and role in ("q", "k"):
                cross[g_new] += (w_new.float() @ t) @ w_old.float().T
            else:
                maps[role][h_new] = procrustes_map(w_new.float() @ t, w_old.float())
    if rope:
        rotary = [rope_dim_map(hd_o, hd_n, old_spec.rotary_dim or hd_o, new_spec.rotary_dim or hd_n,
                               old_spec.rope_theta, new_spec.rope_theta, c) for c in cross]
        for h_new, h_old in enumerate(head_map):
            if h_old is not None:
                maps["q"][h_new] = maps["k"][h_new] = rotary[h_new // new_spec.group_size].to(t.device)
    return {role: m.cpu() for role, m in maps.items()}
