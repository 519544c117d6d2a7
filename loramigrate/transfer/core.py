"""The transfer stage's core: old LoRA adapter + alignment → LoRA adapter in the new base's coordinates.

Every delta is mapped as factors, never as a dense out × in matrix: output-side maps act on the rows
of B, input-side maps on the columns of A, so ΔW' = M_out (s · B A) M_inᵀ keeps rank ≤ r. Then each
delta is re-factorised by QR of the factors and an SVD of the small r × r core.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramigrate.adapters import LoraAdapter, LoraModule
from loramigrate.alignment import Alignment, LayerAlignment
from loramigrate.arch import ROLES, ModelSpec
from loramigrate.errors import IncompatibleModelsError

_NORM_SLOT = {"q": 0, "k": 0, "v": 0, "qkv": 0, "gate": 1, "up": 1}  # which pre-norm feeds the role's input
ADAPTED_ROLES = (*ROLES, "qkv")
FILL_POLICIES = ("none", "nearest", "interpolate")


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
        return t @ b
    if role in ("gate", "up"):  # rows are neurons
        src = la.mlp_map
        return torch.where((src >= 0)[:, None], b[src.clamp_min(0)], torch.zeros(()))
    if role == "q":
        heads = _heads(b, old.n_heads)
        out = torch.zeros(new.n_heads, new.head_dim, b.shape[1])
        for h, src in enumerate(la.head_map):
            if src is not None:
                out[h] = la.q_map[h] @ heads[src]
        return out.reshape(-1, b.shape[1])
    # k / v: each new kv group averages what its query heads' source groups carry (GQA merge), and
    # several new groups fed by one old group each get a copy (replication).
    groups = _heads(b, old.n_kv_heads)
    maps = la.k_map if role == "k" else la.v_map
    out = torch.zeros(new.n_kv_heads, new.head_dim, b.shape[1])
    count = torch.zeros(new.n_kv_heads)
    for h, src in enumerate(la.head_map):
        if src is not None:
            g = h // new.group_size
            out[g] += maps[h] @ groups[src // old.group_size]
            count[g] += 1
    return (out / count.clamp_min(1)[:, None, None]).reshape(-1, b.shape[1])


def map_cols(role: str, a: torch.Tensor, la: LayerAlignment, old: ModelSpec, new: ModelSpec,
             input_map: torch.Tensor | None) -> torch.Tensor:
    """Input side: columns of A (r, in_old) → (r, in_new). ``input_map`` (in_old, d_new) is the
    hidden-input map with norm scales folded in (q, k, v, qkv, gate, up; None for o and down)."""
    if role in _NORM_SLOT:  # reads the (normalised) hidden state
        return a @ input_map
    if role == "down":  # columns are neurons
        src = la.mlp_map
        return torch.where((src >= 0)[None, :], a[:, src.clamp_min(0)], torch.zeros(()))
    heads = a.reshape(a.shape[0], old.n_heads, old.head_dim)  # o: columns are head outputs (v space)
    out = torch.zeros(a.shape[0], new.n_heads, new.head_dim)
    for h, src in enumerate(la.head_map):
        if src is not None:
            out[:, h] = heads[:, src] @ la.v_map[h].T
    return out.reshape(a.shape[0], -1)


def pseudo_inverse(t: torch.Tensor) -> torch.Tensor:
    """T⁺ through the normal equations of the smaller side (an SVD-based pinv is ~20× slower here);
    a tiny ridge keeps rank-deficient maps finite."""
    t = t.double()
    tall = t.shape[0] >= t.shape[1]
    gram = t.T @ t if tall else t @ t.T
    gram = gram + 1e-10 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
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
    return normed_input_map(alignment.old_profile.norms[old_layer, slot], alignment.new_profile.norms[new_layer, slot],
                            t_pinv)


def map_factors(alignment: Alignment, new_layer: int, role: str, b: torch.Tensor, a: torch.Tensor,
                t_pinv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (b: out_old × r, a: r × in_old) of an OLD-base update of ``role`` in the source layer of
    ``new_layer`` → factors in the new layer's coordinates. A dense weight W maps as (W, I).

    ``t_pinv`` may pass the pseudo-inverse of the layer's T when the caller already has it.
    """
    la = alignment.layers[new_layer]
    t = la.transfer if la.transfer is not None else alignment.transfer
    if t_pinv is None:
        t_pinv = pseudo_inverse(t)
    slot = _NORM_SLOT.get(role)
    input_map = hidden_input_map(alignment, t_pinv, la.old_layer, new_layer, slot) if slot is not None else None
    old, new = alignment.old, alignment.new
    return map_rows(role, b, la, old, new, t), map_cols(role, a, la, old, new, input_map)


@dataclass(frozen=True)
class TransferOptions:
    rank: int | None = None  # None: keep each module's rank
    energy: float | None = None  # with rank None and energy set: smallest rank keeping this energy
    keep_norm_ratio: bool = True
    fill: str = "none"


def transfer_adapter(adapter: LoraAdapter, alignment: Alignment, options: TransferOptions
                     ) -> tuple[dict[str, LoraModule], list[dict]]:
    """Map every LoRA module of ``adapter`` into the new base.

    Returns:
        modules keyed by NEW module name, and one report row per written module.
    """
    old, new = alignment.old, alignment.new
    by_source: dict[tuple[int, str], str] = {}
    for name in adapter.modules:
        by_source[locate(old, name)] = name
    # keep a task wrapper's nesting (bert.encoder… → <new prefix>.encoder…)
    wrapped = any(wrapper_prefix(old, name) for name in adapter.modules)
    new_prefix = new.base_prefix + "." if wrapped and new.base_prefix else ""
    written: dict[tuple[int, str], Delta] = {}
    report: list[dict] = []
    global_pinv = pseudo_inverse(alignment.transfer)
    for j, la in sorted(alignment.layers.items()):
        t_pinv = global_pinv if la.transfer is None else pseudo_inverse(la.transfer)
        for role in ADAPTED_ROLES:
            name = by_source.get((la.old_layer, role))
            if name is None:
                continue
            if (role == "qkv") != new.fused_qkv and role in ("q", "k", "v", "qkv"):
                raise IncompatibleModelsError(
                    f"{name}: fused and separate q/k/v projections cannot be mapped onto each other yet")
            m = adapter.modules[name]
            scale = adapter.scale(name)
            delta = Delta(*map_factors(alignment, j, role, m.b, m.a, t_pinv), scale)
            old_delta = Delta(m.b, m.a, scale)
            row = {"module": new_prefix + new.module_name(j, role), "source": name, "source_layer": la.old_layer,
                   "role": role, "fill": "mapped", "target_rank": m.rank}
            delta = _calibrate(delta, old_delta, alignment, la.old_layer, j, role, options.keep_norm_ratio, row)
            written[(j, role)] = delta
            report.append(row)
    _fill(written, report, alignment, options.fill, new_prefix)
    modules: dict[str, LoraModule] = {}
    for row in report:
        j, role = row["layer"], row["role"]
        delta = written[(j, role)]
        own_rank = row.pop("target_rank")
        rank = options.rank or (None if options.energy else own_rank)
        b, a, kept = refactor(delta.b, delta.a, rank, options.energy)
        alpha = _alpha_for_scale(delta.scale, b.shape[1], adapter.rslora)
        modules[row["module"]] = LoraModule(a=a, b=b, alpha=alpha)
        row.update(rank=b.shape[1], kept_energy=round(kept, 6))
    return modules, report


def _alpha_for_scale(scale: float, rank: int, rslora: bool) -> float:
    """The alpha that gives ``scale`` at ``rank``, so re-ranked modules keep their update size."""
    return scale * (rank**0.5 if rslora else rank)


def _calibrate(delta: Delta, old_delta: Delta, alignment: Alignment, i: int, j: int, role: str, keep: bool,
               row: dict) -> Delta:
    """Rescale so that ‖ΔW_new‖/‖W_new‖ = ‖ΔW_old‖/‖W_old‖ (when ``keep``); record both ratios.

    Both are measured with the pre-norm scale folded into the input side, as the weight norms are.
    """
    slot = _NORM_SLOT.get(role)
    parts = [ROLES.index(p) for p in (("q", "k", "v") if role == "qkv" else (role,))]
    w_old = float(alignment.old_profile.weight_norms[i, parts].pow(2).sum().sqrt())
    w_new = float(alignment.new_profile.weight_norms[j, parts].pow(2).sum().sqrt())
    g_old = alignment.old_profile.norms[i, slot] if slot is not None else None
    g_new = alignment.new_profile.norms[j, slot] if slot is not None else None
    n_old, n_new = old_delta.norm(g_old), delta.norm(g_new)
    rel_old, rel_new = n_old / max(w_old, 1e-30), n_new / max(w_new, 1e-30)
    factor = rel_old / rel_new if keep and rel_new > 0 else 1.0
    row.update(layer=j, rel_update_old=round(rel_old, 6), rel_update_mapped=round(rel_new, 6),
               norm_factor=round(factor, 6))
    return Delta(delta.b * factor, delta.a, delta.scale)


def _fill(written: dict[tuple[int, str], Delta], report: list[dict], alignment: Alignment, policy: str,
          prefix: str) -> None:
    """Give new layers without a source layer the stated policy's delta (in new coordinates)."""
    if policy == "none":
        return
    new = alignment.new
    mapped = sorted({j for j, _ in written})
    roles = sorted({role for _, role in written}, key=ADAPTED_ROLES.index)
    for j in range(new.n_layers):
        if j in mapped or not mapped:
            continue
        below = [k for k in mapped if k < j]
        above = [k for k in mapped if k > j]
        for role in roles:
            if policy == "interpolate" and below and above and (below[-1], role) in written and (above[0], role) in written:
                lo, hi = below[-1], above[0]
                w = (hi - j) / (hi - lo)
                d_lo, d_hi = written[(lo, role)], written[(hi, role)]
                b = torch.cat([d_lo.b * w, d_hi.b * ((1 - w) * d_hi.scale / d_lo.scale)], 1)
                delta, how = Delta(b, torch.cat([d_lo.a, d_hi.a], 0), d_lo.scale), f"interpolate({lo},{hi})"
                rank = d_lo.b.shape[1]
            else:
                near = min(mapped, key=lambda k: (abs(k - j), k))
                if (near, role) not in written:
                    continue
                delta, how = written[(near, role)], f"nearest({near})"
                rank = delta.b.shape[1]
            written[(j, role)] = delta
            report.append({"module": prefix + new.module_name(j, role), "source": None, "source_layer": None, "role": role,
                           "fill": how, "layer": j, "target_rank": rank})
