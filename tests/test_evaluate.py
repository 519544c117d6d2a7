"""`loramigrate eval`: metrics, the comparison table, negative flips and bad data."""

import json
import math
import random

import pytest
import torch
import transformers
from peft import LoraConfig, TaskType, get_peft_model
from typer.testing import CliRunner

from loramigrate.cli.main import app
from loramigrate.config import ModelLoadConfig
from loramigrate.errors import ArtifactError
from loramigrate.evaluate import evaluate_pairs, negative_flips, read_task
from tests.helpers import WORDS, make_lora

runner = CliRunner()


@pytest.fixture(scope="module")
def gen_data(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "gen.jsonl"
    rows = [{"prompt": " ".join(rng.choices(WORDS, k=5)), "completion": " " + rng.choice(WORDS)} for _ in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_against_itself(model, adapter, data, *options: str):
    """`loramigrate eval` of ``adapter`` on ``model`` with that same pair as the reference."""
    return runner.invoke(app, ["-q", "eval", "--base", str(model), "--adapter", str(adapter), "--data", str(data),
                               "--reference-base", str(model), "--reference-adapter", str(adapter), *options])


def test_generation_table_json_and_flips(tiny_models, tmp_path, gen_data):
    model = tiny_models["llama"]
    adapter = make_lora(model, tmp_path / "lora", targets=["q_proj", "v_proj"])
    out = tmp_path / "eval.json"
    result = eval_against_itself(model, adapter, gen_data, "--json", str(out), "--batch-size", "5")
    assert result.exit_code == 0, result.output
    assert "exact_match" in result.stdout and "negative flips" in result.stdout
    payload = json.loads(out.read_text())
    base_row, adapted = payload["results"]
    assert base_row["n"] == adapted["n"] == 12
    assert adapted["negative_flips"] == 0  # same pair as the reference
    assert adapted["loss"] == pytest.approx(payload["reference"]["loss"], rel=1e-5)
    assert base_row["loss"] != pytest.approx(adapted["loss"], rel=1e-3)


def constant_classifier(model_dir, out, label: int, margin: float = 5.0):
    """A SEQ_CLS adapter whose head ignores its input: zero weight, bias ``margin`` on ``label``."""
    base = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    peft_model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name and "classifier" in name:
                p.copy_(torch.zeros_like(p) if name.endswith("weight") else margin * torch.eye(2)[label])
    peft_model.save_pretrained(out)
    return out


def test_classification_accuracy_loss_and_flips_are_exact_for_constant_heads(tiny_models, tmp_path):
    model_dir = tiny_models["bert"]
    always_pos, always_neg = (constant_classifier(model_dir, tmp_path / name, label)
                              for name, label in (("pos", 1), ("neg", 0)))  # labels index in sorted order
    data = tmp_path / "cls.jsonl"
    rows = [{"text": w, "label": "neg" if i < 3 else "pos"} for i, w in enumerate(WORDS[:10])]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["-q", "eval", "--base", str(model_dir), "--adapter", str(always_pos), "--adapter",
                                 str(always_neg), "--data", str(data), "--reference-base", str(model_dir),
                                 "--reference-adapter", str(always_pos), "--json", str(out)])
    assert result.exit_code == 0, result.output
    base_row, pos, neg = json.loads(out.read_text())["results"]
    assert base_row["n"] == pos["n"] == neg["n"] == 10
    assert (pos["accuracy"], neg["accuracy"]) == (0.7, 0.3)
    assert (pos["negative_flips"], neg["negative_flips"]) == (0, 7)  # the 7 positives the reference gets right
    right = math.log1p(math.exp(-5.0))  # cross-entropy with logits (0, 5) on the right class
    assert pos["loss"] == pytest.approx(right + 0.3 * 5.0, rel=1e-5)
    assert neg["loss"] == pytest.approx(right + 0.7 * 5.0, rel=1e-5)


def test_negative_flips_counts_only_lost_examples():
    assert negative_flips([True, True, False, False], [True, False, True, False]) == 1


@pytest.mark.parametrize(("content", "match"), [
    ("", "holds no examples"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', "gen.jsonl:2"),
    ('{"prompt": "a", "completion": "b"}\nnot json\n', "not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"text": "a", "label": 1}\n', "mixes"),
])
def test_bad_data_lines_are_named(tmp_path, content, match):
    path = tmp_path / "gen.jsonl"
    path.write_text(content)
    with pytest.raises(ArtifactError, match=match):
        read_task(path)


def test_eval_cli_bad_input(tiny_models, tmp_path, gen_data):
    result = runner.invoke(app, ["eval", "--base", str(tiny_models["llama"]), "--adapter", str(tmp_path / "none"),
                                 "--data", str(gen_data)])
    assert result.exit_code == 1 and "not a PEFT adapter directory" in result.stderr and result.stdout == ""


def test_answer_matches_at_a_word_boundary():
    from loramigrate.evaluate import answer_matches

    assert answer_matches(" 927 What is 12 plus 3?", "927")
    assert answer_matches("927\n", " 927")
    assert not answer_matches(" 9271", "927") and not answer_matches("The answer is 927", "927")


def test_adapters_evaluated_together_do_not_inherit_each_others_heads(tiny_models, tmp_path):
    """PEFT's unload keeps a modules_to_save copy; the next adapter must see the original module."""
    model_dir = tiny_models["bert"]
    for seed, saved in ((0, ["bert.pooler.dense"]), (1, None)):  # the first also saves the pooler
        torch.manual_seed(seed)
        base = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
        peft_model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query"],
                                                     modules_to_save=saved))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(torch.randn_like(p))
        peft_model.save_pretrained(tmp_path / f"cls{seed}")
    data = tmp_path / "cls.jsonl"
    rows = [{"text": w, "label": ["neg", "pos"][i % 2]} for i, w in enumerate(WORDS[:16])]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = read_task(data)
    load = ModelLoadConfig()
    torch.manual_seed(1)  # the global RNG state must not matter: modules the checkpoint lacks are seeded
    together = evaluate_pairs(str(model_dir), [str(tmp_path / "cls0"), str(tmp_path / "cls1")], task, 8, load)
    torch.manual_seed(2)
    alone = evaluate_pairs(str(model_dir), [str(tmp_path / "cls1")], task, 8, load)
    assert together[0].loss == pytest.approx(alone[0].loss, rel=1e-6)  # the base alone, random head and all
    assert together[2].loss == pytest.approx(alone[1].loss, rel=1e-6)
    assert together[1].loss != pytest.approx(together[2].loss, rel=1e-4)


def test_eval_writes_a_stage_directory_kept_while_up_to_date(tiny_models, tmp_path, gen_data):
    from loramigrate.artifacts import SCHEMAS
    from loramigrate.config import EvalConfig
    from loramigrate.eval import Comparison, Pair, run_eval

    model = tiny_models["llama"]
    adapter = make_lora(model, tmp_path / "lora", targets=["q_proj", "v_proj"])
    out = tmp_path / "eval"
    result = eval_against_itself(model, adapter, gen_data, "--batch-size", "6", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"  # the table goes to stderr, as a stage command prints only its directory
    manifest = json.loads((out / "manifest.json").read_text())
    pair = f"{model.name} + lora"
    assert manifest["stage"] == "eval" and manifest["schema"] == SCHEMAS["eval"] and manifest["config"]["batch_size"] == 6
    assert manifest["config"]["arms"] == {"base": f"{model.name} (no adapter)", "adapters": [pair], "reference": pair,
                                          "proxy": None}
    assert set(manifest["inputs"]) == {"data", "base", "adapters.0", "reference_base", "reference_adapter"}
    results = json.loads((out / "results.json").read_text())
    assert results["reference"]["arm"] == pair and "gap_recovered" not in results["reference"]  # no gain to recover
    assert [r["arm"] for r in results["results"]] == [f"{model.name} (no adapter)", pair]
    assert results["results"][1]["negative_flips"] == 0 and results["results"][1]["n"] == 12
    same = Comparison(str(gen_data), Pair(f"{model.name} (no adapter)", str(model)), (Pair(pair, str(model), str(adapter)),),
                      reference=Pair(pair, str(model), str(adapter)))
    assert run_eval(EvalConfig(batch_size=6), same, out) is False  # the same comparison of the same files: kept
    assert run_eval(EvalConfig(batch_size=6, limit=5), same, out) is True
    assert json.loads((out / "results.json").read_text())["results"][0]["n"] == 5
