"""The finetune stage over artifact directories: validate, train with checkpoints, write the adapter."""

from __future__ import annotations

import glob
import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from loramigrate.adapters import check_adapter_dir
from loramigrate.arch import model_spec
from loramigrate.artifacts import (
    config_hash,
    hash_inputs,
    is_up_to_date,
    log_start,
    output_lock,
    prepare_output,
    stage_output,
)
from loramigrate.config import FinetuneConfig
from loramigrate.errors import ArtifactError, ConfigError
from loramigrate.evaluate import METRIC, Task, read_task, task_metrics
from loramigrate.finetune.loop import fp32_trainables, train
from loramigrate.finetune.objective import OBJECTIVES, Distill, mean_loss
from loramigrate.finetune.teacher import check_teacher, fill_targets, load_teacher
from loramigrate.models import ModelRef, attach_adapter, load_tokenizer, load_with_new_modules, resolve_model
from loramigrate.progress import ProgressFn, no_progress
from loramigrate.report import plot_curve

log = logging.getLogger(__name__)
STAGE = "finetune"


def _check_lengths(tok, task: Task, max_len: int, data: str) -> None:
    """Every completion cut away by ``max_len`` would train on nothing."""
    if task.kind == "generation" and all(len(tok(r["prompt"])["input_ids"]) >= max_len for r in task.rows[:200]):
        raise ConfigError(f"{data}: max_len {max_len} cuts every completion; raise --max-len")


def _split(cfg: FinetuneConfig) -> tuple[Task, list[dict]]:
    """The training task and the validation rows (``--val``, or the last 10 % of the data).

    With a teacher, rows may lack targets, and the classes are named by every labelled row of both files.

    Raises:
        ArtifactError: unreadable data, or too little to hold out.
        ConfigError: validation of another kind, or with labels the training data never shows.
    """
    distilling = cfg.teacher != "none"
    train_task = read_task(cfg.data, unlabelled=distilling)
    if cfg.val:
        val = read_task(cfg.val, cfg.eval_limit, unlabelled=distilling)
    else:
        if len(train_task.rows) < 2:
            raise ArtifactError(f"{cfg.data}: needs at least 2 examples to hold one out for validation (or give --val)")
        cut = max(1, len(train_task.rows) // 10)
        val = Task(train_task.kind, train_task.rows[-cut:][: cfg.eval_limit])
        train_task = Task(train_task.kind, train_task.rows[:-cut], train_task.labels)
    if val.kind != train_task.kind:
        raise ConfigError(f"{cfg.val}: {val.kind} rows, but the training data is {train_task.kind}")
    if distilling:  # the teacher's head knows every class, whichever file names it
        train_task = replace(train_task, labels=sorted(set(train_task.labels) | set(val.labels)))
        if val.kind == "classification" and not train_task.labels:
            raise ConfigError(f"{cfg.data}: no row has a label; give labelled --val rows to name the classes")
    unseen = sorted({str(r["label"]) for r in val.rows} - set(train_task.labels)) if val.kind == "classification" else []
    if unseen:
        raise ConfigError(f"validation labels never seen in training: {', '.join(unseen[:5])}")
    return train_task, val.rows


def _peft_model(cfg: FinetuneConfig, base, new_modules: list[str], classification: bool):
    """A fresh LoRA (saving ``new_modules``, those the base's checkpoint lacked) or ``cfg.init``, trainable."""
    from peft import LoraConfig, get_peft_model

    if cfg.init == "fresh":
        targets = cfg.targets or sorted(set(model_spec(base).modules.values()))
        # a classifier (and whatever else the checkpoint lacked, e.g. a distilled model's pooler) is
        # trained and saved with the adapter, so that the adapter alone reproduces the model
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets,
                          task_type="SEQ_CLS" if classification else "CAUSAL_LM",
                          modules_to_save=new_modules or None)
        try:
            return get_peft_model(base, lora)
        except ValueError as e:  # e.g. target modules the base does not have
            raise ConfigError(f"--targets {','.join(targets)}: {str(e).splitlines()[0][:200]}") from None
    try:
        model = attach_adapter(base, cfg.init, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ArtifactError(f"--init {cfg.init} does not fit the base {cfg.base}: {str(e).splitlines()[0][:200]}") from None
    return model


def checkpoint_activations(model) -> None:
    """transformers' activation (gradient) checkpointing, non-reentrant: the frozen embeddings' outputs need not
    require grad for the LoRA factors inside a checkpointed block to get theirs.

    Raises:
        ConfigError: the architecture does not support it.
    """
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed gradient_checkpointing_enable
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError as e:
        raise ConfigError(f"--grad-checkpointing: {e}") from None


def run_finetune(cfg: FinetuneConfig, out_dir: Path, progress: ProgressFn = no_progress, force: bool = False) -> bool:
    """Fine-tune ``cfg.init`` (or a fresh LoRA) on ``cfg.data`` into ``out_dir``; resumable.

    Returns:
        True when it trained, False when ``out_dir`` already held this finetune of the same inputs.
    """
    out_dir = Path(out_dir)
    if cfg.restart_every and cfg.reg_lambda > 0:
        raise ConfigError("ReLoRA restarts and regularisation toward the init cannot be combined yet")
    task, val_rows = _split(cfg)
    if cfg.epochs:
        per_step = cfg.batch_size * cfg.grad_accum
        cfg = cfg.model_copy(update={"steps": max(1, math.ceil(cfg.epochs * len(task.rows) / per_step))})
    for adapter in ([cfg.init] if cfg.init != "fresh" else []) + ([cfg.teacher_adapter] if cfg.teacher_adapter else []):
        check_adapter_dir(adapter)
    ref = resolve_model(cfg.base)
    names = {"base": ref.path, "data": cfg.data, **({"val": cfg.val} if cfg.val else {}),
             **({"init": cfg.init} if cfg.init != "fresh" else {})}
    if cfg.teacher != "none":
        teacher_ref = check_teacher(cfg.teacher, task.kind, ref, cfg.teacher_base)
        names |= {"teacher_base": teacher_ref.path, "teacher_adapter": cfg.teacher_adapter}
    prepare_output(out_dir, inputs=names.values())
    inputs = hash_inputs(names)
    config = cfg.model_dump()
    if not force and is_up_to_date(out_dir, STAGE, config, inputs):
        log.info("%s is up to date; skipping finetune (use --force to redo)", out_dir)
        return False
    with output_lock(out_dir):
        log_start(STAGE, out_dir, cfg)
        ckpt_dir = checkpoint_dir(out_dir, config, inputs, fresh=force)
        _finetune(cfg, ref, task, val_rows, out_dir, ckpt_dir, inputs, progress)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return True


def checkpoint_dir(out_dir: Path, config: dict, inputs: dict[str, dict[str, str]], fresh: bool) -> Path:
    """Where this run checkpoints: beside the output, keyed by the config and the inputs' content, so only a
    rerun of the same command on the same files resumes. Any other checkpoint of this output (another
    config, or inputs edited since) is discarded, with one line; ``fresh`` discards this run's own too."""
    key = config_hash({"config": config, "inputs": {k: v["sha256"] for k, v in inputs.items()}})[:12]
    ckpt = out_dir.with_name(f"{out_dir.name}.ckpt-{key}")
    for old in out_dir.parent.glob(f"{glob.escape(out_dir.name)}.ckpt-*"):
        if old != ckpt:
            log.warning("discarding checkpoint %s: it was made with another config or other input files", old)
        if old != ckpt or fresh:
            shutil.rmtree(old, ignore_errors=True)
    return ckpt


def _finetune(cfg: FinetuneConfig, ref: ModelRef, task: Task, val_rows: list[dict], out_dir: Path, ckpt_dir: Path,
              inputs: dict[str, dict[str, str]], progress: ProgressFn) -> None:
    """Load, train with checkpoints in ``ckpt_dir``, and write the adapter into ``out_dir``."""
    classification = task.kind == "classification"
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(ref)
    _check_lengths(tok, task, cfg.max_len, cfg.data)
    base, new_modules = load_with_new_modules(ref, cfg.load.dtype, cfg.load.device,
                                              num_labels=len(task.labels) if classification else None)
    model = _peft_model(cfg, base, new_modules, classification)
    fp32_trainables(model)
    if cfg.grad_checkpointing:
        checkpoint_activations(model.get_base_model())
    task, val_rows, distill = _distillation(cfg, model, tok, task, val_rows, progress)
    val_task = Task(task.kind, val_rows, task.labels)
    kl = OBJECTIVES[task.kind](tok, task, cfg.max_len, replace(distill, weight=1.0)) if distill else None

    def evaluate(m) -> dict[str, float]:
        loss, correct = task_metrics(m, tok, val_task, cfg.batch_size)
        return {"loss": loss, METRIC[task.kind]: sum(correct) / len(correct),
                **({"kl": mean_loss(kl, m, val_rows, cfg.batch_size)} if kl else {})}

    batch_loss = OBJECTIVES[task.kind](tok, task, cfg.max_len, distill)
    initial = evaluate(model.eval())  # the init as it is: the curve's baseline at step 0
    with stage_output(out_dir, STAGE, cfg.model_dump(), inputs) as run:
        try:
            history, hit = train(model, task.rows, cfg, batch_loss, evaluate, ckpt_dir, progress)
        except FloatingPointError as e:
            kept = f"the last good checkpoint is in {ckpt_dir}" if ckpt_dir.exists() else "before the first checkpoint"
            raise ArtifactError(f"training diverged ({e}); {kept}") from None
        peft_config = model.peft_config["default"]
        if peft_config.modules_to_save:  # PEFT appends its classifier names again at every SEQ_CLS load
            peft_config.modules_to_save = list(dict.fromkeys(peft_config.modules_to_save))
        model.save_pretrained(run.tmp_dir)
        (run.tmp_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        plot_curve([{"step": 0, "s": 0.0, **{f"val_{k}": v for k, v in initial.items()}}, *history],
                   run.tmp_dir / "curve.png")
        run.extra["initial"] = initial
        run.extra["time_to_target"] = hit
        run.extra["final"] = next((r for r in reversed(history) if "val_loss" in r), None)


def _distillation(cfg: FinetuneConfig, student, tok, task: Task, val_rows: list[dict], progress: ProgressFn
                  ) -> tuple[Task, list[dict], Distill | None]:
    """Load the teacher and give every row without a target the teacher's (once, kept in memory: a resumed
    run recomputes the same greedy targets). Without a teacher, the data as it is."""
    if cfg.teacher == "none":
        return task, val_rows, None
    teacher = load_teacher(cfg.teacher, cfg.teacher_base, cfg.teacher_adapter, task, cfg.load)

    def fill(rows: list[dict], what: str) -> list[dict]:
        return fill_targets(teacher, student, tok, task, rows, cfg.max_len, cfg.teacher_new_tokens, cfg.batch_size,
                            progress, what)
    task = replace(task, rows=fill(task.rows, "training"))
    return task, fill(val_rows, "validation"), Distill(teacher.logits, cfg.distill_temperature, cfg.distill_weight)
