"""Low-rank maths shared by the stages: deltas as factors, re-factorisation, and the factor-space maps
that carry an old-base update into the new base's coordinates.

Every delta is mapped as factors, never as a dense out × in matrix: output-side maps act on the rows
of B, input-side maps on the columns of A, so ΔW' = M_out (s · B A) M_inᵀ keeps rank ≤ r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramigrate.alignment import Alignment, LayerAlignment
from loramigrate.arch import ModelSpec
from loramigrate.errors import IncompatibleModelsError

NORM_SLOT = {"q": 0, "k": 0, "v": 0, "qkv": 0, "gate": 1, "up": 1}  # which pre-norm feeds the role's input


@dataclass(frozen=True)
class Delta:
    """A low-rank update ΔW = scale · b @ a in one base's coordinates."""

    b: torch.Tensor  # (out, r)
    a: torch.Tensor  # (r, in)
    scale: float

    def norm(self, col_scale: torch.Tensor | None = None) -> float:
        """‖scale · b a diag(col_scale)‖_F from r × r Gram products."""
        a = self.a if col_scale is None else self.a * col_scale
        return self.scale * float(((self.b.T @ self.b) * (a @ a.T)).sum().clamp_min(0).sqrt())


def wrapper_prefix(spec: ModelSpec, module: str) -> str:
    """``"bert."`` when ``module`` names the base inside a task wrapper but ``spec`` describes the
    bare base (adapters trained with a classification head), else ``""``."""
    wrapped = spec.base_prefix + "."
    if spec.base_prefix and module.startswith(wrapped) and not spec.layers_path.startswith(wrapped):
        return wrapped
    return ""


def locate(spec: ModelSpec, module: str) -> tuple[int, str]:
    """(layer, role) of a module name in a model described by ``spec``.

    Raises:
        IncompatibleModelsError: the module is not a projection the alignment knows.
    """
    module = module.removeprefix(wrapper_prefix(spec, module))
    prefix = spec.layers_path + "."
    if module.startswith(prefix):
        layer, _, rest = module[len(prefix):].partition(".")
        for role, path in spec.modules.items():
            if rest == path and layer.isdigit():
                return int(layer), role
    raise IncompatibleModelsError(
        f"adapter module {module} is not one of the old base's attention/MLP projections "
        f"({', '.join(sorted(spec.modules))} under {spec.layers_path})"
    )


def refactor(b: torch.Tensor, a: torch.Tensor, rank: int | None = None, energy: float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Balanced rank-k factors of b @ a via QR of the factors and an SVD of the r × r core.

    ``rank`` fixes k; otherwise k is the smallest rank keeping ``energy`` of Σσ². Returns
    (b_k (out, k), a_k (k, in), kept energy fraction).
    """
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    total = float(s.pow(2).sum())
    if rank is None:
        cum = s.pow(2).cumsum(0) / max(total, 1e-300)
        rank = int((cum < (energy or 1.0) - 1e-12).sum()) + 1
    k = max(1, min(rank, s.numel()))
    root = s[:k].sqrt()
    b_k = (qb @ u[:, :k]) * root
    a_k = root[:, None] * (vh[:k] @ qa.T)
    kept = float(s[:k].pow(2).sum()) / total if total > 0 else 1.0
    return b_k.float(), a_k.float(), kept


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.reshape(n, -1, x.shape[-1])


def map_rows(role: str, b: torch.Tensor, la: LayerAlignment, old: ModelSpec, new: ModelSpec,
             t: torch.Tensor) -> torch.Tensor:
    """Output side: rows of B (out_old, r) → (out_new, r)."""
    if role == "qkv":  # GPT-NeoX fused rows, per head [q | k | v]: map each part, interleave again
        r = b.shape[1]
        parts = b.reshape(old.n_heads, 3, old.head_dim, r)
        mapped = [map_rows(p, parts[:, k].reshape(-1, r), la, old, new, t).reshape(new.n_heads, new.head_dim, r)
                  for k, p in enumerate(("q", "k", "v"))]
        return torch.stack(mapped, 1).reshape(-1, r)
    if role in ("o", "down"):  # writes into the residual stream: h_new ≈ T h_old
        return t.to(b.device) @ b
    if role in ("gate", "up"):  # rows are neurons
        src = la.mlp_map.to(b.device)
        return torch.where((src >= 0)[:, None], b[src.clamp_min(0)], torch.zeros((), device=b.device))
    if role == "q":
        heads = _heads(b, old.n_heads)
        out = b.new_zeros(new.n_heads, new.head_dim, b.shape[1])
        for h, src in enumerate(la.head_map):
            if src is not None:
                out[h] = la.q_map[h].to(b.device) @ heads[src]
        return out.reshape(-1, b.shape[1])
    # k / v: each new kv group averages what its query heads' source groups carry (GQA merge), and
    # several new groups fed by one old group each get a copy (replication).
    groups = _heads(b, old.n_kv_heads)
    maps = la.k_map if role == "k" else la.v_map
    out = b.new_zeros(new.n_kv_heads, new.head_dim, b.shape[1])
    count = [0] * new.n_kv_heads
    for h, src in enumerate(la.head_map):
        if src is not None:
            g = h // new.group_size
            out[g] += maps[h].to(b.device) @ groups[src // old.group_size]
            count[g] += 1
    return (out / b.new_tensor(count).clamp_min(1)[:, None, None]).reshape(-1, b.shape[1])


def map_cols(role: str, a: torch.Tensor, la: LayerAlignment, old: ModelSpec, new: ModelSpec,
             input_map: torch.Tensor | None) -> torch.Tensor:
    """Input side: columns of A (r, in_old) → (r, in_new). ``input_map`` (in_old, d_new) is the
    hidden-input map with norm scales folded in (q, k, v, qkv, gate, up; None for o and down)."""
    if role in NORM_SLOT:  # reads the (normalised) hidden state
        return a @ input_map.to(a.device)
    if role == "down":  # columns are neurons
        src = la.mlp_map.to(a.device)
        return torch.where((src >= 0)[None, :], a[:, src.clamp_min(0)], torch.zeros((), device=a.device))
    heads = a.reshape(a.shape[0], old.n_heads, old.head_dim)  # o: columns are head outputs (v space)
    out = a.new_zeros(a.shape[0], new.n_heads, new.head_dim)
    for h, src in enumerate(la.head_map):
        if src is not None:
            out[:, h] = heads[:, src] @ la.v_map[h].to(a.device).T
    return out.reshape(a.shape[0], -1)


def pseudo_inverse(t: torch.Tensor) -> torch.Tensor:
    """T⁺ through the normal equations of the smaller side (an SVD-based pinv is ~20× slower here);
    a tiny ridge keeps rank-deficient maps finite."""
    t = t.double()
    tall = t.shape[0] >= t.shape[1]
    gram = t.T @ t if tall else t @ t.T
    gram = gram + 1e-10 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (torch.linalg.solve(gram, t.T) if tall else torch.linalg.solve(gram, t).T).float()


def normed_input_map(g_old: torch.Tensor, g_new: torch.Tensor, t_pinv: torch.Tensor) -> torch.Tensor:
    """(d_old, d_new) map with x_old ≈ map @ x_new for an input read behind norms with scales g_old / g_new.

    x_old = g_old ⊙ n_old, n_old ≈ T⁺ n_new, n_new = x_new / g_new, so map = diag(g_old) T⁺ diag(1/g_new).
    Normalised vectors have unit RMS in both models, so their norms are √d_old and √d_new whatever scale
    T carries (none for Procrustes, the embeddings' for lstsq): T⁺ is rescaled to RMS singular value
    √(d_old/d_new).
    """
    d_old, d_new = t_pinv.shape
    rms_sv = t_pinv.norm() / min(d_old, d_new) ** 0.5
    safe = torch.where(g_new.abs() < 1e-6, torch.full_like(g_new, 1e-6), g_new)
    return g_old[:, None] * t_pinv * ((d_old / d_new) ** 0.5 / rms_sv) / safe[None, :]


def hidden_input_map(alignment: Alignment, t_pinv: torch.Tensor, old_layer: int, new_layer: int, slot: int
                     ) -> torch.Tensor:
    """``normed_input_map`` for a projection input behind the pre-norm ``slot`` of a layer pair."""
    g_old, g_new = alignment.old_profile.norms[old_layer, slot], alignment.new_profile.norms[new_layer, slot]
    return normed_input_map(g_old.to(t_pinv.device), g_new.to(t_pinv.device), t_pinv)


def map_factors(alignment: Alignment, new_layer: int, role: str, b: torch.Tensor, a: torch.Tensor,
                t_pinv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (b: out_old × r, a: r × in_old) of an OLD-base update of ``role`` in the source layer of
    ``new_layer`` → factors in the new layer's coordinates. A dense weight W maps as (W, I).

    ``t_pinv`` may pass the pseudo-inverse of the layer's T when the caller already has it.
    """
    la = alignment.layers[new_layer]
    t = (la.transfer if la.transfer is not None else alignment.transfer).to(b.device)  # a dense W maps on its device
    if t_pinv is None:
        t_pinv = pseudo_inverse(t)
    slot = NORM_SLOT.get(role)
    input_map = hidden_input_map(alignment, t_pinv, la.old_layer, new_layer, slot) if slot is not None else None
    old, new = alignment.old, alignment.new
    return map_rows(role, b, la, old, new, t), map_cols(role, a, la, old, new, input_map)
