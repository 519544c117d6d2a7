"""Task rows written by the testbed fetch (loramigrate/testbed.py): the format users train with (docs/testbed.md)."""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loramigrate import testbed as convert
from loramigrate.errors import ArtifactError
from tests.fake_testbed import fake_bigbench

# Qwen2 / SmolLM2 style: digits are pre-tokenised one by one, so " 812" is "Ġ" "8" "1" "2".
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")


def _arithmetic(n: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        op, val = rng.choice([("plus", a + b), ("times", a * b)])
        out.append((f"What is {a} {op} {b}?", str(val)))
    return out


def _bpe(style: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on arithmetic Q/A text: GPT-2 pre-tokenisation (" 812" is one pre-token,
    so the space merges into the number) or Qwen's (digits split singly)."""
    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    texts = [f"Question: {q}\nAnswer: {a}" for q, a in _arithmetic()]
    texts += [f"Question: How was the hotel?\nAnswer: {w}" for w in ("positive", "negative", "neutral")] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       special_tokens=["<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _splits_like_joined(tok, prompt: str, completion: str) -> bool:
    """What evaluate/finetune feed the model (prompt ids + completion ids) equals the joined text's ids."""
    return tok(prompt)["input_ids"] + tok(completion, add_special_tokens=False)["input_ids"] == \
        tok(prompt + completion)["input_ids"]


def test_generation_row_ends_at_the_answer_cue():
    row = convert.generation_row("  What is 528 plus 284? \n", "812")
    assert row == {"prompt": "Question: What is 528 plus 284?\nAnswer:", "completion": " 812"}
    assert row["prompt"] == row["prompt"].rstrip() and row["prompt"].endswith("\nAnswer:")
    assert row["completion"].startswith(" ") and not row["completion"].startswith("  ")
    assert convert._row({"input": "What is 2 times 3?", "target": ["6"]}) == \
        convert.generation_row("What is 2 times 3?", "6")


@pytest.mark.parametrize("style", ["gpt2", "qwen"])
def test_prompt_plus_completion_tokenizes_as_the_joined_text(style):
    tok = _bpe(style)
    for q, a in _arithmetic(50, seed=1) + [("How was the hotel?", "positive")]:
        row = convert.generation_row(q, a)
        assert _splits_like_joined(tok, row["prompt"], row["completion"]), (style, row)


def test_old_format_cuts_tokens_the_joined_text_merges():
    """The old rows ("…? " → "812") fail the check above: the prompt ends in a lone "Ġ" where the joined
    text has "Ġ8…" (GPT-2-style BPE) or "Ġpositive" (both styles). Qwen-style digit splitting keeps the
    ids of numeric answers, as the real Qwen2.5 and SmolLM2 tokenizers do; those rows lacked the cue."""
    gpt2, qwen = _bpe("gpt2"), _bpe("qwen")
    old = [(q + " ", a) for q, a in _arithmetic(50, seed=1)]
    assert not any(_splits_like_joined(gpt2, p, c) for p, c in old)
    assert all(_splits_like_joined(qwen, p, c) for p, c in old)
    for tok in (gpt2, qwen):
        assert not _splits_like_joined(tok, "Question: How was the hotel?\nAnswer: ", "positive")


def _fake_bigbench(path: Path) -> Path:
    arith3 = [{"input": f"What is {i} plus {i}?", "target": str(2 * i), "target_scores": {str(2 * i): 1.0, "banana": 0.0}}
              for i in range(100, 120)]
    multiemo = [{"input": f"review {i}", "target_scores": {"positive": i % 2, "negative": 1 - i % 2}} for i in range(20)]
    return fake_bigbench(path, multiemo, arith3)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_extraction_writes_tasks_and_marker_and_redoes_stale_caches(tmp_path, monkeypatch):
    sdist, data = _fake_bigbench(tmp_path / "bigbench.tar.gz"), tmp_path / "data"
    monkeypatch.setattr(convert, "download", lambda cache, specs: [sdist] if specs == [convert.BIGBENCH] else None)
    # A cache from the old converter: malformed rows and no FORMAT marker.
    (data / "arith3").mkdir(parents=True)
    (data / "arith3" / "train.jsonl").write_text(json.dumps({"prompt": "What is 1 plus 1? ", "completion": "2"}) + "\n")

    convert.fetch_tasks(tmp_path)
    assert (data / "FORMAT").read_text().strip() == convert.TASK_FORMAT
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == ["arith2mul", "arith3", "multiemo"]
    for name in ("arith2mul", "arith3", "multiemo"):
        assert [len(_rows(data / name / f"{s}.jsonl")) for s in ("train", "val", "test")] == [16, 2, 2]
    arith = [r for s in ("train", "val", "test") for r in _rows(data / "arith3" / f"{s}.jsonl")]
    assert convert.generation_row("What is 100 plus 100?", "200") in arith
    assert all(r["prompt"].endswith("\nAnswer:") and r["completion"].startswith(" ") for r in arith)
    assert convert.generation_row("What is 10 times 2?", "20") in \
        [r for s in ("train", "val", "test") for r in _rows(data / "arith2mul" / f"{s}.jsonl")]
    assert {"text": "review 1", "label": "positive"} in \
        [r for s in ("train", "val", "test") for r in _rows(data / "multiemo" / f"{s}.jsonl")]

    # Current marker: nothing is rewritten.
    (data / "arith3" / "test.jsonl").write_text("kept\n")
    convert.fetch_tasks(tmp_path)
    assert (data / "arith3" / "test.jsonl").read_text() == "kept\n"

    # A stale marker: extracted again, with the same seeded split.
    (data / "FORMAT").write_text("qa-cue-1\n")
    convert.fetch_tasks(tmp_path)
    assert (data / "arith3" / "test.jsonl").read_text() != "kept\n"
    assert _rows(data / "arith3" / "train.jsonl")[0]["prompt"].startswith("Question: ")
    assert (data / "FORMAT").read_text().strip() == convert.TASK_FORMAT


def test_extraction_fails_without_marker_when_a_task_is_missing(tmp_path):
    sdist = tmp_path / "empty.tar.gz"
    with tarfile.open(sdist, "w:gz"):
        pass
    with pytest.raises(ArtifactError, match="2_digit_multiplication"):
        convert.bigbench_tasks(sdist, tmp_path / "data")
    assert not (tmp_path / "data" / "FORMAT").exists()
