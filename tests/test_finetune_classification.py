"""`loramigrate finetune` on text/label data: a classifier head trained and saved with the adapter."""

import json
import math
import random
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from loramigrate.adapters import read_adapter
from loramigrate.cli.main import app
from loramigrate.config import FinetuneConfig
from loramigrate.finetune import objective
from tests.helpers import CUES, cue_rows, finetuned

runner = CliRunner()
LABELS = CUES


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    """The label is whichever cue word the text holds: learnable by a tiny random encoder."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("cls")

    def write(name, n):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in cue_rows(rng, n)))
        return root / name
    return write("train.jsonl", 96), write("val.jsonl", 24)


def config(model, data, **kw):
    train, val = data
    base = dict(base=str(model), data=str(train), val=str(val), rank=4, alpha=8, steps=30, batch_size=8, lr=1e-2,
                eval_every=10)
    return FinetuneConfig(**{**base, **kw})


def logits(model_dir, adapter_dir, texts, seed):
    """Stock transformers + PEFT, no loramigrate code; ``seed`` changes any random initialisation."""
    from peft import PeftModel

    torch.manual_seed(seed)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(LABELS))
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        return model(**tok(texts, return_tensors="pt", padding=True)).logits


def test_classifier_learns_and_the_adapter_alone_reproduces_it(tiny_models, sentiment, tmp_path):
    out = finetuned(config(tiny_models["bert"], sentiment, steps=60, rank=8, alpha=16), tmp_path / "ft")
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "val_loss" in line]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["val_accuracy"] > 0.5  # chance: 1/3
    saved = json.loads((out / "adapter_config.json").read_text())
    # the tiny encoder has no pooler weights: its random pooler is trained and saved with the head
    assert saved["task_type"] == "SEQ_CLS" and {"bert.pooler.dense", "classifier"} <= set(saved["modules_to_save"])
    assert {"query", "key", "value"} <= {t.rsplit(".", 1)[-1] for t in saved["target_modules"]}
    texts = ["water one two", "people three four"]
    assert torch.allclose(logits(tiny_models["bert"], out, texts, 0), logits(tiny_models["bert"], out, texts, 1))
    again = finetuned(config(tiny_models["bert"], sentiment, steps=2, init=str(out)), tmp_path / "again")
    names = json.loads((again / "adapter_config.json").read_text())["modules_to_save"]
    assert len(names) == len(set(names))  # a chain of finetunes does not grow the list


def test_gradient_accumulation_equals_the_larger_batch(tiny_models, sentiment, tmp_path):
    """Equal-size micro-batches of a per-example mean loss: accumulation is the same step (without dropout,
    whose random masks would differ)."""
    model = tmp_path / "bert"
    shutil.copytree(tiny_models["bert"], model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    whole = finetuned(config(model, sentiment, steps=6, batch_size=8), tmp_path / "whole")
    split = finetuned(config(model, sentiment, steps=6, batch_size=4, grad_accum=2), tmp_path / "split")
    for name, m in read_adapter(whole).modules.items():
        other = read_adapter(split).modules[name]
        assert torch.allclose(m.b @ m.a, other.b @ other.a, atol=1e-5), name


def test_epochs_set_the_step_budget(tiny_models, sentiment, tmp_path):
    out = finetuned(config(tiny_models["bert"], sentiment, epochs=1.0, batch_size=8, eval_every=100), tmp_path / "ft")
    assert len((out / "log.jsonl").read_text().splitlines()) == 96 // 8


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tiny_models, sentiment, tmp_path, monkeypatch):
    real = objective.OBJECTIVES["classification"]

    def poisoned(*args):
        loss, calls = real(*args), []

        def batch_loss(model, rows):
            calls.append(1)
            value = loss(model, rows)
            return value * float("nan") if len(calls) > 12 else value
        return batch_loss
    monkeypatch.setitem(objective.OBJECTIVES, "classification", poisoned)
    train, val = sentiment
    result = runner.invoke(app, ["finetune", "--base", str(tiny_models["bert"]), "--data", str(train), "--val", str(val),
                                 "--steps", "30", "--eval-every", "10", "--batch-size", "8", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "diverged" in result.stderr and "step 13" in result.stderr, result.output
    assert not (tmp_path / "o").exists()
    (ckpt,) = tmp_path.glob("o.ckpt-*/checkpoint.pt")
    assert torch.load(ckpt, weights_only=True)["step"] == 10


def test_validation_labels_unseen_in_training_are_refused(tiny_models, sentiment, tmp_path):
    train, _ = sentiment
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": "water", "label": label}) + "\n" for label in ("water", "rain")))
    result = runner.invoke(app, ["finetune", "--base", str(tiny_models["bert"]), "--data", str(train), "--val", str(val),
                                 "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "never seen in training: rain" in result.stderr
    assert not (tmp_path / "o").exists()


def test_loading_names_the_modules_the_checkpoint_lacks_and_leaves_the_model_as_transformers_made_it(tiny_models):
    """A fresh adapter saves them (modules_to_save); the list is returned, not hung on the model."""
    from loramigrate.models import load_with_new_modules, resolve_model

    model, new = load_with_new_modules(resolve_model(tiny_models["bert"]), num_labels=3)
    assert "classifier" in new
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3)
    assert set(vars(model)) == set(vars(plain))


def test_a_bf16_base_trains_and_saves_its_head_in_float32(tiny_models, sentiment, tmp_path):
    """AdamW on bf16 weights rounds small updates away: the head trains in fp32 over the bf16 base."""
    out = finetuned(config(tiny_models["bert"], sentiment, steps=4, eval_every=4,
                           load={"dtype": "bfloat16", "device": "cpu"}), tmp_path / "ft")
    saved = load_file(out / "adapter_model.safetensors")
    assert any("classifier" in k for k in saved) and {v.dtype for v in saved.values()} == {torch.float32}
    assert math.isfinite(json.loads((out / "manifest.json").read_text())["final"]["val_loss"])
