"""`loramigrate finetune` on a tiny model and a learnable task: learning, early stop, resume, regularisation."""

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from loramigrate.adapters import read_adapter
from loramigrate.cli.main import app
from loramigrate.config import FinetuneConfig
from loramigrate.errors import ArtifactError
from loramigrate.finetune import loop
from tests.helpers import WORDS, finetuned, make_lora

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
    out = finetuned(config(tiny_models["llama"], task), tmp_path / "ft")
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in history if "val_loss" in r]
    assert len(history) == 30 and len(evals) == 3
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and history[-1]["loss"] < history[0]["loss"]
    initial = json.loads((out / "manifest.json").read_text())["initial"]  # the init before training: the baseline
    assert initial["loss"] > evals[0]["val_loss"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "curve.png", "manifest.json"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob("ft.ckpt-*"))  # the checkpoint goes once the stage is complete


def test_target_stops_early_and_records_time_to_readiness(tiny_models, task, tmp_path):
    out = finetuned(config(tiny_models["llama"], task, steps=200, target="loss=5.0"), tmp_path / "ft")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["time_to_target"]["step"] == 10 and manifest["time_to_target"]["s"] > 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 10


def interrupt(monkeypatch, cfg, out, at_step):
    """Run ``cfg`` into ``out`` and stop it like a kill just after its checkpoint at ``at_step``."""
    real = loop._checkpoint

    def crash(path, *args):
        real(path, *args)
        if args[3] == at_step:  # step
            raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(loop, "_checkpoint", crash)
        with pytest.raises(KeyboardInterrupt):
            finetuned(cfg, out)
    assert not out.exists() and list(out.parent.glob(f"{out.name}.ckpt-*"))


def test_interrupted_run_resumes_to_the_same_adapter(tiny_models, task, tmp_path, monkeypatch):
    cfg = config(tiny_models["llama"], task)
    whole = finetuned(cfg, tmp_path / "whole")
    interrupt(monkeypatch, cfg, tmp_path / "resumed", at_step=20)
    resumed = finetuned(cfg, tmp_path / "resumed")
    assert torch.allclose(delta(whole), delta(resumed), atol=1e-6)


def test_resume_with_dropout_draws_the_same_masks(tiny_models, task, tmp_path, monkeypatch):
    init = make_lora(tiny_models["llama"], tmp_path / "init", targets=TARGETS, lora_dropout=0.3)
    cfg = config(tiny_models["llama"], task, init=str(init), steps=20)
    whole = finetuned(cfg, tmp_path / "whole")
    interrupt(monkeypatch, cfg, tmp_path / "resumed", at_step=10)
    assert torch.equal(delta(whole), delta(finetuned(cfg, tmp_path / "resumed")))


def test_a_checkpoint_of_other_data_is_discarded(tiny_models, task, tmp_path, monkeypatch, caplog):
    data = tmp_path / "train.jsonl"
    data.write_text(task.read_text())
    cfg = config(tiny_models["llama"], data, steps=20)
    interrupt(monkeypatch, cfg, tmp_path / "ft", at_step=10)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "completion": " people"}) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="loramigrate"):
        resumed = finetuned(cfg, tmp_path / "ft")
    assert sum("discarding checkpoint" in r.getMessage() for r in caplog.records) == 1
    assert torch.equal(delta(resumed), delta(finetuned(cfg, tmp_path / "fresh")))
    assert not list(tmp_path.glob("*.ckpt-*"))


def test_a_checkpoint_holding_code_is_refused(tiny_models, task, tmp_path, monkeypatch):
    cfg = config(tiny_models["llama"], task, steps=20)
    interrupt(monkeypatch, cfg, tmp_path / "ft", at_step=10)
    (ckpt,) = tmp_path.glob("ft.ckpt-*/checkpoint.pt")
    marker = tmp_path / "code-ran"
    torch.save({"step": 10, "payload": Planted(str(marker))}, ckpt)
    with pytest.raises(ArtifactError, match="refusing checkpoint"):
        finetuned(cfg, tmp_path / "ft")
    assert not marker.exists() and not (tmp_path / "ft").exists()


class Planted:
    """Unpickling this creates a directory: what a planted checkpoint could do instead."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_failure_before_the_first_checkpoint_leaves_nothing(tiny_models, task, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("broken batch")
    monkeypatch.setattr(loop, "batch_rows", broken)
    with pytest.raises(RuntimeError, match="broken batch"):
        finetuned(config(tiny_models["llama"], task), tmp_path / "ft")
    assert list(tmp_path.iterdir()) == []


def test_a_rerun_removes_what_killed_runs_left(tiny_models, task, tmp_path):
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    for name in (f"ft.tmp-{gone}", f"ft.old-{gone}", f"ft.tmp-{os.getppid()}"):  # the last: a live process's
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_text("half written")
    finetuned(config(tiny_models["llama"], task, steps=2, eval_every=2), tmp_path / "ft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft", f"ft.tmp-{os.getppid()}"]


HOLD = """import sys, time
from pathlib import Path
from loramigrate.artifacts import output_lock
with output_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_of_one_output_is_refused(tiny_models, task, tmp_path):
    out = tmp_path / "ft"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = runner.invoke(app, ["finetune", "--base", str(tiny_models["llama"]), "--data", str(task),
                                     "-o", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1, result.output
    assert f"another loramigrate process is writing {out} (pid {holder.pid})" in " ".join(result.stderr.split())
    assert not out.exists() and not list(tmp_path.glob("ft.*-*"))


def test_strong_regularisation_keeps_the_adapter_near_its_init(tiny_models, task, tmp_path):
    init = make_lora(tiny_models["llama"], tmp_path / "init", targets=TARGETS)
    free = finetuned(config(tiny_models["llama"], task, init=str(init), steps=20), tmp_path / "free")
    held = finetuned(config(tiny_models["llama"], task, init=str(init), steps=20, reg_lambda=1e3,
                               reg_final=1e3, reg_schedule="constant"), tmp_path / "held")
    start = delta(init)
    assert (delta(held) - start).norm() < 0.2 * (delta(free) - start).norm()


@pytest.mark.parametrize("rebalance", ["scalar", "full"])
def test_refLoRA_rebalancing_trains_with_balanced_factors(tiny_models, task, tmp_path, rebalance):
    out = finetuned(config(tiny_models["llama"], task, steps=10, rebalance=rebalance), tmp_path / "ft")
    for m in read_adapter(out).modules.values():
        assert torch.allclose(m.a.norm(), m.b.norm(), rtol=1e-3)


def test_bad_input(tiny_models, task, tmp_path):
    from tests.helpers import make_tiny

    other_adapter = make_lora(make_tiny("llama", tmp_path / "wide", hidden=48), tmp_path / "other", targets=TARGETS)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nan_init = make_lora(tiny_models["llama"], tmp_path / "nan", targets=TARGETS)
    weights = load_file(nan_init / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, nan_init / "adapter_model.safetensors")
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i:i + 12]), "completion": " water"}) + "\n"
                                    for i in range(10)))
    cases = [(["--data", str(empty)], "holds no examples"),
             (["--data", str(task), "--init", str(tmp_path)], "not a PEFT adapter directory"),
             (["--data", str(task), "--target", "accuracy"], "target"),
             (["--data", str(long_prompts), "--max-len", "8"], "cuts every completion"),
             (["--data", str(task), "--init", str(other_adapter)], "does not fit the base"),
             (["--data", str(task), "--init", str(nan_init)], "holds NaN or inf values"),
             (["--data", str(task), "--targets", "bogus_proj"], "bogus_proj")]
    for args, match in cases:
        result = runner.invoke(app, ["finetune", "--base", str(tiny_models["llama"]), "-o", str(tmp_path / "o"), *args])
        assert result.exit_code == 1 and match in result.stderr, (args, result.output)
        assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.ckpt-*"))


def peft_tiny(model_dir, r=4, dtype=torch.float32):
    import transformers
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folding_restarts_restores_the_base_and_keeps_the_best_rank_r_delta(tiny_models, dtype):
    """Bit for bit, in bfloat16 too, where base + Δ − Δ is not the base."""
    model = peft_tiny(tiny_models["llama"], r=3, dtype=dtype)
    factors = loop.lora_factors(model, "init")
    originals = {n: f.base.detach().clone() for n, f in factors.items()}
    opt = torch.optim.AdamW([p for f in factors.values() for p in (f.a, f.b)])
    totals = {n: torch.zeros(f.base.shape) for n, f in factors.items()}
    for k in range(3):  # three rounds: perturb B, record the delta, restart
        with torch.no_grad():
            for n, f in factors.items():
                f.b.copy_(torch.randn(f.b.shape, generator=torch.Generator().manual_seed(k)))
                totals[n] += f.scale * f.b @ f.a
        if k < 2:
            loop.restart(factors, opt, prune=0.0, seed=k)
    loop.fold_restarts(factors, rank=3)
    for n, f in factors.items():
        assert torch.equal(f.base, originals[n]) and f.a.dtype == f.b.dtype == torch.float32
        u, s, vh = torch.linalg.svd(totals[n].double())
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert torch.allclose((f.scale * f.b @ f.a).double(), best, atol=1e-4)


def test_finetune_with_restarts_learns_and_saves_rank_r(tiny_models, task, tmp_path):
    out = finetuned(config(tiny_models["llama"], task, restart_every=10, lr_schedule="constant", restart_warmup=3),
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


def test_grad_checkpointing_gives_the_same_loss_and_gradients(tiny_models, task):
    from loramigrate.evaluate import read_task
    from loramigrate.finetune.objective import completion_loss
    from loramigrate.finetune.runner import checkpoint_activations
    from loramigrate.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(str(tiny_models["llama"])))
    rows = read_task(task).rows[:8]
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)  # the same random LoRA init
        model = peft_tiny(tiny_models["llama"]).train()
        if checkpointed:
            checkpoint_activations(model.get_base_model())
        loss = completion_loss(tok, None, 32)(model, rows)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert model.get_base_model().model.layers[0].gradient_checkpointing  # it was on in the second run
    (loss0, grads0), (loss1, grads1) = results
    assert torch.equal(loss0, loss1) and grads0.keys() == grads1.keys() and len(grads0) > 0
    assert all(torch.allclose(grads0[n], grads1[n], atol=1e-6) for n in grads0)


def test_finetune_with_grad_checkpointing_from_the_cli(tiny_models, task, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("loramigrate.finetune.runner.checkpoint_activations", seen.append)
    result = runner.invoke(app, ["finetune", "--base", str(tiny_models["llama"]), "--data", str(task), "--rank", "2",
                                 "--steps", "1", "--eval-limit", "2", "--grad-checkpointing", "-o", str(tmp_path / "ft")])
    assert result.exit_code == 0, result.output
    assert len(seen) == 1 and json.loads((tmp_path / "ft" / "manifest.json").read_text())["config"]["grad_checkpointing"]
