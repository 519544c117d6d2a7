"""The alignment artifact: everything later stages need to move adapters from OLD to NEW.

On disk: ``alignment.safetensors`` (tensors) + ``alignment.json`` (maps, scores, options; readable
and diffable). Head and neuron maps use -1 in tensors and null in JSON for "no source".
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loramigrate.arch import ROLES, ModelSpec
from loramigrate.errors import ArtifactError

log = logging.getLogger(__name__)

TENSORS = "alignment.safetensors"
META = "alignment.json"


@dataclass(frozen=True)
class LayerAlignment:
    """Maps for one NEW layer that has an OLD source layer.

    Attributes:
        head_sim: (H_new, H_old) circuit similarity.
        head_map: per new query head, the old head or None.
        mlp_map: (I_new,) old neuron per new neuron, -1 for none.
        mlp_score: (I_new,) similarity of each matched neuron pair (0 where unmatched).
        q_map, k_map, v_map: (H_new, hd_new, hd_old) per new query head, the map from its source
            head's (q) or source kv group's (k, v) coordinates to its own; zeros without a source.
        transfer: (d_new, d_old) map of the residual stream entering this pair of blocks, when
            fitted on calibration activations (``--per-layer-transfer``); else None.
    """

    old_layer: int
    head_sim: torch.Tensor
    head_map: list[int | None]
    mlp_map: torch.Tensor
    mlp_score: torch.Tensor
    q_map: torch.Tensor
    k_map: torch.Tensor
    v_map: torch.Tensor
    transfer: torch.Tensor | None = None


@dataclass(frozen=True)
class ModelProfile:
    """What transfer needs of a base model, so that it never reloads the old one.

    norms (L, 2, hidden): pre-norm scales before attention and MLP (ones for post-norm models);
    unit_norms: ``arch.ROLES`` role → (L, units), squared Frobenius norm of each head or neuron of the projection,
        norm scale folded in (``arch.unit_norms``).
    final_norm (hidden,): scale of the norm after the last block (ones when none or not recorded).
    """

    norms: torch.Tensor
    unit_norms: dict[str, torch.Tensor]
    final_norm: torch.Tensor | None = None

    def final_scale(self) -> torch.Tensor:
        return self.final_norm if self.final_norm is not None else torch.ones(self.norms.shape[-1])

    def weight_norm_sq(self, layer: int, role: str, live: torch.Tensor | None = None) -> float:
        """‖W‖² of a projection of ``layer``, over the units ``live`` marks (a bool mask) or all of them."""
        units = self.unit_norms[role][layer]
        return float(units.sum() if live is None else units[live].sum())


@dataclass(frozen=True)
class Alignment:
    """Old→new correspondence. ``transfer`` is T (d_new, d_old) with h_new ≈ T h_old;
    ``layer_map`` has one entry per NEW layer; ``layers`` is keyed by new layer index."""

    old: ModelSpec
    new: ModelSpec
    cka: torch.Tensor
    layer_map: list[int | None]
    transfer: torch.Tensor
    layers: dict[int, LayerAlignment]
    old_profile: ModelProfile
    new_profile: ModelProfile
    info: dict[str, Any] = field(default_factory=dict)

    def base(self, side: str) -> str:
        """The old or new base as align resolved it (a hub id pinned to its commit), so that later stages load
        the very models that were aligned; alignments from before the pin recorded the option as given."""
        return str(self.info.get("models", {}).get(side) or self.info.get("options", {}).get(side, ""))


def _none_to_neg(xs: list[int | None]) -> torch.Tensor:
    return torch.tensor([-1 if x is None else x for x in xs], dtype=torch.long)


def _neg_to_none(t: torch.Tensor) -> list[int | None]:
    return [None if x < 0 else x for x in t.tolist()]


def save_alignment(a: Alignment, out_dir: Path) -> None:
    tensors = {"cka": a.cka.double().contiguous(), "transfer": a.transfer.float().contiguous(),
               "layer_map": _none_to_neg(a.layer_map)}
    for side, prof in (("old", a.old_profile), ("new", a.new_profile)):
        tensors[f"{side}.norms"] = prof.norms.float().contiguous()
        tensors.update({f"{side}.unit_norms.{role}": u.float().contiguous() for role, u in prof.unit_norms.items()})
        tensors[f"{side}.final_norm"] = prof.final_scale().float().contiguous()
    for j, la in a.layers.items():
        tensors[f"layers.{j}.head_sim"] = la.head_sim.float().contiguous()
        tensors[f"layers.{j}.head_map"] = _none_to_neg(la.head_map)
        tensors[f"layers.{j}.mlp_map"] = la.mlp_map.long().contiguous()
        tensors[f"layers.{j}.mlp_score"] = la.mlp_score.float().contiguous()
        for role in ("q", "k", "v"):
            tensors[f"layers.{j}.{role}_map"] = getattr(la, f"{role}_map").float().contiguous()
        if la.transfer is not None:
            tensors[f"layers.{j}.transfer"] = la.transfer.float().contiguous()
    save_file(tensors, str(out_dir / TENSORS))
    meta = {
        "old": asdict(a.old),
        "new": asdict(a.new),
        "layer_map": a.layer_map,
        # every new layer is listed; layers without a source layer have no source heads either
        "head_map": {str(j): a.layers[j].head_map if j in a.layers else [None] * a.new.n_heads
                     for j in range(a.new.n_layers)},
        # wall times vary run to run: they belong in the manifest, not in the reproducible artifact
        **{k: v for k, v in a.info.items() if k != "timings"},
    }
    (out_dir / META).write_text(json.dumps(meta, indent=2))
    log.debug("layer map, new ← old: %s", _describe_layer_map(a.layer_map))
    log.debug("head maps, new layer: old head per new head: %s", {j: la.head_map for j, la in a.layers.items()})


def _describe_layer_map(layer_map: list[int | None]) -> str:
    """``0←0 1←- 2←1``: each new layer with its source layer (- none)."""
    return " ".join(f"{j}←{'-' if i is None else i}" for j, i in enumerate(layer_map))


def load_alignment(align_dir: Path) -> Alignment:
    """Read an alignment directory written by ``save_alignment``.

    Raises:
        ArtifactError: missing or corrupt files.
    """
    align_dir = Path(align_dir)
    for name in (TENSORS, META):
        if not (align_dir / name).is_file():
            raise ArtifactError(f"{align_dir} is not an alignment directory (no {name}); run `loramigrate align`")
    try:
        t = load_file(str(align_dir / TENSORS))
        meta = json.loads((align_dir / META).read_text())
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{align_dir}: cannot read the alignment ({e}); rerun `loramigrate align`") from None
    layer_map = _neg_to_none(t["layer_map"])
    layers = {
        j: LayerAlignment(
            old_layer=src,
            head_sim=t[f"layers.{j}.head_sim"],
            head_map=_neg_to_none(t[f"layers.{j}.head_map"]),
            mlp_map=t[f"layers.{j}.mlp_map"],
            mlp_score=t[f"layers.{j}.mlp_score"],
            q_map=t[f"layers.{j}.q_map"],
            k_map=t[f"layers.{j}.k_map"],
            v_map=t[f"layers.{j}.v_map"],
            transfer=t.get(f"layers.{j}.transfer"),
        )
        for j, src in enumerate(layer_map) if src is not None
    }
    info = {k: v for k, v in meta.items() if k not in ("old", "new", "layer_map", "head_map")}
    profiles = {side: ModelProfile(norms=t[f"{side}.norms"], final_norm=t.get(f"{side}.final_norm"),
                                   unit_norms={role: t[f"{side}.unit_norms.{role}"] for role in ROLES})
                for side in ("old", "new")}
    log.debug("%s: layer map, new ← old: %s", align_dir, _describe_layer_map(layer_map))
    return Alignment(old=ModelSpec(**meta["old"]), new=ModelSpec(**meta["new"]), cka=t["cka"],
                     layer_map=layer_map, transfer=t["transfer"], layers=layers, old_profile=profiles["old"],
                     new_profile=profiles["new"], info=info)
