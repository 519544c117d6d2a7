"""Calibration text → aligned token batches → per-layer activation rows for CKA."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from loramigrate.errors import ArtifactError
from loramigrate.models import input_device


def default_calibration() -> Path:
    return Path(str(resources.files("loramigrate") / "data" / "calibration.txt"))


def read_calibration(path: Path | None) -> list[str]:
    """Texts from a .txt file (paragraphs split on blank lines) or a .jsonl file (``text``, or
    ``prompt`` + ``completion`` per line). ``None`` reads the calibration text shipped with loramigrate.

    Raises:
        ArtifactError: missing, unreadable or empty file, or a JSONL line without text.
    """
    path = path or default_calibration()
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"cannot read calibration file {path}: {e.__class__.__name__}") from None
    if Path(path).suffix == ".jsonl":
        texts = [_jsonl_text(line, n, path) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
    else:
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise ArtifactError(f"calibration file {path} holds no text")
    return texts


def _jsonl_text(line: str, n: int, path: Path) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        raise ArtifactError(f"{path}:{n}: not valid JSON") from None
    text = row.get("text") if isinstance(row, dict) else None
    if text is None and isinstance(row, dict) and "prompt" in row:
        text = str(row["prompt"]) + str(row.get("completion", ""))
    if not isinstance(text, str) or not text.strip():
        raise ArtifactError(f"{path}:{n}: expected a non-empty 'text' (or 'prompt'/'completion') field")
    return text


def windows(texts: list[str], tok, seq_len: int) -> Iterator[str]:
    """Each text cut at ``tok``'s token boundaries into spans of at most ``seq_len`` tokens (special
    tokens included): a long paragraph gives several rows, where truncation would drop its tail."""
    room = max(1, seq_len - tok.num_special_tokens_to_add())
    for text in texts:
        spans = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for start in range(0, len(spans), room):
            part = spans[start:start + room]
            yield text[part[0][0]:part[-1][1]]


def calibration_batches(texts: list[str], old_tok, new_tok, seq_len: int, max_tokens: int,
                        batch_size: int) -> Iterator[tuple[dict, dict]]:
    """Yield (old, new) tokenised batches of the same ``windows`` of the texts, until ``max_tokens``
    old tokens.

    With one shared tokenizer the two encodings are identical, so rows line up token by token.
    """
    budget = max_tokens
    batch: list[str] = []
    for text in windows(texts, old_tok, seq_len):
        if budget <= 0:
            break
        batch.append(text)
        budget -= min(seq_len, len(old_tok(text, add_special_tokens=True)["input_ids"]))
        if len(batch) == batch_size:
            yield _encode(old_tok, batch, seq_len), _encode(new_tok, batch, seq_len)
            batch = []
    if batch:
        yield _encode(old_tok, batch, seq_len), _encode(new_tok, batch, seq_len)


def _encode(tok, texts: list[str], seq_len: int) -> dict:
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=seq_len)
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def residual_streams(model: nn.Module, batch: dict, device: torch.device | None = None) -> torch.Tensor:
    """The residual stream entering every block and leaving the last: (L + 1, B, T, d), float32 on ``device``
    (default: the model's input device), where the accumulators work; index i is the input of block i, index i + 1
    its output (the last one after the final norm, as transformers returns it). Skips the LM head.
    Blocks a device map spread over GPUs return their states on their own device; they are gathered."""
    inputs_at = input_device(model)
    out = model.base_model(**{k: v.to(inputs_at) for k, v in batch.items()}, output_hidden_states=True)
    return torch.stack([h.to(device or inputs_at) for h in out.hidden_states]).float()


def activation_rows(states: torch.Tensor, mask: torch.Tensor, pooled: bool, row_norm: bool) -> torch.Tensor:
    """(L, B, T, d) → (L, n, d): one row per real token, or per sequence (masked mean) if ``pooled``.

    ``row_norm`` scales every row to unit length so that the few tokens carrying massive
    activations do not dominate linear CKA.
    """
    m = mask.to(states.device).bool()
    if pooled:
        w = m.float()[None, :, :, None]
        rows = (states * w).sum(2) / w.sum(2).clamp_min(1)
    else:
        rows = states[:, m]
    if row_norm:
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return rows
