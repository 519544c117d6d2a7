"""Read and write PEFT LoRA adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``).

Key layout as PEFT saves it: ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight``
(out, r); ``modules_to_save`` copies as ``base_model.model.<module>.<param>``. The effective update of a
module is ``scale · B @ A`` with ``scale = alpha / r`` (``alpha / √r`` with rsLoRA), ``alpha`` from
``alpha_pattern`` when a pattern matches the module name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loramigrate.errors import ArtifactError, IncompatibleModelsError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: ΔW = scale · b @ a, a (r, in), b (out, r)."""

    a: torch.Tensor
    b: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter in memory. ``modules`` is keyed by the base model's module name."""

    config: dict[str, Any]
    modules: dict[str, LoraModule]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save tensors, by module.param

    @property
    def rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def scale(self, name: str) -> float:
        m = self.modules[name]
        return lora_scale(m.alpha, m.rank, self.rslora)


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: a pattern key matches when the module name ends with it (regex, dotted boundary)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(path: str | Path) -> LoraAdapter:
    """Load a PEFT LoRA directory.

    Raises:
        ArtifactError: missing or corrupt files.
        IncompatibleModelsError: not a LoRA adapter, or a LoRA variant this tool cannot move (DoRA).
    """
    path = Path(path)
    config, tensors = _read_files(path)
    if config.get("peft_type") != "LORA":
        raise IncompatibleModelsError(f"{path} is a {config.get('peft_type')} adapter; only LoRA adapters can be migrated")
    if config.get("use_dora"):
        raise IncompatibleModelsError(f"{path} is a DoRA adapter; its magnitude vectors cannot be migrated yet")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        m = _LORA_KEY.match(name)
        if m:
            factors.setdefault(m["module"], {})[m["which"]] = value.float()
        elif "lora_" in name:
            raise IncompatibleModelsError(f"{path}: unsupported LoRA tensor {key} (only linear-layer LoRA is supported)")
        else:
            extra[name] = value.float()
    modules = {}
    for module, ab in factors.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            raise ArtifactError(f"{path}: {module} has inconsistent lora_A/lora_B tensors")
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        modules[module] = LoraModule(a=ab["A"], b=ab["B"], alpha=float(alpha))
    if not modules:
        raise ArtifactError(f"{path}: no LoRA weights in {WEIGHTS}")
    return LoraAdapter(config=config, modules=modules, extra=extra)


def check_adapter_dir(path: str | Path) -> None:
    """Refuse an adapter directory that a stage could not use, before it loads any model: a NaN or inf
    would otherwise surface as an SVD failure, a "diverged" training or ``nan`` in a table.

    Raises:
        ArtifactError: missing, unreadable or non-finite files.
    """
    _read_files(Path(path))


def _read_files(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and the tensors of an adapter directory, all finite."""
    if not (path / CONFIG).is_file():
        raise ArtifactError(f"{path} is not a PEFT adapter directory (no {CONFIG})")
    if not (path / WEIGHTS).is_file():
        has_bin = (path / "adapter_model.bin").exists()
        hint = " (adapter_model.bin: re-save it with safe_serialization=True)" if has_bin else ""
        raise ArtifactError(f"{path} has no {WEIGHTS}{hint}")
    try:
        config = json.loads((path / CONFIG).read_text())
        tensors = load_file(str(path / WEIGHTS))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise ArtifactError(f"cannot read adapter {path}: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"cannot read adapter {path}: {CONFIG} is not a JSON object")
    if bad := nonfinite(tensors):
        raise ArtifactError(f"adapter {path} holds NaN or inf values ({_first_of(bad)})")
    return config, tensors


def check_written_adapter(stage_dir: Path, stage: str) -> None:
    """Refuse to publish a stage directory whose adapter holds NaN or inf (a degenerate alignment or fit).

    Raises:
        ArtifactError: a non-finite tensor in ``stage_dir``'s adapter.
    """
    if (stage_dir / WEIGHTS).is_file() and (bad := nonfinite(load_file(str(stage_dir / WEIGHTS)))):
        raise ArtifactError(f"the {stage} stage computed NaN or inf values ({_first_of(bad)}); nothing was written")


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _first_of(names: list[str]) -> str:
    return names[0] + (f" and {len(names) - 1} more tensors" if len(names) > 1 else "")


def write_adapter(adapter: LoraAdapter, path: Path) -> None:
    """Write PEFT files. ``r``/``lora_alpha`` take the most common rank/alpha; others go into the
    ``rank_pattern`` / ``alpha_pattern`` keyed by full module name."""
    ranks = [m.rank for m in adapter.modules.values()]
    alphas = [m.alpha for m in adapter.modules.values()]
    r, alpha = max(set(ranks), key=ranks.count), max(set(alphas), key=alphas.count)
    config = {
        **adapter.config,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {_anchored(n): m.rank for n, m in adapter.modules.items() if m.rank != r},
        "alpha_pattern": {_anchored(n): m.alpha for n, m in adapter.modules.items() if m.alpha != alpha},
    }
    tensors = {}
    for name, m in adapter.modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.b.contiguous()
    tensors.update({f"{PREFIX}{k}": v.contiguous() for k, v in adapter.extra.items()})
    save_file(tensors, str(path / WEIGHTS))
    (path / CONFIG).write_text(json.dumps(config, indent=2))


def _anchored(module: str) -> str:
    """A pattern that matches exactly this module (PEFT matches patterns as name suffixes)."""
    return "^" + re.escape(module)
