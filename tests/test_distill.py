"""Distillation in finetune (teacher old|proxy), the proxy teacher and the proxy-ensemble eval arm, on tiny
models.

Run: python -m pytest tests/test_distill.py -q
"""

import json
import logging
import random
import shutil
from types import SimpleNamespace

import pytest
import torch
import transformers
from peft import PeftModel
from typer.testing import CliRunner

from loramigrate.cli.main import app
from loramigrate.config import FinetuneConfig, ModelLoadConfig
from loramigrate.errors import ArtifactError
from loramigrate.evaluate import EvalResult, generate_ids, read_task, with_gap
from loramigrate.finetune.objective import distill_kl
from loramigrate.finetune.teacher import TEACHERS
from loramigrate.models import load_pair
from tests.helpers import WORDS, build, cue_rows, finetuned, make_lora, make_tiny, make_tokenizer, save, tiny_config

runner = CliRunner()
TARGETS = ["q_proj", "v_proj", "down_proj"]
CPU = ModelLoadConfig(device="cpu")


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def history(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def gen(tiny_models, tmp_path_factory):
    """An old pair (tiny Llama + random LoRA), a new base with the same tokenizer, and prompts with and without
    completions."""
    root = tmp_path_factory.mktemp("distill")
    old = tiny_models["llama"]
    rng = random.Random(0)
    prompts = [" ".join(rng.choices(WORDS, k=4)) for _ in range(24)]
    return SimpleNamespace(
        root=root, old=old, adapter=make_lora(old, root / "adapter", targets=TARGETS),
        new=make_tiny("llama", root / "new", seed=1),
        data=write(root / "gen.jsonl", [{"prompt": p, "completion": " water"} for p in prompts]),
        prompts=write(root / "prompts.jsonl", [{"prompt": p} for p in prompts]))


def dropout_free_bert(path, seed):
    """Without dropout the student (in train mode) and the teacher (in eval mode) compute the same function."""
    config = tiny_config("bert")
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    return save(build(config, seed), make_tokenizer(WORDS), path)


@pytest.fixture(scope="module")
def cls(tmp_path_factory):
    """Old and new tiny encoders, labelled and text-only data (the label is the cue word in the text), and an
    old adapter (LoRA + classifier head) trained on the old encoder."""
    root = tmp_path_factory.mktemp("distill_cls")
    rng = random.Random(0)
    train, val = cue_rows(rng, 48), cue_rows(rng, 12)
    ns = SimpleNamespace(old=dropout_free_bert(root / "old", 0), new=dropout_free_bert(root / "new", 1),
                         train=write(root / "train.jsonl", train), val=write(root / "val.jsonl", val),
                         texts=write(root / "texts.jsonl", [{"text": r["text"]} for r in train]))
    ns.adapter = finetuned(FinetuneConfig(base=str(ns.old), data=str(ns.train), val=str(ns.val), rank=4, alpha=8,
                                             steps=30, batch_size=8, lr=1e-2, eval_every=30), root / "adapter")
    return ns


def gen_config(base, data, **kw):
    common = dict(base=str(base), data=str(data), targets=TARGETS, rank=4, alpha=8, steps=12, batch_size=64, lr=3e-2,
                  eval_every=6, eval_limit=6, teacher_new_tokens=4)
    return FinetuneConfig(**{**common, **kw})


def cls_config(c, **kw):
    common = dict(base=str(c.new), data=str(c.train), val=str(c.val), rank=4, alpha=8, steps=12, batch_size=64,
                  lr=3e-3, eval_every=6, teacher="old", teacher_base=str(c.old), teacher_adapter=str(c.adapter))
    return FinetuneConfig(**{**common, **kw})


@pytest.mark.parametrize("teacher", ["old", "proxy"])
def test_a_teacher_equal_to_the_student_gives_zero_loss_at_step_0(gen, tmp_path, teacher):
    """Identity pair: old base == new base and teacher adapter == init, so the proxy is the old pair too."""
    same = dict(init=str(gen.adapter), teacher=teacher, teacher_base=str(gen.old), teacher_adapter=str(gen.adapter))
    out = finetuned(gen_config(gen.old, gen.data, steps=1, **same), tmp_path / "same")
    assert history(out)[0]["loss"] <= 1e-6
    fresh = finetuned(gen_config(gen.old, gen.data, steps=1, **{**same, "init": "fresh"}), tmp_path / "fresh")
    assert history(fresh)[0]["loss"] > 1e-3  # the same measurement sees a student without the adapter


def test_a_classifier_teacher_equal_to_the_student_gives_zero_loss_at_step_0(cls, tmp_path):
    out = finetuned(cls_config(cls, base=str(cls.old), init=str(cls.adapter), steps=1), tmp_path / "same")
    assert history(out)[0]["loss"] <= 1e-6


@pytest.mark.parametrize(("teacher", "student"), [("old", "new"), ("proxy", "old")])
def test_distilling_from_a_fixed_teacher_lowers_the_kl(gen, tmp_path, teacher, student):
    """The proxy's offset is learnt where the student can reach it: on the old base itself. (On another random
    base, a fresh student starts near the proxy and a LoRA barely moves toward the offset.)"""
    cfg = gen_config(getattr(gen, student), gen.data, teacher=teacher, teacher_base=str(gen.old),
                     teacher_adapter=str(gen.adapter))
    falls(history(finetuned(cfg, tmp_path / "ft")))


def falls(log, by=0.75):
    """Every step sees the whole training set, so the loss is its KL: it falls at every step, and by ``by``;
    the validation KL falls too. (A LoRA on another random base cannot reach the teacher: it falls slowly.)"""
    losses = [r["loss"] for r in log]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < by * losses[0], losses
    evals = [r["val_kl"] for r in log if "val_kl" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]


def test_distilling_a_classifier_lowers_the_kl_and_mixes_in_the_labels(cls, tmp_path):
    kl_only = history(finetuned(cls_config(cls), tmp_path / "kl"))
    falls(kl_only)
    mixed = history(finetuned(cls_config(cls, distill_weight=0.5, steps=1), tmp_path / "mixed"))
    labels = history(finetuned(cls_config(cls, teacher="none", steps=1), tmp_path / "labels"))
    # same student, same batch at step 0: the mix is halfway between the KL and the label loss
    assert mixed[0]["loss"] == pytest.approx(0.5 * kl_only[0]["loss"] + 0.5 * labels[0]["loss"], rel=1e-4)


def test_prompts_only_data_trains_on_the_teachers_greedy_completions(gen, tmp_path, caplog):
    with pytest.raises(ArtifactError, match="need a teacher"):
        read_task(gen.prompts)
    cfg = gen_config(gen.new, gen.prompts, teacher="old", teacher_base=str(gen.old), teacher_adapter=str(gen.adapter))
    with caplog.at_level(logging.INFO, logger="loramigrate"):
        log = history(finetuned(cfg, tmp_path / "ft"))
    assert "the teacher supplied 22 training targets" in caplog.text
    falls(log)


def test_text_only_classification_data_takes_the_teachers_labels(cls, tmp_path):
    falls(history(finetuned(cls_config(cls, data=str(cls.texts)), tmp_path / "ft")))


def test_the_proxy_teacher_on_an_identity_pair_is_the_old_pair(gen, tmp_path):
    """new base == old base: logits_new + logits_{old+A} − logits_old = logits_{old+A}, whatever the student's
    own adapter (switched off to read the new base)."""
    pair = load_pair(str(gen.old), str(gen.adapter), CPU)
    other = make_lora(gen.old, tmp_path / "other", targets=TARGETS, seed=1)
    student = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(gen.old), other).eval()
    tok = transformers.AutoTokenizer.from_pretrained(gen.old)
    inputs = dict(tok(["water one two", "people of the time"], return_tensors="pt", padding=True))
    with torch.no_grad():
        expected, own = pair(**inputs).logits, student(**inputs).logits
        got = TEACHERS["proxy"](pair).logits(student, inputs)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(own, expected, atol=1e-3)
    on_new = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(gen.new), other).eval()
    with torch.no_grad(), on_new.disable_adapter():
        new = on_new(**inputs).logits
    with torch.no_grad(), pair.disable_adapter():
        offset = expected - pair(**inputs).logits
    with torch.no_grad():  # on another base: that base steered by the old adapter's offset
        assert torch.allclose(TEACHERS["proxy"](pair).logits(on_new, inputs), new + offset, atol=1e-5)


def test_the_proxy_eval_arm_on_an_identity_pair_matches_the_old_pair(gen, tmp_path):
    """Completions are the old pair's own greedy answers, so its exact match is 1; the ensemble decodes the
    same answers with its own greedy loop."""
    pair = load_pair(str(gen.old), str(gen.adapter), CPU)
    tok = transformers.AutoTokenizer.from_pretrained(gen.old)
    prompts = [json.loads(line)["prompt"] for line in gen.prompts.read_text().splitlines()][:10]
    answers = tok.batch_decode(generate_ids(pair, tok, [tok(p)["input_ids"] for p in prompts], 2),
                               skip_special_tokens=True)
    data = write(tmp_path / "answers.jsonl", [{"prompt": p, "completion": a} for p, a in zip(prompts, answers, strict=True)])
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["-q", "eval", "--base", str(gen.old), "--data", str(data), "--batch-size", "4",
                                 "--reference-base", str(gen.old), "--reference-adapter", str(gen.adapter),
                                 "--proxy-old-base", str(gen.old), "--proxy-old-adapter", str(gen.adapter),
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    reference, (alone, proxy) = payload["reference"], payload["results"]
    assert proxy["name"] == "proxy ensemble" and reference["exact_match"] == proxy["exact_match"] == 1.0
    assert proxy["loss"] == pytest.approx(reference["loss"], rel=1e-4) and proxy["negative_flips"] == 0
    assert alone["exact_match"] < 1.0 and proxy["gap_recovered"] == pytest.approx(1.0)
    assert alone["gap_recovered"] == 0.0 and "gap recovered" in result.stdout


def test_a_changed_teacher_redoes_the_stage(gen, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(gen.adapter, teacher)
    cfg = gen_config(gen.new, gen.data, steps=1, teacher="old", teacher_base=str(gen.old), teacher_adapter=str(teacher))
    out = finetuned(cfg, tmp_path / "ft")
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"teacher_base", "teacher_adapter"} <= set(manifest["inputs"])
    finetuned(cfg, out)
    assert json.loads((out / "manifest.json").read_text()) == manifest  # up to date: kept
    shutil.rmtree(teacher)
    make_lora(gen.old, teacher, targets=TARGETS, seed=5)
    finetuned(cfg, out)
    assert json.loads((out / "manifest.json").read_text())["inputs"] != manifest["inputs"]


def test_the_kl_is_teacher_to_student_with_softened_targets_scaled_by_t_squared():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    p_t, log_s = torch.softmax(teacher / 2, -1), torch.log_softmax(student / 2, -1)
    expected = 4 * (p_t * (p_t.log() - log_s)).sum(-1).mean()
    assert float(distill_kl(student, teacher, 2.0)) == pytest.approx(float(expected), rel=1e-5)


def test_gap_recovered_is_the_share_of_the_old_adapters_gain():
    def result(score):
        return EvalResult("r", 4, 0.0, "accuracy", score, [])
    old, alone = result(0.8), result(0.2)
    assert [r.gap_recovered for r in with_gap([result(0.5), old, alone, result(0.9)], old, alone)
            ] == pytest.approx([0.5, 1.0, 0.0, 7 / 6])
    assert with_gap([result(0.5)], alone, alone)[0].gap_recovered is None


def test_a_recipe_teacher_is_the_old_base_with_the_adapter_being_migrated(tmp_path):
    from loramigrate.recipes import load_recipe

    path = write(tmp_path / "r.jsonl", [])
    path.write_text("name: x\nold: a\nnew: b\nadapters: [c]\ndata: {train: t, val: v, test: s}\n"
                    "finetune: {teacher: proxy}\n")
    cfg = load_recipe(path).finetune_config("INIT", "SOURCE")
    assert (cfg.teacher, cfg.teacher_base, cfg.teacher_adapter, cfg.base) == ("proxy", "a", "SOURCE", "b")
    plain = load_recipe(path, ["finetune.teacher=none"]).finetune_config("INIT", "SOURCE")
    assert plain.teacher_base is None and plain.teacher_adapter is None


def fails(tmp_path, args, match):
    before = set(tmp_path.rglob("*"))
    result = runner.invoke(app, ["-q", "finetune", *map(str, args), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], result.stderr
    assert result.stdout == "" and set(tmp_path.rglob("*")) == before  # no output, no checkpoint, no temp dir


def test_bad_teacher_input_is_one_line_and_writes_nothing(gen, cls, tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("bad_teacher")
    other_words = make_tiny("llama", root / "zz", seed=2)
    save(build(tiny_config("llama")), make_tokenizer([f"zz{w}" for w in WORDS]), other_words)
    wide_adapter = make_lora(make_tiny("llama", root / "wide", hidden=48), root / "wide_adapter", targets=TARGETS)
    gen_args = ["--base", gen.new, "--data", gen.data, "--targets", ",".join(TARGETS)]
    cases = [
        ([*gen_args, "--teacher", "old", "--teacher-base", other_words, "--teacher-adapter", gen.adapter],
         "tokenizers"),
        (["--base", cls.new, "--data", cls.train, "--teacher", "proxy", "--teacher-base", cls.old,
          "--teacher-adapter", cls.adapter], "generation tasks only"),
        ([*gen_args, "--teacher", "old", "--teacher-base", gen.old], "needs teacher_base and teacher_adapter"),
        ([*gen_args, "--teacher", "old", "--teacher-base", gen.old, "--teacher-adapter", wide_adapter],
         "does not load on"),
        ([*gen_args, "--teacher", "old", "--teacher-base", root / "nope", "--teacher-adapter", gen.adapter],
         "not found"),
        ([*gen_args, "--teacher", "old", "--teacher-base", gen.old, "--teacher-adapter", root],
         "not a PEFT adapter directory"),
        (["--base", gen.new, "--data", gen.prompts], "need a teacher"),
    ]
    for args, match in cases:
        fails(tmp_path, args, match)
    result = runner.invoke(app, ["eval", "--base", str(cls.new), "--data", str(cls.val), "--proxy-old-base", str(cls.old),
                                 "--proxy-old-adapter", str(cls.adapter)])
    assert result.exit_code == 1 and "generation tasks only" in result.stderr and result.stdout == ""
