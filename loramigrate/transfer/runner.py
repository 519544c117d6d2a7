"""The transfer stage over artifact directories: validate, map, write a PEFT adapter, verify it loads."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from loramigrate.adapters import LoraAdapter, LoraModule, read_adapter, write_adapter
from loramigrate.alignment import Alignment, load_alignment
from loramigrate.arch import HEAD_INPUTS, ModelSpec, weight_of
from loramigrate.artifacts import check_stage, hash_inputs, is_up_to_date, log_start, prepare_output, stage_output
from loramigrate.config import TransferConfig
from loramigrate.errors import ArtifactError, ConfigError, IncompatibleModelsError
from loramigrate.evaluate import read_task
from loramigrate.lora import locate, normed_input_map, pseudo_inverse
from loramigrate.models import ModelRef, attach_adapter, input_device, load_frozen, load_model, load_tokenizer, resolve_model
from loramigrate.progress import ProgressFn, no_progress
from loramigrate.transfer.core import TransferOptions, transfer_adapter
from loramigrate.transfer.data_aware import FitOptions, active_copy, data_aware_transfer

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
    old = alignment.base("old")
    if base and old and Path(base).name != Path(old).name:
        log.warning("adapter base %s differs in name from the alignment's old model %s; shapes match", base, old)


def _named(module: str, name: str) -> bool:
    return module == name or module.endswith("." + name)


def _head_source(module: str, saved: set[str]) -> str | None:
    """The saved module whose output the head module ``module`` reads (``arch.HEAD_INPUTS``); None when it
    reads the final-normed hidden state (or its source is the base's own, not saved)."""
    for reader, source in HEAD_INPUTS.items():
        if _named(module, reader):
            return next((s for s in sorted(saved) if _named(s, source)), None)
    return None


def _resize(w: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """``w`` with dimension ``dim`` zero-padded (or cut) to ``n``."""
    if w.shape[dim] >= n:
        return w.narrow(dim, 0, n)
    return torch.cat([w, w.new_zeros(*w.shape[:dim], n - w.shape[dim], *w.shape[dim + 1:])], dim)


def _map_extra(adapter: LoraAdapter, alignment: Alignment) -> dict[str, torch.Tensor]:
    """modules_to_save tensors. A head reads the final-normed hidden state, W_new = W_old·diag(g_old)·T⁺·
    diag(1/g_new) with g the final norm scales, and writes its own space. In a chain (``arch.HEAD_INPUTS``:
    pooler → classifier) the upstream module's own units are kept, zero-padded (or cut) to the new hidden size,
    and so are the columns of the module that reads them: with a zero bias the padded units output tanh(0) = 0,
    so the head computes the same function on a wider base. Vocabulary-sized tensors (embeddings, LM head) read or
    write the hidden state through T and move only between identical vocabularies.

    Raises:
        IncompatibleModelsError: a vocabulary-sized tensor across different vocabularies.
    """
    pinv = pseudo_inverse(alignment.transfer)
    head_in = normed_input_map(alignment.old_profile.final_scale(), alignment.new_profile.final_scale(), pinv)
    d_old, d_new, vocab = alignment.old.hidden, alignment.new.hidden, alignment.old.vocab_size
    shared = alignment.info.get("shared_tokens", {})
    same_vocab = vocab == alignment.new.vocab_size and shared.get("coverage_old") == shared.get("coverage_new") == 1.0
    saved = {key.rsplit(".", 1)[0] for key in adapter.extra}
    sources = {module: _head_source(module, saved) for module in saved}
    upstream = set(sources.values()) - {None}
    out = {}
    for key, w in adapter.extra.items():
        module = key.rsplit(".", 1)[0]
        vocab_rows = w.dim() == 2 and w.shape[0] == vocab
        if vocab_rows and not same_vocab:
            raise IncompatibleModelsError(f"{key}: vocabulary-sized modules_to_save cannot move across vocabularies yet")
        if module in upstream:  # its own output units
            w = _resize(w, d_new, 0)
        if w.dim() == 2 and sources[module]:
            w = _resize(w, d_new, 1)
        elif w.dim() == 2 and w.shape[1] == d_old:
            w = w @ (pinv if vocab_rows else head_in)
        out[key] = w
    return out


def _base_fields(ref: ModelRef) -> dict[str, str | None]:
    """PEFT's own fields for the base: its hub id and, for a pinned one, the commit (``revision``), which
    ``AutoPeftModel`` loads; a local base is its path (and no revision: the old adapter's would be wrong)."""
    return {"base_model_name_or_path": ref.source if ref.revision else ref.path, "revision": ref.revision}


def _peft_config(adapter: LoraAdapter, alignment: Alignment, modules: dict[str, LoraModule]) -> dict:
    new = alignment.new
    roles = sorted({locate(new, name)[1] for name in modules})
    layers = sorted({locate(new, name)[0] for name in modules})
    return {
        **adapter.config,
        **_base_fields(resolve_model(alignment.base("new"))),
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


def reload_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """How far float32 values may move when PEFT holds them in ``dtype``: its rounding (relative), float32's
    1e-5 at least; PEFT keeps LoRA factors in float32 over a half-precision base, but need not."""
    return {"rtol": max(torch.finfo(dtype).eps, 1e-5), "atol": 1e-5}


def verify_with_peft(out_dir: Path, new_base: str, load_cfg, adapter: LoraAdapter) -> None:
    """Reload with stock PEFT onto the new base; every written module must be matched, finite, non-zero.

    Raises:
        ArtifactError: an unmatched key, a module PEFT adapted that was not written, NaN/inf, a zero delta.
    """
    written = adapter.modules
    base = load_frozen(resolve_model(new_base), load_cfg, num_labels=_num_labels(adapter))
    model = attach_adapter(base, out_dir)
    adapted = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            adapted[name] = module
    if set(adapted) != set(written):
        missing, extra = sorted(set(written) - set(adapted)), sorted(set(adapted) - set(written))
        raise ArtifactError(f"PEFT did not match the written adapter: unmatched {missing[:3]}, unexpected {extra[:3]}")
    for name, m in written.items():
        layer = adapted[name]
        loaded = weight_of(layer.lora_A["default"])  # also where a device map offloaded it
        tol = reload_tolerance(loaded.dtype)
        a, b = loaded.float().cpu(), weight_of(layer.lora_B["default"]).float().cpu()
        if not (torch.allclose(a, m.a, **tol) and torch.allclose(b, m.b, **tol)):
            raise ArtifactError(f"{name}: PEFT loaded other weights than were written")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ArtifactError(f"{name}: non-finite values in the transferred adapter")
        if float(b.norm()) * float(a.norm()) == 0.0:
            raise ArtifactError(f"{name}: the transferred delta is zero")


def read_prompts(path: str | Path, limit: int) -> list[str]:
    """The model inputs of a task file: ``prompt`` (+ ``completion`` when given, the teacher-forced
    answer the old pair also sees) or ``text``; labels are not needed.

    Raises:
        ArtifactError: unreadable or empty file, or a row with neither field.
    """
    task = read_task(path, limit, unlabelled=True)
    if task.kind == "classification":
        return [r["text"] for r in task.rows]
    return [r["prompt"] + str(r.get("completion") or "") for r in task.rows]


def _tokenized_batches(cfg: TransferConfig, old_ref, new_ref, rank: int) -> list[dict]:
    """The prompts in batches, as both bases tokenise them (identically, or an error).

    Raises:
        IncompatibleModelsError: the tokenizers cut the prompts differently.
        ConfigError: fewer prompt tokens than the fit needs.
    """
    texts = read_prompts(cfg.prompts, cfg.prompt_limit)
    tok_old, tok_new = load_tokenizer(old_ref), load_tokenizer(new_ref)
    kw = {"truncation": True, "max_length": cfg.max_len}
    if tok_old(texts, **kw)["input_ids"] != tok_new(texts, **kw)["input_ids"]:
        raise IncompatibleModelsError("data-aware transfer needs both bases to tokenise the prompts identically; "
                                      "these tokenizers differ (use the weight-space transfer: drop --prompts)")
    batches = [dict(tok_new(texts[i:i + cfg.batch_size], padding=True, return_tensors="pt", **kw))
               for i in range(0, len(texts), cfg.batch_size)]
    tokens, needed = sum(int(b["attention_mask"].sum()) for b in batches), 4 * rank
    if tokens < needed:
        raise ConfigError(f"{cfg.prompts}: {tokens} prompt tokens, the rank-{rank} fit needs at least {needed}")
    return batches


def _fit_with_data(cfg: TransferConfig, alignment: Alignment, adapter: LoraAdapter, result: LoraAdapter,
                   written: Path, progress: ProgressFn) -> tuple[LoraAdapter, dict]:
    """Refit the weight-space transfer in ``written`` on the task's prompts (see ``data_aware``)."""
    old_ref, new_ref = resolve_model(alignment.base("old")), resolve_model(alignment.base("new"))
    batches = _tokenized_batches(cfg, old_ref, new_ref, max(m.rank for m in result.modules.values()))
    labels = _num_labels(adapter)
    old_model = attach_adapter(load_frozen(old_ref, cfg.load, num_labels=labels), cfg.adapter).eval()
    new_model = attach_adapter(load_model(new_ref, cfg.load.dtype, cfg.load.device, num_labels=labels), written,
                               is_trainable=True).eval()
    dev = input_device(new_model)
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    heads = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in result.extra))
    opts = FitOptions(solver=cfg.fit_solver, steps=cfg.fit_steps, lr=cfg.fit_lr, fit_heads=cfg.fit_heads)
    report = data_aware_transfer(old_model, new_model, batches, alignment.layer_map, heads, opts,
                                 max_head_out=alignment.new.vocab_size - 1, progress=progress)
    inner = new_model.get_base_model()
    modules = {}
    for name, m in result.modules.items():
        layer = inner.get_submodule(name)
        modules[name] = LoraModule(a=layer.lora_A["default"].weight.detach().float().cpu(),
                                   b=layer.lora_B["default"].weight.detach().float().cpu(), alpha=m.alpha)
    extra = {}
    for key in result.extra:
        module, _, param = key.rpartition(".")
        extra[key] = getattr(active_copy(inner.get_submodule(module)), param).detach().float().cpu()
    return LoraAdapter(config=result.config, modules=modules, extra=extra), report


def run_transfer(cfg: TransferConfig, out_dir: Path, force: bool = False, progress: ProgressFn = no_progress) -> bool:
    """Transfer ``cfg.adapter`` through the alignment in ``cfg.align`` into ``out_dir``; with
    ``cfg.prompts``, then refit it on them (data-aware transfer).

    Returns:
        True when it transferred, False when ``out_dir`` already held this transfer of the same inputs.
    """
    out_dir = Path(out_dir)
    align_dir, adapter_dir = Path(cfg.align), Path(cfg.adapter)
    check_stage(align_dir, "align")
    alignment = load_alignment(align_dir)
    adapter = read_adapter(adapter_dir)
    check_adapter(adapter, alignment, adapter_dir)
    names = {"align": str(align_dir), "adapter": str(adapter_dir)}
    if cfg.prompts:
        read_prompts(cfg.prompts, 1)  # fail on a bad prompts file before any heavy work
        names.update(prompts=cfg.prompts, old=resolve_model(alignment.base("old")).path)
    prepare_output(out_dir, inputs=names.values())
    inputs = hash_inputs(names)
    config = cfg.model_dump()
    if not force and is_up_to_date(out_dir, STAGE, config, inputs):
        log.info("%s is up to date; skipping transfer (use --force to redo)", out_dir)
        return False
    log_start(STAGE, out_dir, cfg)
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
        fit_report = None
        if cfg.prompts:
            result, fit_report = _fit_with_data(cfg, alignment, adapter, result, run.tmp_dir, progress)
            write_adapter(result, run.tmp_dir)
        # old modules whose layer has no place in the new model (fewer layers) are dropped, visibly
        dropped = sorted(set(adapter.modules) - {r["source"] for r in report})
        if dropped:
            log.warning("%d old modules have no target layer and are dropped (see %s)", len(dropped), REPORT)
        (run.tmp_dir / REPORT).write_text(json.dumps({"modules": report, "dropped_sources": dropped,
                                                      **({"data_aware": fit_report} if fit_report else {})}, indent=2))
        if cfg.verify:
            verify_with_peft(run.tmp_dir, alignment.base("new"), cfg.load, result)
        run.extra["summary"] = {"modules": len(modules), "filled": sum(r["fill"] != "mapped" for r in report),
                                "dropped": len(dropped)}
    return True
