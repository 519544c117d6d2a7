"""`loramigrate finetune`: short re-adaptation with scheduled regularisation toward the init."""

from pathlib import Path
from typing import Annotated

import typer

from loramigrate.cli._options import DeviceOpt, DtypeOpt, ForceOpt, OutDirOpt, SeedOpt
from loramigrate.cli._ui import handle_errors, progress_bars

EXAMPLES = """
Examples:

  loramigrate finetune --base models/new --init runs/pair/sql/transfer --data train.jsonl --val val.jsonl \\
      --steps 100 --reg-lambda 1.0 --reg-final 0.01 --target exact_match=0.85 -o runs/pair/sql/final

  loramigrate finetune --base models/new --init fresh --rank 16 --data train.jsonl -o runs/baselines/retrain

  loramigrate finetune --base models/new --init runs/pair/sql/transfer --data prompts.jsonl --val val.jsonl \
      --teacher old --teacher-base models/old --teacher-adapter adapters/sql -o runs/pair/sql/distilled
"""


@handle_errors
def finetune(
    base: Annotated[str, typer.Option(help="Base model (the new one): HF directory, .gguf file or hub id.")],
    data: Annotated[Path, typer.Option(help="Training JSONL: prompt/completion rows, or text/label rows (a classifier); "
                                       "with --teacher, prompts or texts alone are enough.")],
    out: OutDirOpt,
    init: Annotated[str, typer.Option(help="Adapter directory to start from, or 'fresh'.")] = "fresh",
    val: Annotated[Path | None, typer.Option(help="Validation JSONL (default: the last 10 % of --data).")] = None,
    rank: Annotated[int, typer.Option(help="Rank of a fresh adapter.")] = 16,
    alpha: Annotated[float, typer.Option(help="lora_alpha of a fresh adapter.")] = 32,
    targets: Annotated[str, typer.Option(help="Comma-separated target modules of a fresh adapter "
                                         "(default: every linear of the transformer blocks).")] = "",
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 100,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data (replaces --steps).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per micro-batch.")] = 16,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimiser step.")] = 1,
    max_len: Annotated[int, typer.Option(help="Tokens per example (prompt + completion).")] = 128,
    lr: Annotated[float, typer.Option(help="Learning rate of A (and of B times --lora-plus-ratio).")] = 3e-4,
    lora_plus_ratio: Annotated[float, typer.Option(help="LoRA+: learning-rate ratio of B to A.")] = 1.0,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps before the decay.")] = 0,
    lr_schedule: Annotated[str, typer.Option(help="Decay after warm-up: cosine, linear (to 10 % of --lr) or constant.")
                           ] = "cosine",
    reg_lambda: Annotated[float, typer.Option(help="λ of ‖ΔW − ΔW₀‖² at the start.")] = 0.0,
    reg_final: Annotated[float, typer.Option(help="λ at the end.")] = 0.0,
    reg_schedule: Annotated[str, typer.Option(help="constant, step, linear, cosine or exponential.")] = "step",
    reg_switch: Annotated[float, typer.Option(help="Where the step schedule relaxes (fraction of steps).")] = 0.5,
    reg_toward: Annotated[str, typer.Option(help="init, or zero (plain decay, for ablations).")] = "init",
    rebalance: Annotated[str, typer.Option(help="RefLoRA factor rebalancing: none, scalar or full.")] = "none",
    restart_every: Annotated[int, typer.Option(help="ReLoRA: merge and restart the factors every N steps (0: off).")] = 0,
    restart_prune: Annotated[float, typer.Option(help="Fraction of optimiser moments zeroed at a restart.")] = 0.99,
    restart_warmup: Annotated[int, typer.Option(help="Steps to re-warm the learning rate after a restart.")] = 5,
    eval_every: Annotated[int, typer.Option(help="Evaluate (and checkpoint) every N steps.")] = 20,
    eval_limit: Annotated[int, typer.Option(help="Validation examples used per evaluation.")] = 100,
    target: Annotated[str | None, typer.Option(help="Stop when reached: exact_match=0.8, accuracy=0.6 or loss=0.2.")
                      ] = None,
    teacher: Annotated[str, typer.Option(help="Distil from: none, old (old base + old adapter) or proxy (the new base "
                                         "plus the old adapter's logit offset; generation, same vocabulary).")
                       ] = "none",
    teacher_base: Annotated[str | None, typer.Option(help="The old base, with --teacher.")] = None,
    teacher_adapter: Annotated[str | None, typer.Option(help="The old adapter, with --teacher.")] = None,
    distill_temperature: Annotated[float, typer.Option(help="Softmax temperature of the KL (scaled by T²).")] = 1.0,
    distill_weight: Annotated[float, typer.Option(help="loss = w·KL + (1 − w)·task loss, with --teacher.")] = 1.0,
    teacher_new_tokens: Annotated[int, typer.Option(help="Most tokens of a teacher's completion of a prompts-only "
                                                    "row.")] = 32,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
) -> None:
    """Fine-tune an adapter (or a fresh LoRA) on task data; resumable after an interruption."""
    from loramigrate.config import FinetuneConfig, ModelLoadConfig
    from loramigrate.finetune.runner import run_finetune

    cfg = FinetuneConfig(
        base=base, init=init, data=str(data), val=str(val) if val else None, rank=rank, alpha=alpha,
        targets=[t.strip() for t in targets.split(",") if t.strip()] or None, steps=steps, epochs=epochs,
        batch_size=batch_size, grad_accum=grad_accum, max_len=max_len, lr=lr,
        lora_plus_ratio=lora_plus_ratio, warmup=warmup, lr_schedule=lr_schedule, reg_lambda=reg_lambda, reg_final=reg_final,
        reg_schedule=reg_schedule, reg_switch=reg_switch, reg_toward=reg_toward, rebalance=rebalance,
        restart_every=restart_every, restart_prune=restart_prune, restart_warmup=restart_warmup,
        eval_every=eval_every, eval_limit=eval_limit, target=target, teacher=teacher, teacher_base=teacher_base,
        teacher_adapter=teacher_adapter, distill_temperature=distill_temperature, distill_weight=distill_weight,
        teacher_new_tokens=teacher_new_tokens, seed=seed, load=ModelLoadConfig(dtype=dtype, device=device),
    )
    with progress_bars() as progress:
        result = run_finetune(cfg, out, progress=progress, force=force)
    typer.echo(str(result))
