"""The training loop: LoRA factors + scheduled regularisation toward the init, LoRA+ learning rates,
optional RefLoRA rebalancing, evaluation every k steps, early stop at a target, checkpoints.

Examples are shuffled once per epoch by a generator seeded by (seed, epoch), and a step's batch is a
pure function of the step, so a run resumed from a checkpoint sees exactly the batches an
uninterrupted run would; the checkpoint also holds the random generators' states, so dropout draws
the same masks too.
"""

from __future__ import annotations

import functools
import logging
import math
import pickle
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loramigrate.config import FinetuneConfig, parse_target
from loramigrate.errors import ArtifactError
from loramigrate.finetune.objective import BatchLoss
from loramigrate.finetune.rebalance import rebalance_full, rebalance_scalar
from loramigrate.finetune.regularise import SCHEDULES, delta_distance_sq, init_norm_sq, schedule_value
from loramigrate.lora import refactor
from loramigrate.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module], dict[str, float]]
CKPT = "checkpoint.pt"


@dataclass
class LoraFactors:
    """One adapted module: its trainable factors, scale, the factors it is regularised toward, the
    base weight, the (s·B, A) pairs merged into it by ReLoRA restarts, and the weight as loaded (on the host,
    from the first merge on: in bfloat16, subtracting the merged deltas would not give it back)."""

    a: nn.Parameter
    b: nn.Parameter
    scale: float
    a0: torch.Tensor
    b0: torch.Tensor
    base: torch.Tensor
    merged: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    original: torch.Tensor | None = None
    init_sq: torch.Tensor = field(init=False)  # ‖s·B₀·A₀‖², constant, so computed once

    def __post_init__(self) -> None:
        with torch.no_grad():
            self.init_sq = init_norm_sq(self.b0, self.a0, self.scale)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The PEFT LoRA layers of ``model`` (its ``default`` adapter), by module name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def lora_factors(model: nn.Module, toward: str) -> dict[str, LoraFactors]:
    """The LoRA factors of ``model``; ``toward`` init keeps copies of the start, zero none."""
    out = {}
    keep = toward == "init"
    for name, module in lora_layers(model).items():
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        out[name] = LoraFactors(a=a, b=b, scale=float(module.scaling["default"]),
                                a0=a.detach().clone() if keep else torch.zeros_like(a[:1]),
                                b0=b.detach().clone() if keep else torch.zeros_like(b[:, :1]),
                                base=module.base_layer.weight)
    return out


def regulariser(factors: dict[str, LoraFactors]) -> torch.Tensor:
    """Σ ‖s·B·A − s·B₀·A₀‖² over modules, from r × r Grams."""
    return sum(delta_distance_sq(f.b, f.a, f.scale, f.b0, f.a0, f.scale, f.init_sq) for f in factors.values())


LR_FLOOR = 0.1  # decaying schedules end at this fraction of the peak learning rate


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up to 1, then ``schedule`` (one of the λ schedules,
    reused) from 1 toward LR_FLOOR at the end. Not transformers' ``get_scheduler``: its decays end at 0 and
    its shapes are not the λ schedules', so the two would drift apart."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return SCHEDULES[schedule](1.0, LR_FLOOR, min(progress, 1.0), 0.5)


def reached(target: tuple[str, float] | None, metrics: dict[str, float]) -> bool:
    if target is None:
        return False
    name, value = target
    return metrics[name] <= value if name == "loss" else metrics[name] >= value


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def batch_rows(rows: list[dict], index: int, size: int, seed: int) -> list[dict]:
    """Micro-batch ``index`` of the seeded stream that visits every row once per epoch."""
    size = min(size, len(rows))
    positions = (divmod(i, len(rows)) for i in range(index * size, (index + 1) * size))
    return [rows[_epoch_order(len(rows), seed, epoch)[pos]] for epoch, pos in positions]


def head_parameters(model: nn.Module, factors: dict[str, LoraFactors]) -> dict[str, nn.Parameter]:
    """Trainable parameters outside the LoRA factors: the modules_to_save copies (a classifier head)."""
    lora = {id(p) for f in factors.values() for p in (f.a, f.b)}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora}


def fp32_trainables(model: nn.Module) -> None:
    """Trainable weights in float32 over a half-precision base (mixed precision as the field does it: AdamW's
    small updates would round away in bfloat16). PEFT already keeps LoRA factors in float32 and casts their
    inputs; a trainable module in the base's dtype (a modules_to_save head) is cast here, with its inputs cast to
    float32 and its outputs back to the dtype the rest of the model computes in."""
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)]
        if not own:
            continue
        dtype = own[0].dtype
        module.float()
        module.register_forward_pre_hook(lambda _m, args: tuple(_cast(a, torch.float32) for a in args))
        module.register_forward_hook(lambda _m, _args, out, dtype=dtype: _cast(out, dtype))


def _cast(x, dtype: torch.dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def train(model: nn.Module, rows: list[dict], cfg: FinetuneConfig, batch_loss: BatchLoss, evaluate: EvalFn,
          ckpt_dir: Path | None, progress: ProgressFn = no_progress, dropout: bool = True
          ) -> tuple[list[dict], dict | None]:
    """Train in place; returns the log rows and where the target was reached (or None).

    ``ckpt_dir`` None trains without checkpoints (nothing to resume), and ``dropout`` False keeps the model in
    eval mode, so that the same start always gives the same result (the search's short finetunes).

    Raises:
        FloatingPointError: the loss became NaN/inf (the last checkpoint is kept).
    """
    factors = lora_factors(model, cfg.reg_toward)
    head = head_parameters(model, factors)
    groups = [{"params": [f.a for f in factors.values()], "lr": cfg.lr},
              {"params": [f.b for f in factors.values()], "lr": cfg.lr * cfg.lora_plus_ratio}]
    if head:
        groups.append({"params": list(head.values()), "lr": cfg.lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in groups]
    history: list[dict] = []
    start_step, elapsed, hit = 0, 0.0, None
    ckpt = ckpt_dir / CKPT if ckpt_dir else None
    if ckpt is not None and ckpt.is_file():  # resume: factors, optimiser, log, clock and random generators as they were
        start_step, elapsed, history = _resume(read_checkpoint(ckpt), factors, head, opt)
        log.info("resuming from the checkpoint at step %d of %d (%s)", start_step, cfg.steps, ckpt_dir)
    target = parse_target(cfg.target)
    clock = time.perf_counter() - elapsed
    model.train(dropout)
    for step in range(start_step, cfg.steps):
        opt.zero_grad()
        task = 0.0
        for k in range(cfg.grad_accum):  # micro-batches: gradients add up, the loss is their mean
            micro = batch_loss(model, batch_rows(rows, step * cfg.grad_accum + k, cfg.batch_size, cfg.seed))
            (micro / cfg.grad_accum).backward()
            task += float(micro.detach()) / cfg.grad_accum
        lam = schedule_value(cfg.reg_schedule, cfg.reg_lambda, cfg.reg_final, step, cfg.steps, cfg.reg_switch)
        reg = regulariser(factors) if lam > 0 else torch.zeros(())
        if lam > 0:
            (lam * reg).backward()
        if not math.isfinite(task + lam * float(reg.detach())):
            raise FloatingPointError(f"loss became {task + lam * float(reg.detach())} at step {step + 1}")
        rewarm = 1.0  # after a restart the learning rate climbs again (ReLoRA's re-warm-up), from its first step on
        if cfg.restart_every and step >= cfg.restart_every and cfg.restart_warmup:
            rewarm = min(1.0, (step % cfg.restart_every + 1) / (cfg.restart_warmup + 1))
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * lr_factor(cfg.lr_schedule, step, cfg.steps, cfg.warmup) * rewarm
        opt.step()
        if cfg.rebalance != "none":
            _rebalance(factors, cfg.rebalance)
        if cfg.restart_every and (step + 1) % cfg.restart_every == 0 and step + 1 < cfg.steps:
            restart(factors, opt, cfg.restart_prune, seed=cfg.seed + step)
        row = {"step": step + 1, "s": round(time.perf_counter() - clock, 3), "loss": task,
               "reg": float(reg.detach()), "lambda": lam, "lr": opt.param_groups[0]["lr"]}
        done = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or done:
            model.eval()
            row.update({f"val_{k}": v for k, v in evaluate(model).items()})
            model.train(dropout)
            if hit is None and reached(target, {k[4:]: v for k, v in row.items() if k.startswith("val_")}):
                hit = {"step": step + 1, "s": row["s"]}
            history.append(row)
            if ckpt is not None:
                _checkpoint(ckpt, factors, head, opt, step + 1, row["s"], history)
            if hit:
                break
        else:
            history.append(row)
        progress("finetune", step + 1, cfg.steps, f"loss {task:.3f}")
    if cfg.restart_every:
        fold_restarts(factors, rank=next(iter(factors.values())).a.shape[0])
    return history, hit


def _resume(state: dict, factors: dict[str, LoraFactors], head: dict[str, nn.Parameter], opt: torch.optim.Optimizer
            ) -> tuple[int, float, list[dict]]:
    """Put a checkpoint's state back; returns its step, elapsed seconds and log."""
    with torch.no_grad():
        for name, f in factors.items():
            f.a.copy_(state["factors"][name]["a"])
            f.b.copy_(state["factors"][name]["b"])
            for sb, a in state["factors"][name]["merged"]:
                _merge(f, sb, a)
        for name, p in head.items():
            p.copy_(state["head"][name])
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state["step"], state["elapsed"], state["log"]


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's tensors, numbers and strings, never code: the file sits at a predictable path
    beside the output, so unpickling arbitrary objects from it would run whatever someone put there.

    Raises:
        ArtifactError: the file holds other objects, or cannot be read.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # the optimiser moves its state back
    except pickle.UnpicklingError:
        raise ArtifactError(f"refusing checkpoint {path}: it holds objects other than tensors and numbers, "
                            "which could run code; delete it to start over") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise ArtifactError(f"cannot read checkpoint {path} ({str(e).splitlines()[0]}); delete it to start over"
                            ) from None


def rng_state() -> dict:
    """Every random generator a training step may draw from (dropout, a user's sampling), as plain data."""
    _, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", key.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _merge(f: LoraFactors, sb: torch.Tensor, a: torch.Tensor) -> None:
    """Add s·B·A into the base weight, on its device; the first merge keeps the weight as loaded."""
    with torch.no_grad():
        if f.original is None:
            f.original = f.base.detach().to("cpu", copy=True)
        sb, a = sb.to(f.base.device), a.to(f.base.device)
        f.base += (sb @ a).to(f.base.dtype)
    f.merged.append((sb, a))


def restart(factors: dict[str, LoraFactors], opt: torch.optim.Optimizer, prune: float, seed: int) -> None:
    """ReLoRA (Lialin et al. 2023): fold s·B·A into the base weight, re-initialise A (Kaiming) and B (zero,
    so the model function is unchanged), and zero the ``prune`` fraction of smallest optimiser moments."""
    g = torch.Generator().manual_seed(seed)  # on the host: a CPU and a CUDA run restart from the same A
    with torch.no_grad():
        for f in factors.values():
            _merge(f, (f.scale * f.b).detach().clone(), f.a.detach().clone())
            bound = 1 / math.sqrt(f.a.shape[1])  # kaiming_uniform(a=√5), as PEFT initialises A
            f.a.copy_(torch.empty(f.a.shape).uniform_(-bound, bound, generator=g))
            f.b.zero_()
            for p in (f.a, f.b):
                state = opt.state.get(p, {})
                if prune > 0 and "exp_avg_sq" in state:
                    # one mask for both moments (by the second): a kept first moment over a zeroed
                    # second one would make a huge step
                    v = state["exp_avg_sq"]
                    drop = v <= torch.quantile(v.flatten().float(), prune)
                    v.masked_fill_(drop, 0.0)
                    state["exp_avg"].masked_fill_(drop, 0.0)


def fold_restarts(factors: dict[str, LoraFactors], rank: int) -> None:
    """After training with restarts: restore each base weight exactly as loaded and put Σ merged + current deltas
    back into the factors, re-factorised to ``rank`` (from the stacked factors, never densely)."""
    with torch.no_grad():
        for f in factors.values():
            if not f.merged:
                continue
            sbs = [sb for sb, _ in f.merged] + [(f.scale * f.b).detach()]
            a_s = [a for _, a in f.merged] + [f.a.detach()]
            f.base.copy_(f.original)
            f.original = None
            b_k, a_k, _ = refactor(torch.cat(sbs, 1), torch.cat(a_s, 0), rank=rank)
            f.b.copy_((b_k / f.scale).to(f.b.dtype))
            f.a.copy_(a_k.to(f.a.dtype))
            f.merged.clear()


def _rebalance(factors: dict[str, LoraFactors], how: str) -> None:
    fn = rebalance_scalar if how == "scalar" else rebalance_full
    with torch.no_grad():
        for f in factors.values():
            b, a = fn(f.b, f.a)
            f.b.copy_(b)
            f.a.copy_(a)


def _checkpoint(path: Path, factors: dict[str, LoraFactors], head: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                step: int, elapsed: float, history: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # created at the first checkpoint: a failure before leaves nothing
    tmp = path.with_suffix(".tmp")
    torch.save({"rng": rng_state(), "factors": {n: {"a": f.a.detach().cpu(), "b": f.b.detach().cpu(),
                                                    "merged": [(sb.cpu(), a.cpu()) for sb, a in f.merged]}
                            for n, f in factors.items()},
                "head": {n: p.detach().cpu() for n, p in head.items()},
                "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed, "log": history}, tmp)
    tmp.replace(path)
    log.debug("checkpoint at step %d: %s", step, path)
