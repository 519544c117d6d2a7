"""Teachers for distillation in finetune, by name (``FinetuneConfig.teacher``): the migrated adapter learns
what the old pair does on the task, not only the labels.

- ``old``: the old base with the old adapter.
- ``proxy``: the proxy-tuning ensemble (arXiv 2401.08565), the new base plus the old adapter's logit offset.
  The new base is the student with its adapter switched off, so only the old pair is loaded.

Rows without targets (prompts only, texts only) get the teacher's, once before training: its greedy
completion, or its most likely label.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from loramigrate.config import ModelLoadConfig
from loramigrate.errors import ArtifactError, ConfigError
from loramigrate.evaluate import Task, generate_ids, has_target, text_batch
from loramigrate.finetune.objective import TeacherLogits
from loramigrate.models import ModelRef, input_device, load_pair, require_shared_vocabulary, resolve_model
from loramigrate.progress import ProgressFn, no_progress
from loramigrate.proxy import greedy_ids, proxy_logits

log = logging.getLogger(__name__)
Complete = Callable[[nn.Module, object, list[list[int]], int], torch.Tensor]  # (student, tok, prompts, n) → ids


@dataclass(frozen=True)
class Teacher:
    logits: TeacherLogits  # (student, its inputs) → the teacher's logits on them
    complete: Complete  # greedy continuation ids (B, ≤ n) of prompt ids


def old_teacher(pair: nn.Module) -> Teacher:
    return Teacher(logits=lambda student, inputs: pair(**inputs).logits,
                   complete=lambda student, tok, prompts, n: generate_ids(pair, tok, prompts, n))


def proxy_teacher(pair: nn.Module) -> Teacher:
    def logits(student: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with student.disable_adapter():
            new = student(**inputs).logits
        return proxy_logits(new, pair, inputs)

    def complete(student: nn.Module, tok, prompts: list[list[int]], n: int) -> torch.Tensor:
        return greedy_ids(lambda inputs: logits(student, inputs)[:, -1], tok, prompts, n, input_device(student))
    return Teacher(logits, complete)


TEACHERS: dict[str, Callable[[nn.Module], Teacher]] = {"old": old_teacher, "proxy": proxy_teacher}


def check_teacher(name: str, kind: str, student: ModelRef, teacher_base: str) -> ModelRef:
    """Refuse what cannot work, before any model loads; returns the teacher base.

    Raises:
        ConfigError: ``proxy`` on classification, or tokenizers that differ (the teacher reads the student's
            token ids, position by position).
        ArtifactError: the teacher base does not exist.
    """
    if name == "proxy" and kind != "generation":
        raise ConfigError("--teacher proxy combines next-token logits: generation tasks only (use --teacher old)")
    ref = resolve_model(teacher_base)
    require_shared_vocabulary(student, ref, "distillation")
    return ref


def load_teacher(name: str, base: str, adapter: str, task: Task, load: ModelLoadConfig) -> Teacher:
    """The named teacher over the old pair (with the classifier of the task's labels from the adapter)."""
    num_labels = len(task.labels) if task.kind == "classification" else None
    return TEACHERS[name](load_pair(base, adapter, load, num_labels=num_labels))


def _complete(teacher: Teacher, student: nn.Module, tok, task: Task, rows: list[dict], max_len: int,
              new_tokens: int) -> list[dict]:
    prompts = [tok(r["prompt"], add_special_tokens=True)["input_ids"] for r in rows]  # as completion_batch does
    texts = tok.batch_decode(teacher.complete(student, tok, prompts, new_tokens), skip_special_tokens=True)
    return [{**r, "completion": t} for r, t in zip(rows, texts, strict=True)]


def _label(teacher: Teacher, student: nn.Module, tok, task: Task, rows: list[dict], max_len: int,
           new_tokens: int) -> list[dict]:
    dev = input_device(student)
    inputs = {k: v.to(dev) for k, v in text_batch(tok, rows, max_len).items()}
    best = teacher.logits(student, inputs).argmax(-1).tolist()
    return [{**r, "label": task.labels[i]} for r, i in zip(rows, best, strict=True)]


FILL = {"generation": _complete, "classification": _label}


@torch.no_grad()
def fill_targets(teacher: Teacher, student: nn.Module, tok, task: Task, rows: list[dict], max_len: int,
                 new_tokens: int, batch_size: int, progress: ProgressFn = no_progress, what: str = "rows"
                 ) -> list[dict]:
    """``rows`` with the teacher's target wherever one is missing; an empty completion drops its row.

    Raises:
        ArtifactError: no row is left.
    """
    missing = [r for r in rows if not has_target(r)]
    done = []
    for start in range(0, len(missing), batch_size):
        done += FILL[task.kind](teacher, student, tok, task, missing[start:start + batch_size], max_len, new_tokens)
        progress(f"teacher: {what}", len(done), len(missing))
    filled, out = iter(done), []
    for row in rows:
        target = row if has_target(row) else next(filled)
        if target is row or target.get("completion", "x").strip():
            out.append(target)
    if missing:
        log.info("the teacher supplied %d %s targets (%d empty completions dropped)", len(missing), what,
                 len(rows) - len(out))
    if not out:
        raise ArtifactError(f"the teacher completed every {what} prompt with nothing; no {what} rows left")
    return out
