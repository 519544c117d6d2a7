"""Typed, frozen stage configs. Recipes and CLI options both resolve into these.

Each field is its option's one definition: type, default, range, choices and, as ``description``, the help
text the CLI shows (cli/_options.py). A ``Literal`` that names methods lists its registry's keys
(LAYER_MAPPERS, HEAD_MATCHERS, …); tests/test_cli.py holds them equal.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

METRICS = ("loss", "exact_match", "accuracy")


def parse_target(text: str | None) -> tuple[str, float] | None:
    """``"exact_match=0.8"`` → ("exact_match", 0.8).

    Raises:
        ValueError: another form, metric, or a value that is not a finite number.
    """
    if not text:
        return None
    name, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if name.strip() not in METRICS or not math.isfinite(number):
        raise ValueError(f"{text!r}: expected METRIC=VALUE with METRIC one of {', '.join(METRICS)}")
    return name.strip(), number


def unknown_key(key: str, known: object) -> str:
    return f"unknown key `{key}`; known keys: {', '.join(known)}"


def explain(e: ValidationError, model: type[BaseModel] | None = None, prefix: str = "") -> str:
    """pydantic's errors in one line, each named by its key (``prefix`` + its path); an unknown key of ``model``
    lists the keys known at its level."""
    parts = []
    for err in e.errors():
        key = prefix + ".".join(map(str, err["loc"]))
        if err["type"] == "extra_forbidden" and model is not None:
            parts.append(unknown_key(key, _fields_at(model, err["loc"][:-1])))
            continue
        # a validator's own message, not pydantic's "Value error, …" around it; a cross-field rule names no key
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        parts.append(f"{key}: {msg}" if err["loc"] else msg)
    return "; ".join(parts)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys ``model`` takes at ``loc``, a nested config's as ``load.dtype``."""
    for name in loc:
        model = model.model_fields[name].annotation
    return [f"{name}.{sub}" if is_config(field.annotation) else name
            for name, field in model.model_fields.items()
            for sub in (field.annotation.model_fields if is_config(field.annotation) else [""])]


def is_config(annotation: object) -> bool:
    """Whether a field holds a nested config (``load``)."""
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


class _Config(BaseModel):
    # every option is checked here, before any work: a typo, a range or a non-finite number fails as one line
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
DeviceMap = Literal["auto", "balanced", "sequential"]
_DEVICE_SIZE = r"\s*(\d+|cpu)\s*=\s*\d+(\.\d+)?\s*[KMGT]i?B\s*"
_MAX_MEMORY = rf"{_DEVICE_SIZE}(,{_DEVICE_SIZE})*"
Seed = Annotated[int, Field(description="Random seed; the same seed gives the same artifacts.")]


class ModelLoadConfig(_Config):
    """How a stage loads its models (a recipe's ``load:`` and each section's own)."""

    model_config = ConfigDict(title="Model loading")  # the options' panel in --help

    dtype: Dtype = Field(
        "auto", description="Model dtype: auto (fp32 on CPU, bf16 on a CUDA device that supports it, else fp32), "
        "float32, bfloat16 or float16 (forward passes only: training refuses it). Trained weights stay fp32.")
    device: Device = Field("auto", description="auto (cuda when available), cpu or cuda.")
    device_map: DeviceMap | None = Field(
        None, description="Spread each model the stage only reads (align's bases, the old pair, the teacher, "
        "eval's model) over the GPUs, then CPU memory, then disk, as accelerate places it: for pairs that do not fit "
        "one device. A model the stage trains stays whole on --device.")
    max_memory: str | None = Field(
        None, description="With --device-map: memory per device, e.g. '0=40GiB,1=40GiB,cpu=64GiB' "
        "(GPU index or cpu); the rest goes to disk (a temporary folder).")

    @field_validator("max_memory")
    @classmethod
    def _memory_per_device(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(_MAX_MEMORY, value):
            raise ValueError(f"{value!r}: expected DEVICE=SIZE pairs such as '0=40GiB,cpu=64GiB' (DEVICE: a GPU index "
                             "or cpu)")
        return value

    @model_validator(mode="after")
    def _memory_needs_map(self) -> ModelLoadConfig:
        if self.max_memory is not None and self.device_map is None:
            raise ValueError("max_memory places models with a device map; give device_map too (e.g. auto)")
        return self

    def max_memory_map(self) -> dict[int | str, str] | None:
        """``max_memory`` as accelerate takes it: GPU indices as ints, cpu as text."""
        if self.max_memory is None:
            return None
        pairs = (item.split("=") for item in self.max_memory.split(","))
        return {int(k) if k.strip().isdigit() else k.strip(): v.strip() for k, v in pairs}


def refuse_fp16_training(load: ModelLoadConfig, what: str) -> None:
    """float16 training needs loss scaling (a GradScaler), or small gradients underflow to zero; loramigrate
    trains in bfloat16 or float32 instead.

    Raises:
        ValueError: ``load.dtype`` is float16.
    """
    if load.dtype == "float16":
        raise ValueError(f"{what} trains, and float16 training needs loss scaling, which loramigrate does not do; "
                         "use load.dtype bfloat16 (or float32)")


class AlignConfig(_Config):
    """Options of the align stage (base pair only)."""

    old: str = Field(description="Old base model: HF directory, .gguf file or hub id.")
    new: str = Field(description="New base model: HF directory, .gguf file or hub id.")
    calib: str | None = Field(None, description="Calibration text (.txt or .jsonl); default: the shipped text.")
    max_tokens: int = Field(4096, ge=16, description="Calibration tokens to use; more = steadier CKA, linear time.")
    seq_len: int = Field(128, ge=4, description="Tokens per calibration sequence.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    cka: Literal["auto", "feature", "minibatch"] = Field(
        "auto", description="CKA estimator: feature (exact), minibatch (unbiased HSIC over chunks) or auto "
        "(exact when it fits --cka-max-mb).")
    cka_chunk: int = Field(512, ge=4, description="Rows per unbiased-HSIC chunk of the minibatch estimator.")
    cka_max_mb: int = Field(1024, ge=1, description="MiB the exact estimator may use before auto picks minibatch.")
    row_norm: bool = Field(True, description="Scale rows to unit length, so massive-activation tokens do not "
                           "dominate CKA.")
    layer_map: Literal["cka_dp", "uniform", "first", "last"] = Field("cka_dp", description="Layer mapper.")
    head_match: Literal["hungarian", "identity"] = Field("hungarian", description="Head matcher.")
    head_similarity: Literal["weights", "activations"] = Field(
        "weights", description="Head similarity: weights (QK/OV circuit cosines, data-free) or activations (CKA of "
        "head outputs on the calibration text, which also fits the value-space maps; one more forward pass).")
    head_sketch: int | None = Field(None, ge=8, description="Project hidden onto this many random directions for "
                                    "head matching (faster, approximate).")
    mlp_match: Literal["auto", "hungarian", "mutual_best", "greedy", "identity"] = Field(
        "auto", description="Neuron matcher; auto: hungarian up to 2048 neurons, mutual_best above.")
    mlp_similarity: Literal["weights", "activations"] = Field(
        "weights", description="Neuron similarity: weights (gate/up rows and down columns through T) or activations "
        "(correlation of MLP activations on the first --mlp-tokens calibration tokens).")
    mlp_tokens: int = Field(1024, ge=8, description="Calibration tokens of the activation neuron similarity "
                            "(memory ∝ tokens × intermediate size × layers).")
    transfer: Literal["procrustes", "lstsq"] = Field("procrustes", description="Transfer matrix fit.")
    ridge: float = Field(1e-4, ge=0, description="Ridge of the lstsq fit, relative to the mean embedding energy.")
    per_layer_transfer: bool = Field(False, description="Also fit a transfer matrix per mapped layer on calibration "
                                     "activations (one more forward pass).")
    load: ModelLoadConfig = ModelLoadConfig()
    seed: Seed = 0


class TransferConfig(_Config):
    """Options of the transfer stage (one adapter, one alignment)."""

    align: str = Field(description="Alignment directory written by `loramigrate align`.")
    adapter: str = Field(description="Old PEFT LoRA adapter directory (trained on the old base).")
    rank: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None, description="New rank: an integer, or auto (keep --energy); default: each module keeps its old rank.")
    energy: float = Field(0.99, gt=0, le=1, description="Fraction of singular-value energy (Σσ²) kept by --rank auto.")
    keep_norm_ratio: bool = Field(True, description="Rescale so ‖ΔW‖/‖W‖ of each module matches the old one's.")
    fill: Literal["none", "nearest", "interpolate"] = Field("none", description="What new layers without a source "
                                                             "layer receive.")
    verify: bool = Field(True, description="Reload the result with stock PEFT on the new base and check every module.")
    # data-aware transfer: refit the mapped adapter on the task's inputs so each new block reproduces the old adapter's
    # effect on the residual stream (loads both bases; forward passes + a small fit per block)
    prompts: str | None = Field(None, description="Task inputs (JSONL 'prompt' [+ 'completion'] or 'text'): refit the "
                                "transfer so each new block reproduces the old adapter's effect (data-aware; loads "
                                "both bases); default: weight-space only.")
    prompt_limit: int = Field(256, ge=1, description="Rows of --prompts used (the first N).")
    max_len: int = Field(128, ge=4, description="Tokens per prompt.")
    batch_size: int = Field(16, ge=1, description="Prompts per forward pass.")
    fit_solver: Literal["block", "rrr"] = Field(
        "block", description="Data-aware fit: block (Adam on every LoRA factor of a block, backprop through that "
        "block alone) or rrr (closed-form reduced-rank regression of o/down; forward passes only, pre-norm models).")
    fit_steps: int = Field(30, ge=0, description="Adam steps per block of the data-aware fit (full passes over the "
                           "prompts; block solver).")
    fit_lr: float = Field(1e-3, gt=0, description="Learning rate of the data-aware fit.")
    fit_heads: bool = Field(True, description="Ridge-refit saved linear heads (pooler, classifier) to the old pair's "
                            "outputs.")
    load: ModelLoadConfig = ModelLoadConfig()

    @model_validator(mode="after")
    def _no_fp16_fit(self) -> TransferConfig:
        if self.prompts and self.fit_solver == "block" and self.fit_steps:
            refuse_fp16_training(self.load, "the data-aware block fit")
        return self


class FinetuneConfig(_Config):
    """Options of the finetune stage (also trains fresh adapters for baselines)."""

    base: str = Field(description="Base model (the new one): HF directory, .gguf file or hub id.")
    init: str = Field("fresh", description="Adapter directory to start from, or 'fresh'.")
    data: str = Field(description="Training JSONL: prompt/completion rows, or text/label rows (trains a classification "
                      "head); with --teacher, prompts or texts alone are enough.")
    val: str | None = Field(None, description="Validation JSONL; default: the last 10 % of --data.")
    rank: int = Field(16, ge=1, description="Rank of a fresh adapter.")
    alpha: float = Field(32, gt=0, description="lora_alpha of a fresh adapter.")
    targets: list[str] | None = Field(None, description="Comma-separated target modules of a fresh adapter; default: "
                                      "every linear of the transformer blocks (from the architecture).")
    steps: int = Field(100, ge=1, description="Optimiser steps.")
    epochs: float | None = Field(None, gt=0, description="Passes over the data (replaces --steps).")
    batch_size: int = Field(16, ge=1, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    max_len: int = Field(128, ge=8, description="Tokens per example (prompt + completion).")
    lr: float = Field(3e-4, gt=0, description="Learning rate of A (and of B times --lora-plus-ratio).")
    lora_plus_ratio: float = Field(1.0, ge=1, description="LoRA+: learning-rate ratio of B to A.")
    warmup: int = Field(0, ge=0, description="Linear warm-up steps before the decay.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warm-up, to 10 % of --lr at the end.")
    reg_lambda: float = Field(0.0, ge=0, description="λ of ‖sBA − s₀B₀A₀‖² toward the init at the start.")
    reg_final: float = Field(0.0, ge=0, description="λ at the end.")
    reg_schedule: Literal["constant", "step", "linear", "cosine", "exponential"] = Field(
        "step", description="How λ goes from --reg-lambda to --reg-final.")
    reg_switch: float = Field(0.5, ge=0, le=1, description="Where the step schedule relaxes (fraction of steps).")
    reg_toward: Literal["init", "zero"] = Field("init", description="zero: plain weight decay on the delta (ablation).")
    rebalance: Literal["none", "scalar", "full"] = Field("none", description="RefLoRA factor rebalancing after each "
                                                         "step.")
    restart_every: int = Field(0, ge=0, description="ReLoRA: merge the factors into the base and restart every N steps "
                               "(0: off).")
    restart_prune: float = Field(0.99, ge=0, le=1, description="Fraction of optimiser moments zeroed at a restart (by "
                                 "magnitude).")
    restart_warmup: int = Field(5, ge=0, description="Steps to re-warm the learning rate after a restart.")
    eval_every: int = Field(20, ge=1, description="Evaluate (and checkpoint) every N steps.")
    eval_limit: int = Field(100, ge=1, description="Validation examples used per evaluation.")
    target: str | None = Field(None, description="Stop at the first evaluation reaching it: exact_match=0.8, "
                               "accuracy=0.6 or loss=0.2.")
    # distillation (finetune/teacher.py TEACHERS); rows without targets then get the teacher's
    teacher: Literal["none", "old", "proxy"] = Field(
        "none", description="Distil from: old (old base + old adapter) or proxy (the new base plus the old adapter's "
        "logit offset; generation, same vocabulary).")
    teacher_base: str | None = Field(None, description="The old base, with --teacher.")
    teacher_adapter: str | None = Field(None, description="The old adapter, with --teacher.")
    distill_temperature: float = Field(1.0, gt=0, description="Softmax temperature of the KL: > 1 softens both "
                                       "distributions; the KL is scaled by T².")
    distill_weight: float = Field(1.0, ge=0, le=1, description="loss = w·KL + (1 − w)·task loss, with --teacher.")
    teacher_new_tokens: int = Field(32, ge=1, description="Most tokens of a teacher's greedy completion of a "
                                    "prompts-only row.")
    grad_checkpointing: bool = Field(False, description="Recompute the base's activations in the backward pass "
                                     "(transformers' gradient checkpointing): less memory, ~30 % more time.")
    seed: Seed = 0
    load: ModelLoadConfig = ModelLoadConfig()

    @field_validator("targets", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """``"q_proj,v_proj"`` (the CLI's and --set's form) → a list; empty → None."""
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()] or None
        return value

    @field_validator("target")
    @classmethod
    def _target_parses(cls, value: str | None) -> str | None:
        parse_target(value)
        return value

    @model_validator(mode="after")
    def _teacher_needs_the_old_pair(self) -> FinetuneConfig:
        if self.teacher != "none" and not (self.teacher_base and self.teacher_adapter):
            raise ValueError(f"teacher '{self.teacher}' needs teacher_base and teacher_adapter (the old base and adapter)")
        refuse_fp16_training(self.load, "finetune")
        return self


class EvalConfig(_Config):
    """Options of an evaluation (the eval command, a recipe's eval section)."""

    limit: int | None = Field(None, ge=1, description="Use the first N test examples.")
    batch_size: int = Field(16, ge=1, description="Examples per forward pass.")
    load: ModelLoadConfig = ModelLoadConfig()


class SearchConfig(_Config):
    """Options of the search stage (one transferred adapter, one alignment)."""

    align: str = Field(description="Align stage directory.")
    transfer: str = Field(description="Transfer stage directory made with this alignment.")
    data: str = Field(description="Validation JSONL the trials are scored on.")
    limit: int = Field(64, ge=1, description="Validation examples scored per trial (the first N: a fixed split).")
    n_trials: int = Field(30, ge=1, description="Finished (completed or pruned) trials in total, across workers and "
                          "reruns.")
    timeout: float | None = Field(None, gt=0, description="Stop starting trials after this many seconds.")
    space: Literal["global", "groups"] = Field(
        "groups", description="groups: α, β, γ per attention/MLP × early/middle/late; global: one α and one β.")
    sampler: Literal["auto", "gp", "tpe"] = Field(
        "auto", description="gp (Gaussian process + EI), tpe (larger spaces; learns from pruned trials too) or auto "
        "(gp; tpe with --fidelity-steps).")
    storage: str | None = Field(None, description="Optuna storage URL (sqlite:///…, postgresql://…, mysql://…) or a "
                                "journal file (*.log); default: study.db in the output directory.")
    study: str = Field("loramigrate-search", description="Study name inside the storage.")
    # the space is scaled to the pair: wide ranges lose a small trial budget on separately trained bases
    alpha_min: float = Field(0.5, ge=0, description="α ∈ [min, max] scales the transferred delta: a band around 1.")
    alpha_max: float = Field(1.5, gt=0, description="Upper end of α.")
    beta_max: float | None = Field(
        None, ge=0, description="β ∈ [−max, max] scales the base evolution W_new − W_old; default: 1 for same-shape "
        "bases whose layers and heads align one to one (the weights only drifted), else 0 (β off).")
    gamma_max: float = Field(0.5, ge=0, description="γ ∈ [0, max] scales a seeded fresh direction.")
    evolution_rank: int = Field(16, ge=1, description="Rank of the cached base-evolution view.")
    # search/core.py SCORES
    objective: Literal["loss", "distill"] = Field(
        "loss", description="loss: validation loss on the labels; distill: KL(old pair ‖ new base + blend) on the "
        "validation inputs (labels not needed).")
    teacher_adapter: str | None = Field(None, description="The old adapter (--objective distill); its base is the "
                                        "alignment's old model.")
    fidelity_steps: int = Field(0, ge=0, description="Multi-fidelity objective: score a blend by its val loss after "
                                "this many finetune steps on --train; poor trials are pruned (0: forward passes only).")
    train: str | None = Field(None, description="Training JSONL of the multi-fidelity steps.")
    fidelity_lr: float = Field(1e-3, gt=0, description="Learning rate of the multi-fidelity steps.")
    batch_size: int = Field(16, ge=1, description="Examples per forward pass.")
    max_len: int = Field(128, ge=8, description="Tokens per example.")
    seed: Seed = 0
    load: ModelLoadConfig = ModelLoadConfig()

    @model_validator(mode="after")
    def _coherent(self) -> SearchConfig:
        if self.alpha_min >= self.alpha_max:
            raise ValueError(f"alpha_min {self.alpha_min} must be below alpha_max {self.alpha_max}")
        if self.objective == "distill" and not self.teacher_adapter:
            raise ValueError("objective 'distill' needs teacher_adapter (the old adapter; its base is the alignment's)")
        if self.objective == "distill" and self.fidelity_steps:
            raise ValueError("objective 'distill' scores forward passes only; set fidelity_steps to 0")
        if self.fidelity_steps:
            refuse_fp16_training(self.load, "the multi-fidelity objective")
        return self


class FleetConfig(_Config):
    """How `loramigrate fleet` spreads a recipe's adapters (a recipe's ``fleet:``; the command's options override
    it). Every task (the alignment, each adapter's stages) asks the engine for the same resources."""

    model_config = ConfigDict(title="Fleet")

    engine: Literal["local", "ray"] = Field(
        "local", description="local: this machine (in this process, or --workers processes); ray: a Ray cluster.")
    address: str | None = Field(None, description="Ray cluster to join: auto (one `ray start` began on this machine) "
                                "or ray://HOST:10001; default: a private local cluster with --workers CPUs.")
    workers: int = Field(1, ge=1, description="Tasks at once on this machine: processes (local; 1: in this process) "
                         "or the private Ray cluster's CPUs.")
    cpus: float = Field(1, gt=0, description="CPUs per task (Ray's num_cpus).")
    gpus: float = Field(0, ge=0, description="GPUs per task (Ray's num_gpus); a fraction packs several tasks on one "
                        "GPU: only where measured to fit its memory.")
    memory_gb: float | None = Field(None, gt=0, description="Memory per task in GB (Ray's memory): Ray starts no more "
                                    "tasks on a node than fit.")
    search_workers: int = Field(1, ge=1, description="Tasks that search one adapter together, on one Optuna journal "
                                "(RUN/<adapter>/search-study.log).")

    @field_validator("gpus")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError(f"{v}: a task takes a fraction of one GPU or whole GPUs")
        return v
