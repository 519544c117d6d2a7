"""The training loop: LoRA factors + scheduled regularisation toward the init, LoRA+ learning rates,
optional RefLoRA rebalancing, evaluation every k steps, early stop at a target, checkpoints.

Batches are drawn from a generator seeded by (seed, step), so a run resumed from a checkpoint sees
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loramigrate.config import FinetuneConfig
from loramigrate.errors import ConfigError
from loramigrate.evaluate import completion_batch
from loramigrate.finetune.rebalance import rebalance_full, rebalance_scalar
from loramigrate.finetune.regularise import delta_distance_sq, schedule_value
from loramigrate.progress import ProgressFn, no_progress

EvalFn = Callable[[nn.Module], dict[str, float]]
CKPT = "checkpoint.pt"


@dataclass
class LoraFactors:
    """One adapted module: its trainable factors, scale, and the factors it is regularised toward."""

    a: nn.Parameter
    b: nn.Parameter
    scale: float
    a0: torch.Tensor
    b0: torch.Tensor


def lora_factors(model: nn.Module, toward: str) -> dict[str, LoraFactors]:
    """The PEFT LoRA layers of ``model``; ``toward`` init keeps copies of the start, zero none."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            keep = toward == "init"
            out[name] = LoraFactors(a=a, b=b, scale=float(module.scaling["default"]),
                                    a0=a.detach().clone() if keep else torch.zeros_like(a[:1]),
                                    b0=b.detach().clone() if keep else torch.zeros_like(b[:, :1]))
    return out


def regulariser(factors: dict[str, LoraFactors]) -> torch.Tensor:
    """Σ ‖s·B·A − s·B₀·A₀‖² over modules, from r × r Grams."""
    return sum(delta_distance_sq(f.b, f.a, f.scale, f.b0.to(f.b.dtype), f.a0.to(f.a.dtype), f.scale)
               for f in factors.values())


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * (1 + math.cos(math.pi * min(progress, 1.0))) / 2


def reached(target: tuple[str, float] | None, metrics: dict[str, float]) -> bool:
    if target is None:
        return False
    name, value = target
    return metrics[name] <= value if name == "loss" else metrics[name] >= value


METRICS = ("loss", "exact_match")


def parse_target(text: str | None) -> tuple[str, float] | None:
    """``"exact_match=0.8"`` → ("exact_match", 0.8).

    Raises:
        ConfigError: another form or metric.
    """
    if not text:
        return None
    name, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if name.strip() not in METRICS or number is None:
        raise ConfigError(f"--target {text!r}: expected METRIC=VALUE with METRIC one of {', '.join(METRICS)}")
    return name.strip(), number


def train(model: nn.Module, tok, rows: list[dict], cfg: FinetuneConfig, evaluate: EvalFn, ckpt_dir: Path,
          progress: ProgressFn = no_progress) -> tuple[list[dict], dict | None]:
    """Train in place; returns the log rows and where the target was reached (or None).

    Raises:
        FloatingPointError: the loss became NaN/inf (the last checkpoint is kept).
    """
    factors = lora_factors(model, cfg.reg_toward)
    groups = [{"params": [f.a for f in factors.values()], "lr": cfg.lr},
              {"params": [f.b for f in factors.values()], "lr": cfg.lr * cfg.lora_plus_ratio}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in groups]
    log: list[dict] = []
    start_step, elapsed, hit = 0, 0.0, None
    ckpt = ckpt_dir / CKPT
    if ckpt.is_file():  # resume: factors, optimiser, log and clock as they were at the checkpoint
        state = torch.load(ckpt, weights_only=False)
        with torch.no_grad():
            for name, f in factors.items():
                f.a.copy_(state["factors"][name]["a"])
                f.b.copy_(state["factors"][name]["b"])
        opt.load_state_dict(state["optimizer"])
        start_step, elapsed, log = state["step"], state["elapsed"], state["log"]
    target = parse_target(cfg.target)
    clock = time.perf_counter() - elapsed
    model.train()
    for step in range(start_step, cfg.steps):
        batch = random.Random(cfg.seed * 1_000_003 + step).sample(rows, min(cfg.batch_size, len(rows)))
        _, _, (ids, mask, labels) = completion_batch(tok, batch, cfg.max_len)
        dev = next(model.parameters()).device
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
        task = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].to(dev), ignore_index=-100)
        lam = schedule_value(cfg.reg_schedule, cfg.reg_lambda, cfg.reg_final, step, cfg.steps, cfg.reg_switch)
        reg = regulariser(factors) if lam > 0 else torch.zeros((), device=dev)
        loss = task + lam * reg
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at step {step + 1}")
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * _lr_factor(step, cfg.steps, cfg.warmup)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cfg.rebalance != "none":
            _rebalance(factors, cfg.rebalance)
        row = {"step": step + 1, "s": round(time.perf_counter() - clock, 3), "loss": float(task),
               "reg": float(reg), "lambda": lam, "lr": opt.param_groups[0]["lr"]}
        done = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or done:
            model.eval()
            row.update({f"val_{k}": v for k, v in evaluate(model).items()})
            model.train()
            if hit is None and reached(target, {k[4:]: v for k, v in row.items() if k.startswith("val_")}):
                hit = {"step": step + 1, "s": row["s"]}
            log.append(row)
            _checkpoint(ckpt, factors, opt, step + 1, row["s"], log)
            if hit:
                break
        else:
            log.append(row)
        progress("finetune", step + 1, cfg.steps)
    return log, hit


def _rebalance(factors: dict[str, LoraFactors], how: str) -> None:
    fn = rebalance_scalar if how == "scalar" else rebalance_full
    with torch.no_grad():
        for f in factors.values():
            b, a = fn(f.b, f.a)
            f.b.copy_(b)
            f.a.copy_(a)


def _checkpoint(path: Path, factors: dict[str, LoraFactors], opt: torch.optim.Optimizer, step: int, elapsed: float,
                log: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"factors": {n: {"a": f.a.detach().cpu(), "b": f.b.detach().cpu()} for n, f in factors.items()},
                "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed, "log": log}, tmp)
    tmp.replace(path)
