"""`loramigrate finetune` on a tiny model and a learnable task: learning, early stop, resume, regularisation."""

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from loramigrate.adapters import read_adapter
from loramigrate.cli.main import app
from loramigrate.config import FinetuneConfig
from loramigrate.finetune import loop
from loramigrate.finetune.runner import run_finetune
from tests.helpers import WORDS, make_lora

runner = CliRunner()
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Answer every prompt with the same word: learnable by a tiny random model in a few dozen steps."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("task") / "train.jsonl"
    rows = [{"prompt": " ".join(rng.choices(WORDS, k=4)), "completion": " water"} for _ in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(model, task, **kw):
    base = dict(base=str(model), data=str(task), targets=TARGETS, rank=4, alpha=8, steps=30, batch_size=8, lr=1e-2,
                eval_every=10, eval_limit=6)
    return FinetuneConfig(**{**base, **kw})


def delta(adapter_dir):
    a = read_adapter(adapter_dir)
    return torch.cat([(a.scale(n) * m.b @ m.a).flatten() for n, m in sorted(a.modules.items())])


def test_finetune_learns_and_writes_its_artifacts(tiny_models, task, tmp_path):
    out = run_finetune(config(tiny_models["llama"], task), tmp_path / "ft")
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in history if "val_loss" in r]
    assert len(history) == 30 and len(evals) == 3
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and history[-1]["loss"] < history[0]["loss"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "curve.png", "manifest.json"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob("ft.ckpt-*"))  # the checkpoint goes once the stage is complete


def test_target_stops_early_and_records_time_to_readiness(tiny_models, task, tmp_path):
    out = run_finetune(config(tiny_models["llama"], task, steps=200, target="loss=5.0"), tmp_path / "ft")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["time_to_target"]["step"] == 10 and manifest["time_to_target"]["s"] > 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 10


def test_interrupted_run_resumes_to_the_same_adapter(tiny_models, task, tmp_path, monkeypatch):
    cfg = config(tiny_models["llama"], task)
    whole = run_finetune(cfg, tmp_path / "whole")
    real = loop._checkpoint

    def crash_after_second(path, *args):
        real(path, *args)
        if args[3] == 20:  # step
            raise KeyboardInterrupt
    monkeypatch.setattr(loop, "_checkpoint", crash_after_second)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(cfg, tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists() and list(tmp_path.glob("resumed.ckpt-*"))
    monkeypatch.setattr(loop, "_checkpoint", real)
    resumed = run_finetune(cfg, tmp_path / "resumed")
    assert torch.allclose(delta(whole), delta(resumed), atol=1e-6)


def test_strong_regularisation_keeps_the_adapter_near_its_init(tiny_models, task, tmp_path):
    init = make_lora(tiny_models["llama"], tmp_path / "init", targets=TARGETS)
    free = run_finetune(config(tiny_models["llama"], task, init=str(init), steps=20), tmp_path / "free")
    held = run_finetune(config(tiny_models["llama"], task, init=str(init), steps=20, reg_lambda=1e3,
                               reg_final=1e3, reg_schedule="constant"), tmp_path / "held")
    start = delta(init)
    assert (delta(held) - start).norm() < 0.2 * (delta(free) - start).norm()


@pytest.mark.parametrize("rebalance", ["scalar", "full"])
def test_refLoRA_rebalancing_trains_with_balanced_factors(tiny_models, task, tmp_path, rebalance):
    out = run_finetune(config(tiny_models["llama"], task, steps=10, rebalance=rebalance), tmp_path / "ft")
    for m in read_adapter(out).modules.values():
        assert torch.allclose(m.a.norm(), m.b.norm(), rtol=1e-3)


def test_bad_input(tiny_models, task, tmp_path):
    from tests.helpers import make_tiny

    other_adapter = make_lora(make_tiny("llama", tmp_path / "wide", hidden=48), tmp_path / "other", targets=TARGETS)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i:i + 12]), "completion": " water"}) + "\n"
                                    for i in range(10)))
    cases = [(["--data", str(empty)], "holds no examples"),
             (["--data", str(task), "--init", str(tmp_path)], "not a PEFT adapter directory"),
             (["--data", str(task), "--target", "accuracy"], "target"),
             (["--data", str(long_prompts), "--max-len", "8"], "cuts every completion"),
             (["--data", str(task), "--init", str(other_adapter)], "does not fit the base")]
    for args, match in cases:
        result = runner.invoke(app, ["finetune", "--base", str(tiny_models["llama"]), "-o", str(tmp_path / "o"), *args])
        assert result.exit_code == 1 and match in result.stderr, (args, result.output)
        assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.ckpt-*"))


def peft_tiny(model_dir, r=4):
    import transformers
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False))
    return model.eval()


def test_a_relora_restart_leaves_the_model_function_unchanged(tiny_models):
    model = peft_tiny(tiny_models["llama"])
    factors = loop.lora_factors(model, "init")
    opt = torch.optim.AdamW([p for f in factors.values() for p in (f.a, f.b)])
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    loop.restart(factors, opt, prune=0.99, seed=0)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert all(float(f.b.abs().max()) == 0 and float(f.a.abs().max()) > 0 for f in factors.values())


def test_folding_restarts_restores_the_base_and_keeps_the_best_rank_r_delta(tiny_models):
    model = peft_tiny(tiny_models["llama"], r=3)
    factors = loop.lora_factors(model, "init")
    originals = {n: f.base.detach().clone() for n, f in factors.items()}
    opt = torch.optim.AdamW([p for f in factors.values() for p in (f.a, f.b)])
    totals = {n: torch.zeros_like(f.base) for n, f in factors.items()}
    for k in range(3):  # three rounds: perturb B, record the delta, restart
        with torch.no_grad():
            for n, f in factors.items():
                f.b.copy_(torch.randn(f.b.shape, generator=torch.Generator().manual_seed(k)))
                totals[n] += f.scale * f.b @ f.a
        if k < 2:
            loop.restart(factors, opt, prune=0.0, seed=k)
    loop.fold_restarts(factors, rank=3)
    for n, f in factors.items():
        assert torch.allclose(f.base, originals[n], atol=1e-5)
        u, s, vh = torch.linalg.svd(totals[n].double())
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert torch.allclose((f.scale * f.b @ f.a).double(), best, atol=1e-4)


def test_finetune_with_restarts_learns_and_saves_rank_r(tiny_models, task, tmp_path):
    out = run_finetune(config(tiny_models["llama"], task, restart_every=10, lr_schedule="constant", restart_warmup=3),
                       tmp_path / "ft")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert all(m.rank == 4 for m in read_adapter(out).modules.values())
    lr = {r["step"]: r["lr"] for r in log}  # re-warmed after the restart at step 10, never a zero step
    peak = lr[10]
    assert [lr[s] / peak for s in (11, 12, 13, 14)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_learning_rate_warms_up_then_follows_its_schedule(schedule):
    total, warmup = 50, 10
    factors = [loop.lr_factor(schedule, s, total, warmup) for s in range(total)]
    assert factors[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert factors[warmup] == pytest.approx(1.0)
    after = factors[warmup:]
    assert all(x >= y - 1e-12 for x, y in zip(after, after[1:], strict=False))  # never climbs again
    end = loop.lr_factor(schedule, total, total, warmup)
    assert end == pytest.approx(1.0 if schedule == "constant" else loop.LR_FLOOR)
    if schedule == "linear":  # halfway through the decay: halfway between 1 and the floor
        assert loop.lr_factor(schedule, warmup + (total - warmup) // 2, total, warmup) == pytest.approx(
            (1 + loop.LR_FLOOR) / 2)
