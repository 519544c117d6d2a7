"""The transfer stage's core: old LoRA adapter + alignment → LoRA adapter in the new base's coordinates.

Each delta is mapped as factors (``loramigrate.lora.map_factors``), rescaled to the old module's
relative update size, given to unmapped layers by the fill policy, and re-factorised by QR of the
factors and an SVD of the small r × r core.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramigrate.adapters import LoraAdapter, LoraModule
from loramigrate.alignment import Alignment, LayerAlignment
from loramigrate.arch import ROLES, ModelSpec
from loramigrate.errors import IncompatibleModelsError
from loramigrate.lora import NORM_SLOT, Delta, locate, map_factors, pseudo_inverse, refactor, wrapper_prefix

ADAPTED_ROLES = (*ROLES, "qkv")


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


def live_units(la: LayerAlignment, new: ModelSpec, role: str) -> torch.Tensor:
    """Which heads (q, o), kv groups (k, v) or neurons (gate, up, down) of a new layer receive an update: those
    with a source."""
    if role in ("gate", "up", "down"):
        return la.mlp_map >= 0
    heads = torch.tensor([src is not None for src in la.head_map])
    return heads.view(new.n_kv_heads, -1).any(1) if role in ("k", "v") else heads


def _calibrate(delta: Delta, old_delta: Delta, alignment: Alignment, i: int, j: int, role: str, keep: bool,
               row: dict) -> Delta:
    """Rescale so that ‖ΔW_new‖/‖W_new‖ = ‖ΔW_old‖/‖W_old‖ (when ``keep``); record both ratios.

    ‖W_new‖ counts only the units the update reaches (``live_units``): new heads or neurons without a source,
    silenced or not, take no part in it. Both are measured with the pre-norm scale folded into the input side,
    as the weight norms are.
    """
    slot = NORM_SLOT.get(role)
    parts = ("q", "k", "v") if role == "qkv" else (role,)
    la = alignment.layers[j]
    w_old = sum(alignment.old_profile.weight_norm_sq(i, p) for p in parts) ** 0.5
    w_new = sum(alignment.new_profile.weight_norm_sq(j, p, live_units(la, alignment.new, p)) for p in parts) ** 0.5
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
