"""Training objectives, one per task kind of ``evaluate.read_task``: a mean loss over a batch of rows."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loramigrate.evaluate import Task, completion_batch, label_batch, model_device

BatchLoss = Callable[[nn.Module, list[dict]], torch.Tensor]

def completion_loss(tok, task: Task, max_len: int) -> BatchLoss:
    """Next-token cross-entropy on the completion tokens only."""
    def loss(model: nn.Module, rows: list[dict]) -> torch.Tensor:
        _, _, (ids, mask, labels) = completion_batch(tok, rows, max_len)
        dev = model_device(model)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].to(dev), ignore_index=-100)
    return loss


def label_loss(tok, task: Task, max_len: int) -> BatchLoss:
    """Cross-entropy of the classification head over the task's labels."""
    def loss(model: nn.Module, rows: list[dict]) -> torch.Tensor:
        enc, target = label_batch(tok, rows, task.labels, max_len)
        dev = model_device(model)
        logits = model(**{k: v.to(dev) for k, v in enc.items()}).logits.float()
        return F.cross_entropy(logits, target.to(dev))
    return loss


OBJECTIVES: dict[str, Callable[..., BatchLoss]] = {"generation": completion_loss, "classification": label_loss}
