"""Typed, frozen stage configs. Recipes and CLI options both resolve into these."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


class _Config(BaseModel):
    # every option is checked here, before any work: a typo, a range or a non-finite number fails as one line
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ModelLoadConfig(_Config):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    device: Literal["auto", "cpu", "cuda"] = "auto"


class AlignConfig(_Config):
    """Options of the align stage (base pair only)."""

    old: str  # model directory, .gguf file or hub id
    new: str
    calib: str | None = None  # .txt or .jsonl; None = the text shipped with loramigrate
    max_tokens: int = Field(4096, ge=16)  # calibration tokens; more = steadier CKA, linear time
    seq_len: int = Field(128, ge=4)
    batch_size: int = Field(8, ge=1)
    cka: Literal["auto", "feature", "minibatch"] = "auto"  # auto: exact when it fits cka_max_mb
    cka_chunk: int = Field(512, ge=4)  # rows per unbiased-HSIC chunk (minibatch estimator)
    cka_max_mb: int = Field(1024, ge=1)
    row_norm: bool = True  # unit-length rows: massive-activation tokens do not dominate CKA
    layer_map: Literal["cka_dp", "uniform", "first", "last"] = "cka_dp"
    head_match: Literal["hungarian", "identity"] = "hungarian"
    # weights: QK/OV circuit cosines (data-free); activations: CKA of head outputs on the calibration
    # text, which also fits the value-space maps (one more forward pass)
    head_similarity: Literal["weights", "activations"] = "weights"
    head_sketch: int | None = Field(None, ge=8)  # random projection of hidden for head circuits: faster, approximate
    mlp_match: Literal["auto", "hungarian", "mutual_best", "greedy", "identity"] = "auto"
    # weights: gate/up rows and down columns through T; activations: correlation of MLP activations
    # on the first `mlp_tokens` calibration tokens (memory ∝ mlp_tokens × intermediate × layers)
    mlp_similarity: Literal["weights", "activations"] = "weights"
    mlp_tokens: int = Field(1024, ge=8)
    transfer: Literal["procrustes", "lstsq"] = "procrustes"
    ridge: float = Field(1e-4, ge=0)  # lstsq only, relative to the mean embedding energy
    per_layer_transfer: bool = False  # also fit T per mapped layer on activations: one more forward pass
    load: ModelLoadConfig = ModelLoadConfig()
    seed: int = 0


class TransferConfig(_Config):
    """Options of the transfer stage (one adapter, one alignment)."""

    align: str  # align stage directory
    adapter: str  # old PEFT LoRA directory
    rank: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None  # None: each keeps its rank; auto: `energy`
    energy: float = Field(0.99, gt=0, le=1)  # fraction of Σσ² kept by rank=auto
    keep_norm_ratio: bool = True  # rescale so ‖ΔW‖/‖W‖ matches the old module's
    fill: Literal["none", "nearest", "interpolate"] = "none"  # new layers that have no source layer
    verify: bool = True  # reload the output with stock PEFT on the new base and check every module
    # data-aware transfer: refit the mapped adapter on the task's inputs so each new block reproduces the
    # old adapter's effect on the residual stream (loads both bases; forward passes + a small fit per block)
    prompts: str | None = None  # JSONL with 'prompt' (+ 'completion') or 'text' fields; None: weight-space only
    prompt_limit: int = Field(256, ge=1)  # first N rows of `prompts`
    max_len: int = Field(128, ge=4)
    batch_size: int = Field(16, ge=1)
    # block: Adam on every LoRA factor of a block (backprop through that block alone); rrr: closed-form
    # reduced-rank regression of the residual writers o/down (forward passes only; pre-norm models)
    fit_solver: Literal["block", "rrr"] = "block"
    fit_steps: int = Field(30, ge=0)  # Adam steps per block (full passes over the prompts; block solver)
    fit_lr: float = Field(1e-3, gt=0)
    fit_heads: bool = True  # ridge-refit saved linear heads (pooler, classifier) to the old pair's outputs
    load: ModelLoadConfig = ModelLoadConfig()


class FinetuneConfig(_Config):
    """Options of the finetune stage (also trains fresh adapters for baselines)."""

    base: str  # the (new) base model
    init: str = "fresh"  # PEFT adapter directory to start from, or "fresh"
    data: str  # training JSONL: prompt/completion rows, or text/label rows (trains a classification head)
    val: str | None = None  # validation JSONL; None = the last 10 % of data
    rank: int = Field(16, ge=1)  # fresh adapters only
    alpha: float = Field(32, gt=0)  # fresh adapters only
    targets: list[str] | None = None  # fresh adapters only; None: every linear of the blocks (from the architecture)
    steps: int = Field(100, ge=1)
    epochs: float | None = Field(None, gt=0)  # when set, replaces `steps` by the steps that pass over the data this often
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)  # micro-batches of batch_size per optimiser step
    max_len: int = Field(128, ge=8)
    lr: float = Field(3e-4, gt=0)
    lora_plus_ratio: float = Field(1.0, ge=1)  # LoRA+: lr of B = ratio × lr of A
    warmup: int = Field(0, ge=0)  # linear warm-up steps before the decay
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up, to 10 % of lr at the end
    reg_lambda: float = Field(0.0, ge=0)  # λ at the start of ‖sBA − s₀B₀A₀‖² toward the init
    reg_final: float = Field(0.0, ge=0)  # λ at the end
    reg_schedule: Literal["constant", "step", "linear", "cosine", "exponential"] = "step"
    reg_switch: float = Field(0.5, ge=0, le=1)  # where the step schedule relaxes, as a fraction of steps
    reg_toward: Literal["init", "zero"] = "init"  # zero = plain weight decay on the delta (ablation)
    rebalance: Literal["none", "scalar", "full"] = "none"  # RefLoRA factor rebalancing after each step
    restart_every: int = Field(0, ge=0)  # ReLoRA: merge the factors into the base and restart every N steps (0: off)
    restart_prune: float = Field(0.99, ge=0, le=1)  # fraction of optimiser moments zeroed at a restart (by magnitude)
    restart_warmup: int = Field(5, ge=0)  # steps to re-warm the learning rate after a restart
    eval_every: int = Field(20, ge=1)
    eval_limit: int = Field(100, ge=1)
    target: str | None = None  # "exact_match=0.8", "accuracy=0.6" or "loss=0.2": stop at the first evaluation reaching it
    # distillation (finetune/teacher.py TEACHERS): old = the old base + old adapter; proxy = the new base steered
    # by the old adapter's logit offset (generation, shared vocabulary). Rows without targets then get the teacher's
    teacher: Literal["none", "old", "proxy"] = "none"
    teacher_base: str | None = None  # the old base
    teacher_adapter: str | None = None  # the old adapter
    distill_temperature: float = Field(1.0, gt=0)  # > 1 softens both distributions; the KL is scaled by T²
    distill_weight: float = Field(1.0, ge=0, le=1)  # loss = w·KL + (1 − w)·task loss
    teacher_new_tokens: int = Field(32, ge=1)  # greedy completion of a prompts-only row: at most this many tokens
    seed: int = 0
    load: ModelLoadConfig = ModelLoadConfig()

    @field_validator("target")
    @classmethod
    def _target_parses(cls, value: str | None) -> str | None:
        parse_target(value)
        return value

    @model_validator(mode="after")
    def _teacher_needs_the_old_pair(self) -> FinetuneConfig:
        if self.teacher != "none" and not (self.teacher_base and self.teacher_adapter):
            raise ValueError(f"teacher '{self.teacher}' needs teacher_base and teacher_adapter (the old base and adapter)")
        return self


class EvalConfig(_Config):
    """Options of an evaluation (the eval command, a recipe's eval section)."""

    limit: int | None = Field(None, ge=1)  # first N test examples
    batch_size: int = Field(16, ge=1)


class SearchConfig(_Config):
    """Options of the search stage (one transferred adapter, one alignment)."""

    align: str  # align stage directory
    transfer: str  # transfer stage directory (of this alignment)
    data: str  # validation JSONL the trials are scored on
    limit: int = Field(64, ge=1)  # examples of `data` scored per trial (the first N: a fixed split)
    n_trials: int = Field(30, ge=1)  # finished (completed or pruned) trials in total, across workers and reruns
    timeout: float | None = Field(None, gt=0)  # seconds for this invocation
    space: Literal["global", "groups"] = "groups"  # global: the two-coefficient α, β search
    sampler: Literal["auto", "gp", "tpe"] = "auto"  # auto: gp, or tpe for the multi-fidelity objective
    storage: str | None = None  # Optuna storage URL or journal file; None: study.db in the output directory
    study: str = "loramigrate-search"
    # the space is scaled to the pair: wide ranges lose a small trial budget on separately trained bases
    # α ∈ [alpha_min, alpha_max] scales the transferred delta: a band around 1
    alpha_min: float = Field(0.5, ge=0, allow_inf_nan=False)
    alpha_max: float = Field(1.5, gt=0, allow_inf_nan=False)
    # β ∈ [−beta_max, beta_max] scales the base evolution W_new − W_old; None: auto, 1 where the alignment maps
    # every layer and head to itself between same-shape bases (the weights only drifted), else 0 (β off)
    beta_max: float | None = Field(None, ge=0, allow_inf_nan=False)
    gamma_max: float = Field(0.5, ge=0, allow_inf_nan=False)  # γ ∈ [0, gamma_max] scales a seeded fresh direction
    evolution_rank: int = Field(16, ge=1)
    # search/core.py SCORES: loss = the validation loss on the labels; distill = KL(old pair ‖ new base + blend)
    # on the validation inputs (no labels needed; the old base is the alignment's, the old adapter teacher_adapter)
    objective: Literal["loss", "distill"] = "loss"
    teacher_adapter: str | None = None  # the old adapter (distill)
    fidelity_steps: int = Field(0, ge=0)  # > 0: a trial's value is the val loss after this many finetune steps
    train: str | None = None  # training JSONL of those steps
    fidelity_lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    max_len: int = Field(128, ge=8)
    seed: int = 0
    load: ModelLoadConfig = ModelLoadConfig()

    @model_validator(mode="after")
    def _coherent(self) -> SearchConfig:
        if self.alpha_min >= self.alpha_max:
            raise ValueError(f"alpha_min {self.alpha_min} must be below alpha_max {self.alpha_max}")
        if self.objective == "distill" and not self.teacher_adapter:
            raise ValueError("objective 'distill' needs teacher_adapter (the old adapter; its base is the alignment's)")
        if self.objective == "distill" and self.fidelity_steps:
            raise ValueError("objective 'distill' scores forward passes only; set fidelity_steps to 0")
        return self
