"""The proxy-tuning ensemble (Liu et al. 2024, arXiv 2401.08565): the new base steered by the old adapter's
logit offset, ``logits_new + (logits_{old+A} − logits_old)``. It needs a shared vocabulary and no training, so
it shows the quality within reach on the new base (an eval arm) and serves finetune as a teacher.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from loramigrate.config import ModelLoadConfig
from loramigrate.errors import ConfigError
from loramigrate.evaluate import METRIC, EvalResult, Task, left_pad, score_generation
from loramigrate.models import input_device, load_frozen, load_pair, load_tokenizer, require_shared_vocabulary, resolve_model
from loramigrate.progress import ProgressFn, no_progress

NAME = "proxy ensemble"
NextLogits = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # model inputs → next-token logits (B, V)


def common_width(*logits: torch.Tensor) -> list[torch.Tensor]:
    """The logits cut to the narrowest vocabulary: checkpoints of one tokenizer may pad their embedding
    matrices to different sizes, and the padding rows stand for no token."""
    width = min(t.shape[-1] for t in logits)
    return [t[..., :width] for t in logits]


def proxy_logits(new_logits: torch.Tensor, pair: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``new_logits`` (the new base's, (B, T, V)) plus the old adapter's offset on the same inputs; ``pair`` is
    the old base with its adapter (a PeftModel: its base is read with the adapter switched off)."""
    adapted = pair(**inputs).logits.float()
    with pair.disable_adapter():
        old = pair(**inputs).logits.float()
    new, adapted, old = common_width(new_logits.float(), adapted, old)
    return new + adapted - old


@torch.no_grad()
def greedy_ids(next_logits: NextLogits, tok, prompts: list[list[int]], new_tokens: int, device: torch.device
               ) -> torch.Tensor:
    """Greedy continuation ids (B, ≤ new_tokens) under any logits function (an ensemble has no ``generate``),
    padded after an end token as ``generate`` does. Without a KV cache every step re-reads the prefix: fine for
    short answers."""
    ids, mask = left_pad(prompts, tok.pad_token_id)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    out = []
    for _ in range(new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the positions
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        step = next_logits({k: v.to(device) for k, v in inputs.items()}).argmax(-1).cpu()
        step = torch.where(done, tok.pad_token_id, step)
        out.append(step)
        done |= step == tok.eos_token_id
        if done.all():
            break
        ids, mask = torch.cat([ids, step[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


def evaluate_proxy(new_base: str, old_base: str, old_adapter: str, task: Task, batch_size: int,
                   load_cfg: ModelLoadConfig, progress: ProgressFn = no_progress) -> EvalResult:
    """Loss on the completion tokens and exact match of greedy decoding of the proxy ensemble.

    Raises:
        ConfigError: a classification task, or tokenizers that differ.
        ArtifactError: a model or the adapter cannot be loaded.
    """
    if task.kind != "generation":
        raise ConfigError("the proxy ensemble combines next-token logits: generation tasks only")
    new_ref = resolve_model(new_base)
    require_shared_vocabulary(new_ref, resolve_model(old_base), "the proxy ensemble")
    tok = load_tokenizer(new_ref)
    pair, new = load_pair(old_base, old_adapter, load_cfg), load_frozen(new_ref, load_cfg)

    def logits_of(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return proxy_logits(new(**inputs).logits, pair, inputs)

    dev = input_device(new)
    loss, correct = score_generation(
        logits_of, lambda prompts, n: greedy_ids(lambda x: logits_of(x)[:, -1], tok, prompts, n, dev),
        dev, tok, task.rows, batch_size, progress, NAME)
    return EvalResult(NAME, len(correct), loss, METRIC[task.kind], sum(correct) / len(correct), correct)
