"""The search's core over a loaded model: blends written into its LoRA weights in place, and the objectives
that score them. No paths, no storage: the runner loads, the study proposes, this evaluates.
"""

from __future__ import annotations

import itertools
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from loramigrate.alignment import Alignment
from loramigrate.config import FinetuneConfig
from loramigrate.finetune.loop import lora_layers, train
from loramigrate.finetune.objective import BatchLoss, mean_loss
from loramigrate.lora import Delta, locate
from loramigrate.search.blend import Ingredients, blend, fresh_direction, module_group
from loramigrate.search.evolution import Factors
from loramigrate.search.space import coefficients

# objective name → the finetune teacher (finetune/teacher.py TEACHERS) it distils from; None: the label loss
SCORES: dict[str, str | None] = {"loss": None, "distill": "old"}
Report = Callable[[float, int], None]  # (intermediate value, step); may raise to stop the trial


def adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """LoRA layers by their module name in the base model (the adapter's names)."""
    return {name.removeprefix("base_model.model."): m for name, m in lora_layers(model).items()}


def module_sites(layers: dict[str, nn.Module], alignment: Alignment) -> dict[str, tuple[int, str]]:
    """(new layer, role) of each adapted module."""
    return {name: locate(alignment.new, name) for name in layers}


def ingredients(layers: dict[str, nn.Module], alignment: Alignment, evolution: dict[tuple[int, str], Factors],
                seed: int) -> dict[str, Ingredients]:
    """Each module's ingredients, copied out of the loaded weights (trials overwrite them)."""
    out = {}
    for name, (j, role) in module_sites(layers, alignment).items():
        layer = layers[name]
        b = layer.lora_B["default"].weight.detach().float().cpu() * float(layer.scaling["default"])
        a = layer.lora_A["default"].weight.detach().float().cpu().clone()
        fresh = fresh_direction(b.shape[0], a.shape[1], a.shape[0], Delta(b, a, 1.0).norm(),
                                seed=seed + zlib.crc32(name.encode()))
        out[name] = Ingredients(group=module_group(j, alignment.new.n_layers, role), rank=a.shape[0], transfer=(b, a),
                                evolution=evolution.get((j, role)), fresh=fresh)
    return out


def apply_blend(layers: dict[str, nn.Module], parts: dict[str, Ingredients], params: dict[str, float]) -> None:
    """Write the blend for ``params`` into the loaded LoRA weights, in place."""
    with torch.no_grad():
        for name, layer in layers.items():
            b, a = blend(parts[name], *coefficients(params, parts[name].group))
            w_b, w_a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
            w_b.copy_((b / float(layer.scaling["default"])).to(w_b.dtype))
            w_a.copy_(a.to(w_a.dtype))


@dataclass(frozen=True)
class BlendScorer:
    """The new base with the transferred adapter, loaded once, and what scores a blend written into it:
    ``batch_loss`` over ``rows`` (validation), after the short ``finetune`` on ``train_rows`` when given."""

    model: nn.Module
    layers: dict[str, nn.Module]
    parts: dict[str, Ingredients]
    batch_loss: BatchLoss
    rows: list[dict]
    batch_size: int
    train_rows: list[dict]
    finetune: FinetuneConfig | None = None  # the multi-fidelity objective's; None: forward passes only

    def value(self) -> float:
        """The objective of the weights now loaded (no training)."""
        return mean_loss(self.batch_loss, self.model, self.rows, self.batch_size)

    def score(self, params: dict[str, float], report: Report) -> tuple[float, dict[str, float]]:
        """The value of one blend, and its costs in seconds (``blend_s``, ``pass_s``).

        Raises:
            FloatingPointError: a non-finite value.
        """
        t0 = time.perf_counter()
        apply_blend(self.layers, self.parts, params)
        t1 = time.perf_counter()
        value = self.short_finetune(report) if self.finetune else self.value()
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value}")
        return value, {"blend_s": t1 - t0, "pass_s": time.perf_counter() - t1}

    def short_finetune(self, report: Report) -> float:
        """The multi-fidelity objective: the finetune loop on the LoRA factors from the blend now loaded (dropout
        off and head frozen, so a blend always scores the same; no checkpoints), reporting the validation loss
        after each evaluation to ``report`` (which may stop the trial). Returns the last validation loss."""
        steps = itertools.count()

        def evaluate(_model: nn.Module) -> dict[str, float]:
            loss = self.value()
            report(loss, next(steps))
            return {"loss": loss}
        weights = [w for layer in self.layers.values()
                   for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
        for w in weights:
            w.requires_grad_(True)
        try:
            log, _ = train(self.model, self.train_rows, self.finetune, self.batch_loss, evaluate, None, dropout=False)
        finally:
            for w in weights:
                w.requires_grad_(False)
        return log[-1]["val_loss"]
