"""The transfer stage over artifact directories: validate, map, write a PEFT adapter, verify it loads."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml

from loramigrate.adapters import LoraAdapter, LoraModule, read_adapter, write_adapter
from loramigrate.alignment import Alignment, load_alignment
from loramigrate.arch import ModelSpec
from loramigrate.artifacts import check_stage, hash_inputs, is_up_to_date, prepare_output, stage_output
from loramigrate.config import TransferConfig
from loramigrate.errors import ArtifactError, IncompatibleModelsError
from loramigrate.models import load_model, resolve_model
from loramigrate.transfer.core import TransferOptions, locate, normed_input_map, pseudo_inverse, transfer_adapter

log = logging.getLogger(__name__)
STAGE = "transfer"
REPORT = "transfer_report.json"


def expected_shape(spec: ModelSpec, role: str) -> tuple[int, int]:
    """(out_features, in_features) of a projection."""
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    return {"q": (q, spec.hidden), "k": (kv, spec.hidden), "v": (kv, spec.hidden), "o": (spec.hidden, q),
            "gate": (spec.intermediate, spec.hidden), "up": (spec.intermediate, spec.hidden),
            "down": (spec.hidden, spec.intermediate), "qkv": (q + 2 * kv, spec.hidden)}[role]


def check_adapter(adapter: LoraAdapter, alignment: Alignment, adapter_dir: Path) -> None:
    """The adapter must fit the alignment's OLD model, module by module, before any work.

    Raises:
        IncompatibleModelsError: a module the old base does not have, or of another shape.
    """
    for name, m in adapter.modules.items():
        _, role = locate(alignment.old, name)
        shape = (m.b.shape[0], m.a.shape[1])
        want = expected_shape(alignment.old, role)
        if shape != want:
            raise IncompatibleModelsError(
                f"adapter {adapter_dir} was trained for a different base: {name} is {shape[0]}×{shape[1]}, "
                f"the alignment's old model has {want[0]}×{want[1]}"
            )
    base = str(adapter.config.get("base_model_name_or_path") or "")
    old = str(alignment.info.get("options", {}).get("old", ""))
    if base and old and Path(base).name != Path(old).name:
        log.warning("adapter base %s differs in name from the alignment's old model %s; shapes match", base, old)


def _map_extra(adapter: LoraAdapter, alignment: Alignment) -> dict[str, torch.Tensor]:
    """modules_to_save tensors. A head reads the final-normed hidden state, W_new = W_old·diag(g_old)·T⁺·
    diag(1/g_new) with g the final norm scales, and writes its own space, which stays as it is; in a
    chain (pooler → classifier) a module that reads the hidden-sized output of another saved module is
    downstream and copied. Vocabulary-sized tensors (embeddings,
    LM head) read or write the hidden state through T and move only between identical vocabularies.

    Raises:
        IncompatibleModelsError: a vocabulary-sized tensor across different vocabularies.
    """
    pinv = pseudo_inverse(alignment.transfer)
    head_in = normed_input_map(alignment.old_profile.final_scale(), alignment.new_profile.final_scale(), pinv)
    d_old, vocab = alignment.old.hidden, alignment.old.vocab_size
    shared = alignment.info.get("shared_tokens", {})
    same_vocab = vocab == alignment.new.vocab_size and shared.get("coverage_old") == shared.get("coverage_new") == 1.0
    module = {key: key.rsplit(".", 1)[0] for key in adapter.extra}
    writes_hidden_size = {module[k] for k, w in adapter.extra.items()
                          if w.dim() == 2 and w.shape[0] == d_old != vocab}
    out = {}
    for key, w in adapter.extra.items():
        vocab_rows = w.dim() == 2 and w.shape[0] == vocab
        if vocab_rows and not same_vocab:
            raise IncompatibleModelsError(f"{key}: vocabulary-sized modules_to_save cannot move across vocabularies yet")
        downstream = bool(writes_hidden_size - {module[key]})
        if w.dim() == 2 and w.shape[1] == d_old and vocab_rows:
            w = w @ pinv
        elif w.dim() == 2 and w.shape[1] == d_old and not downstream:
            w = w @ head_in
        out[key] = w
    return out


def _peft_config(adapter: LoraAdapter, alignment: Alignment, modules: dict[str, LoraModule]) -> dict:
    new = alignment.new
    roles = sorted({locate(new, name)[1] for name in modules})
    layers = sorted({locate(new, name)[0] for name in modules})
    return {
        **adapter.config,
        "base_model_name_or_path": str(alignment.info.get("options", {}).get("new", "")),
        "target_modules": sorted(new.modules[r] for r in roles),
        "layers_to_transform": layers if len(layers) < new.n_layers else None,
        "layers_pattern": new.layers_path.rsplit(".", 1)[-1] if len(layers) < new.n_layers else None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _num_labels(adapter: LoraAdapter) -> int | None:
    """Classes of a sequence-classification adapter, from its saved head; None for other tasks."""
    if adapter.config.get("task_type") != "SEQ_CLS":
        return None
    heads = [w for k, w in adapter.extra.items() if k.endswith(("classifier.weight", "score.weight", "out_proj.weight"))]
    return heads[-1].shape[0] if heads else None


def verify_with_peft(out_dir: Path, new_base: str, load_cfg, adapter: LoraAdapter) -> None:
    """Reload with stock PEFT onto the new base; every written module must be matched, finite, non-zero.

    Raises:
        ArtifactError: an unmatched key, a module PEFT adapted that was not written, NaN/inf, a zero delta.
    """
    from peft import PeftModel

    written = adapter.modules
    base = load_model(resolve_model(new_base), load_cfg.dtype, load_cfg.device, num_labels=_num_labels(adapter))
    model = PeftModel.from_pretrained(base, str(out_dir))
    adapted = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            adapted[name] = module
    if set(adapted) != set(written):
        missing, extra = sorted(set(written) - set(adapted)), sorted(set(adapted) - set(written))
        raise ArtifactError(f"PEFT did not match the written adapter: unmatched {missing[:3]}, unexpected {extra[:3]}")
    for name, m in written.items():
        layer = adapted[name]
        a, b = layer.lora_A["default"].weight.detach().float().cpu(), layer.lora_B["default"].weight.detach().float().cpu()
        if not (torch.allclose(a, m.a, atol=1e-5) and torch.allclose(b, m.b, atol=1e-5)):
            raise ArtifactError(f"{name}: PEFT loaded other weights than were written")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ArtifactError(f"{name}: non-finite values in the transferred adapter")
        if float(b.norm()) * float(a.norm()) == 0.0:
            raise ArtifactError(f"{name}: the transferred delta is zero")


def run_transfer(cfg: TransferConfig, out_dir: Path, force: bool = False) -> Path:
    """Transfer ``cfg.adapter`` through the alignment in ``cfg.align`` into ``out_dir``."""
    out_dir = Path(out_dir)
    align_dir, adapter_dir = Path(cfg.align), Path(cfg.adapter)
    check_stage(align_dir, "align")
    alignment = load_alignment(align_dir)
    adapter = read_adapter(adapter_dir)
    check_adapter(adapter, alignment, adapter_dir)
    prepare_output(out_dir)
    inputs = hash_inputs({"align": str(align_dir), "adapter": str(adapter_dir)})
    config = cfg.model_dump()
    if not force and is_up_to_date(out_dir, STAGE, config, inputs):
        log.info("%s is up to date; skipping transfer (use --force to redo)", out_dir)
        return out_dir
    log.info("transfer config:\n%s", yaml.safe_dump(config, sort_keys=False))
    options = TransferOptions(rank=cfg.rank if isinstance(cfg.rank, int) else None,
                              energy=cfg.energy if cfg.rank == "auto" else None,
                              keep_norm_ratio=cfg.keep_norm_ratio, fill=cfg.fill)
    with stage_output(out_dir, STAGE, config, inputs) as run:
        modules, report = transfer_adapter(adapter, alignment, options)
        if not modules:
            raise IncompatibleModelsError("no adapter module has a source layer in the alignment's layer map")
        result = LoraAdapter(config=_peft_config(adapter, alignment, modules), modules=modules,
                             extra=_map_extra(adapter, alignment))
        write_adapter(result, run.tmp_dir)
        # old modules whose layer has no place in the new model (fewer layers) are dropped, visibly
        dropped = sorted(set(adapter.modules) - {r["source"] for r in report})
        if dropped:
            log.warning("%d old modules have no target layer and are dropped (see %s)", len(dropped), REPORT)
        (run.tmp_dir / REPORT).write_text(json.dumps({"modules": report, "dropped_sources": dropped}, indent=2))
        if cfg.verify:
            verify_with_peft(run.tmp_dir, result.config["base_model_name_or_path"], cfg.load, result)
        run.extra["summary"] = {"modules": len(modules), "filled": sum(r["fill"] != "mapped" for r in report),
                                "dropped": len(dropped)}
    return out_dir
