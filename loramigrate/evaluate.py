"""Task metrics of base + adapter pairs, and the comparison a migration report needs.

Data is JSONL: ``{"prompt", "completion"}`` rows (causal LMs: loss on completion tokens, exact match
of greedy decoding) or ``{"text", "label"}`` rows (sequence classification: loss and accuracy, labels
indexed in sorted order, the convention the classification head was trained with). With a teacher,
rows may hold only the ``prompt`` or only the ``text``: the teacher supplies the target.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loramigrate.adapters import check_adapter_dir
from loramigrate.errors import ArtifactError, ConfigError
from loramigrate.models import input_device
from loramigrate.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)
METRIC = {"generation": "exact_match", "classification": "accuracy"}  # the task metric of each task kind


@dataclass(frozen=True)
class Task:
    kind: str  # "generation" or "classification"
    rows: list[dict]
    labels: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EvalResult:
    name: str
    n: int
    loss: float
    metric: str
    score: float
    correct: list[bool]
    negative_flips: int | None = None  # examples the reference got right and this one gets wrong
    adapter: str | None = None  # the adapter directory as given; None for the base alone
    gap_recovered: float | None = None  # (score − new base alone) / (old pair − new base alone)

    def summary(self) -> dict:
        out = {"name": self.name, "n": self.n, "loss": self.loss, self.metric: self.score}
        for key in ("negative_flips", "gap_recovered"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


FIELDS = {"generation": ("prompt", "completion"), "classification": ("text", "label")}  # input, target


def has_target(row: dict) -> bool:
    """Whether the row carries its completion or label (otherwise a teacher supplies it)."""
    return "completion" in row or "label" in row


def _row_kind(row: object, unlabelled: bool) -> str:
    """The task kind of one row.

    Raises:
        ValueError: the row's problem, in words.
    """
    for kind, (source, target) in FIELDS.items():
        if not (isinstance(row, dict) and isinstance(row.get(source), str)):
            continue
        if kind == "generation" and target in row and not isinstance(row[target], str):
            raise ValueError("'completion' must be a string")
        if target not in row and not unlabelled:
            raise ValueError(f"no '{target}': rows without one need a teacher (--teacher old or proxy)")
        return kind
    raise ValueError("expected 'prompt' and 'completion' strings, or 'text' and 'label'")


def read_task(path: str | Path, limit: int | None = None, unlabelled: bool = False) -> Task:
    """Read and validate a task file; ``unlabelled`` accepts rows without a completion or label (a teacher
    will supply them).

    Raises:
        ArtifactError: missing/empty file, a line that is not JSON or lacks the fields (named by number).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"cannot read data file {path}: {e.__class__.__name__}") from None
    rows, kinds = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            kinds.add(_row_kind(row, unlabelled))
        except json.JSONDecodeError:
            raise ArtifactError(f"{path}:{n}: not valid JSON") from None
        except ValueError as e:
            raise ArtifactError(f"{path}:{n}: {e}") from None
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise ArtifactError(f"data file {path} holds no examples")
    if len(kinds) > 1:
        raise ArtifactError(f"{path} mixes prompt/completion and text/label rows")
    kind = kinds.pop()
    labels = sorted({str(r["label"]) for r in rows if "label" in r}) if kind == "classification" else []
    return Task(kind=kind, rows=rows, labels=labels)


def completion_batch(tok, rows: list[dict], max_len: int | None = None
                     ) -> tuple[list[list[int]], list[list[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Tokenise prompt + completion rows, right-padded; labels are -100 outside the completion.

    Returns prompt ids, completion ids and (input_ids, attention_mask, labels), each (B, T).
    """
    prompts = [tok(r["prompt"], add_special_tokens=True)["input_ids"] for r in rows]
    targets = [tok(r["completion"], add_special_tokens=False)["input_ids"] for r in rows]
    seqs = [(p + t)[:max_len] if max_len else p + t for p, t in zip(prompts, targets, strict=True)]
    width = max(map(len, seqs))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, len(p): len(s)] = torch.tensor(s[len(p):])
    return prompts, targets, (ids, mask, labels)


Logits = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # model inputs → logits (B, T, V)
Generate = Callable[[list[list[int]], int], torch.Tensor]  # prompt ids, new tokens → greedy ids (B, ≤ new tokens)


def generation_metrics(model: nn.Module, tok, rows: list[dict], batch_size: int,
                       progress: ProgressFn = no_progress, label: str = "eval") -> tuple[float, list[bool]]:
    """Mean loss over completion tokens and per-example exact match of greedy decoding."""
    return score_generation(lambda inputs: model(**inputs).logits, lambda p, n: generate_ids(model, tok, p, n),
                            input_device(model), tok, rows, batch_size, progress, label)


@torch.no_grad()
def score_generation(logits_of: Logits, generate: Generate, device: torch.device, tok, rows: list[dict],
                     batch_size: int, progress: ProgressFn = no_progress, label: str = "eval"
                     ) -> tuple[float, list[bool]]:
    """``generation_metrics`` of any logits function and its greedy decoding (a model, or an ensemble)."""
    total_loss, total_tokens, correct = 0.0, 0, []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        prompts, targets, (ids, mask, labels) = completion_batch(tok, batch)
        logits = logits_of({"input_ids": ids.to(device), "attention_mask": mask.to(device)}).float()
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].to(device), ignore_index=-100,
                               reduction="sum")
        total_loss += float(loss)
        total_tokens += int((labels[:, 1:] != -100).sum())
        texts = tok.batch_decode(generate(prompts, max(map(len, targets)) + 2), skip_special_tokens=True)
        correct += [answer_matches(t, r["completion"]) for t, r in zip(texts, batch, strict=True)]
        progress(label, min(start + batch_size, len(rows)), len(rows))
    return total_loss / max(total_tokens, 1), correct


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, longest prompt): left padding, so every prompt ends where
    generation starts."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def generate_ids(model: nn.Module, tok, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
    """Greedy continuation ids (B, ≤ new_tokens) of a model, with its KV cache; pad after an end token."""
    ids, mask = left_pad(prompts, tok.pad_token_id)
    dev = input_device(model)
    out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, ids.shape[1]:].cpu()


def answer_matches(generated: str, target: str) -> bool:
    """Exact match of the answer: the generation starts with the target and the target ends at a word
    boundary there (models trained without an end token keep generating after the answer)."""
    text, want = generated.strip(), target.strip()
    return text.startswith(want) and (len(text) == len(want) or not text[len(want)].isalnum())


def text_batch(tok, rows: list[dict], max_len: int = 256) -> dict[str, torch.Tensor]:
    """Tokenised, padded texts of classification rows."""
    return dict(tok([r["text"] for r in rows], return_tensors="pt", padding=True, truncation=True, max_length=max_len))


def label_batch(tok, rows: list[dict], labels: list[str], max_len: int = 256) -> tuple[dict, torch.Tensor]:
    """Tokenised, padded texts and the class index of each row (labels in sorted order)."""
    return text_batch(tok, rows, max_len), torch.tensor([labels.index(str(r["label"])) for r in rows])


@torch.no_grad()
def classification_metrics(model: nn.Module, tok, rows: list[dict], labels: list[str], batch_size: int,
                           progress: ProgressFn = no_progress, label: str = "eval") -> tuple[float, list[bool]]:
    """Mean cross-entropy and per-example correctness of a sequence-classification model."""
    dev = input_device(model)
    total, correct = 0.0, []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        enc, target = label_batch(tok, batch, labels)
        target = target.to(dev)
        logits = model(**{k: v.to(dev) for k, v in enc.items()}).logits.float()
        if logits.shape[-1] != len(labels):
            raise ConfigError(f"the model predicts {logits.shape[-1]} classes, the data has {len(labels)} labels")
        total += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += (logits.argmax(-1) == target).tolist()
        progress(label, min(start + batch_size, len(rows)), len(rows))
    return total / len(rows), correct


def negative_flips(reference: list[bool], candidate: list[bool]) -> int:
    return sum(r and not c for r, c in zip(reference, candidate, strict=True))


def task_metrics(model: nn.Module, tok, task: Task, batch_size: int, progress: ProgressFn = no_progress,
                 label: str = "eval") -> tuple[float, list[bool]]:
    """Mean loss and per-example correctness under the task's metric (``METRIC[task.kind]``)."""
    if task.kind == "generation":
        return generation_metrics(model, tok, task.rows, batch_size, progress, label)
    return classification_metrics(model, tok, task.rows, task.labels, batch_size, progress, label)


def evaluate_pairs(base_ref: str, adapters: list[str], task: Task, batch_size: int, load_cfg,
                   progress: ProgressFn = no_progress, include_base: bool = True) -> list[EvalResult]:
    """The base alone (``include_base``), then base + each adapter; the base is loaded once and
    adapters are swapped in and out."""
    from loramigrate.models import attach_adapter, load_frozen, load_tokenizer, offloaded, resolve_model

    for adapter in adapters:
        check_adapter_dir(adapter)
    ref = resolve_model(base_ref)
    tok = load_tokenizer(ref)
    num_labels = len(task.labels) if task.kind == "classification" else None
    def load_base() -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # modules the checkpoint lacks (the head of "base alone") drawn alike
            torch.manual_seed(0)
            return load_frozen(ref, load_cfg, num_labels=num_labels)

    base = load_base()
    metric = METRIC[task.kind]
    results = []
    if include_base:
        loss, correct = task_metrics(base, tok, task, batch_size, progress, f"{Path(base_ref).name} alone")
        results.append(EvalResult(f"{Path(base_ref).name} (no adapter)", len(correct), loss, metric,
                                  sum(correct) / len(correct), correct))
    for adapter in adapters:
        try:
            model = attach_adapter(base, adapter).eval()
        except (RuntimeError, ValueError, KeyError) as e:
            log.warning("%s does not load on %s: %s", adapter, base_ref, str(e).splitlines()[0][:200])
            base = load_base() if offloaded(base) else base  # PEFT may have re-dispatched it half way
            continue
        loss, correct = task_metrics(model, tok, task, batch_size, progress, Path(adapter).name)
        name = f"{Path(base_ref).name} + {Path(adapter).name}"
        results.append(EvalResult(name, len(correct), loss, metric, sum(correct) / len(correct), correct,
                                  adapter=adapter))
        # PEFT re-dispatches an offloaded base under its own names, which unloading does not undo
        base = load_base() if offloaded(base) else unload_to_base(model)
    return results


def unload_to_base(model: nn.Module) -> nn.Module:
    """The base model as it was before the adapter. PEFT's ``unload`` puts the active adapter's
    ``modules_to_save`` copies (a trained head) in place of the originals, which the next adapter would
    inherit; with the adapter deleted first, none is active and the originals come back."""
    model.delete_adapter(model.active_adapter)
    return model.unload()


def with_flips(results: list[EvalResult], reference: EvalResult) -> list[EvalResult]:
    return [replace(r, negative_flips=negative_flips(reference.correct, r.correct))
            for r in results]


def with_gap(results: list[EvalResult], old_pair: EvalResult, new_alone: EvalResult) -> list[EvalResult]:
    """Each result's share of the old adapter's gain, (score − new alone) / (old pair − new alone): 0 is the
    new base, 1 the old service level. None where the old adapter gains nothing to recover."""
    gain = old_pair.score - new_alone.score
    return [replace(r, gap_recovered=(r.score - new_alone.score) / gain if gain else None) for r in results]
