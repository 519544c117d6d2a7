"""Training objectives, one per task kind of ``evaluate.read_task``: a mean loss over a batch of rows,
optionally mixed with the KL divergence to a teacher on the same outputs (distillation)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loramigrate.evaluate import Task, completion_batch, label_batch
from loramigrate.models import input_device
from loramigrate.proxy import common_width

BatchLoss = Callable[[nn.Module, list[dict]], torch.Tensor]
# rows → model inputs and targets aligned with the logits' leading dimensions (-100: no output there)
Encode = Callable[[list[dict]], tuple[dict[str, torch.Tensor], torch.Tensor]]
TeacherLogits = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]  # (student, its inputs) → logits


@dataclass(frozen=True)
class Distill:
    """What the student learns from a teacher: the teacher's logits on the student's inputs, a temperature,
    and the weight of the KL against the label loss."""

    teacher: TeacherLogits
    temperature: float = 1.0
    weight: float = 1.0


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of (N, V) logits, averaged over the N outputs; × T² keeps the gradient scale of
    softened targets independent of T (Hinton et al. 2015)."""
    student, teacher = common_width(student, teacher)
    return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                    log_target=True, reduction="batchmean") * temperature ** 2


def objective(encode: Encode, distill: Distill | None = None) -> BatchLoss:
    """Cross-entropy on the outputs ``encode`` marks, or w·KL + (1 − w)·cross-entropy with a teacher."""
    def loss(model: nn.Module, rows: list[dict]) -> torch.Tensor:
        inputs, targets = encode(rows)
        dev = input_device(model)
        inputs, targets = {k: v.to(dev) for k, v in inputs.items()}, targets.to(dev)
        keep = targets != -100
        logits = model(**inputs).logits.float()[keep]
        task = F.cross_entropy(logits, targets[keep])
        if distill is None:
            return task
        with torch.no_grad():
            teacher = distill.teacher(model, inputs).float()[keep]
        return distill.weight * distill_kl(logits, teacher, distill.temperature) + (1 - distill.weight) * task
    return loss


def completion_loss(tok, task: Task, max_len: int, distill: Distill | None = None) -> BatchLoss:
    """Next-token cross-entropy on the completion tokens only (and the KL to the teacher's there)."""
    def encode(rows: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        _, _, (ids, mask, labels) = completion_batch(tok, rows, max_len)
        # the logits at position t predict token t + 1
        return {"input_ids": ids, "attention_mask": mask}, F.pad(labels[:, 1:], (0, 1), value=-100)
    return objective(encode, distill)


def label_loss(tok, task: Task, max_len: int, distill: Distill | None = None) -> BatchLoss:
    """Cross-entropy of the classification head over the task's labels (and the KL to the teacher's class
    probabilities)."""
    return objective(lambda rows: label_batch(tok, rows, task.labels, max_len), distill)


@torch.no_grad()
def mean_loss(batch_loss: BatchLoss, model: nn.Module, rows: list[dict], batch_size: int) -> float:
    """``batch_loss`` over all ``rows``, batch by batch, weighted by batch size."""
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    return sum(float(batch_loss(model, b)) * len(b) for b in batches) / len(rows)


OBJECTIVES: dict[str, Callable[..., BatchLoss]] = {"generation": completion_loss, "classification": label_loss}
