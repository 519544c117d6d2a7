"""`loramigrate search`: trial 0 is transfer as is, a known optimum is found, the space fits the pair, the
distillation objective needs no labels, studies resume and are shared by workers, and bad input is refused.

    python -m pytest tests/test_search.py -q
"""

import json
import signal
import subprocess
import sys
import threading

import optuna
import pytest
import torch
import transformers
from peft import PeftModel
from typer.testing import CliRunner

from loramigrate.cli.main import app
from loramigrate.config import SearchConfig
from loramigrate.errors import ArtifactError, ConfigError
from loramigrate.search import core as search_core
from loramigrate.search import run_search
from loramigrate.search.space import DRIFT_BETA_MAX, resolve_beta_max, search_space
from loramigrate.search.study import SPACE_ATTR, open_storage, open_study
from tests.conftest import shape_pair
from tests.helpers import (
    WORDS,
    build,
    lock_holder,
    make_lora,
    make_tokenizer,
    python_env,
    run_script,
    save,
    tiny_config,
)

runner = CliRunner()
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def cli(*args):
    result = runner.invoke(app, ["-q", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Identity upgrade of the tiny Llama; a random LoRA transferred through it; validation rows sampled
    from base + 0.5 × the LoRA, so that α = 0.5 is the blend that minimises the expected loss."""
    root = tmp_path_factory.mktemp("search")
    # large initial weights: logits spread enough that the adapter's scale matters sharply
    model = save(build(tiny_config("llama", init=0.3)), make_tokenizer(WORDS), root / "model")
    adapter = make_lora(model, root / "lora", targets=TARGETS, alpha=32)
    cli("align", "--old", model, "--new", model, "-o", root / "align")
    cli("transfer", "--align", root / "align", "--adapter", adapter, "-o", root / "transfer")
    teacher = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(model), str(adapter)).eval()
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(48):
        prompt = " ".join(WORDS[(7 * i + k) % len(WORDS)] for k in range(4))
        with torch.no_grad():
            logits = teacher(**tok(prompt, return_tensors="pt")).logits[0, -1]
        logits[: 2] = -float("inf")  # pad, unk
        for token in torch.multinomial(logits.softmax(-1), 24, replacement=True, generator=g).tolist():
            rows.append({"prompt": prompt, "completion": " " + tok.convert_ids_to_tokens(token)})
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": model, "adapter": adapter, "align": root / "align", "transfer": root / "transfer", "data": data,
            "rows": len(rows)}


def config(pair, **kw):
    base = dict(align=str(pair["align"]), transfer=str(pair["transfer"]), data=str(pair["data"]), limit=pair["rows"],
                batch_size=256, n_trials=6, evolution_rank=4)
    return SearchConfig(**{**base, **kw})


def val_loss(model_dir, adapter_dir, data):
    from loramigrate.evaluate import read_task
    from loramigrate.finetune.objective import completion_loss

    task = read_task(data)
    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dir))
    loss = completion_loss(transformers.AutoTokenizer.from_pretrained(model_dir), task, 128)
    with torch.no_grad():
        return float(loss(model.eval(), task.rows))


def test_trial_zero_is_transfer_as_is_and_the_output_is_the_best_blend(pair, tmp_path):
    out = tmp_path / "s"
    assert run_search(config(pair), out)
    assert not run_search(config(pair), out)  # kept: the same inputs and options
    summary = json.loads((out / "manifest.json").read_text())["search"]
    trials = (out / "trials.csv").read_text().splitlines()
    first = dict(zip(trials[0].split(","), trials[1].split(","), strict=True))
    assert all(float(v) == (1.0 if k.startswith("alpha") else 0.0) for k, v in first.items() if "." in k)
    assert float(first["value"]) == pytest.approx(summary["transfer_as_is"], rel=1e-4)
    assert summary["best_value"] <= float(first["value"])
    # the written adapter, loaded by stock PEFT, scores what the study recorded for its best trial
    assert val_loss(pair["model"], out, pair["data"]) == pytest.approx(summary["best_value"], rel=1e-4)
    for name in ("history.png", "study.db", "adapter_config.json"):
        assert (out / name).is_file(), name


def test_search_finds_a_known_optimal_blend(pair, tmp_path):
    out = tmp_path / "s"
    run_search(config(pair, space="global", n_trials=14, alpha_min=0.0, beta_max=0.0), out)
    best = json.loads((out / "manifest.json").read_text())["search"]["best_params"]
    assert best["alpha"] == pytest.approx(0.5, abs=0.15)


def test_an_interrupted_study_resumes_to_n_trials(pair, tmp_path, monkeypatch):
    real, calls = search_core.apply_blend, []

    def crash_on_fourth(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(search_core, "apply_blend", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        run_search(config(pair), tmp_path / "s")
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["study.db"]
    monkeypatch.setattr(search_core, "apply_blend", real)
    out = tmp_path / "s"
    assert run_search(config(pair), out)
    study = optuna.load_study(study_name="loramigrate-search", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6 and states[3] == optuna.trial.TrialState.FAIL
    assert json.loads((out / "manifest.json").read_text())["search"]["trials"] == 6


KILLED_AT_TRIAL = """
import os, signal, sys
from loramigrate.config import SearchConfig
from loramigrate.search import core, run_search

real, calls = core.apply_blend, []

def killed(*args):
    calls.append(1)
    if len(calls) == int(sys.argv[3]) + 1:  # kill -9 in the middle of that trial
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)

core.apply_blend = killed
run_search(SearchConfig.model_validate_json(sys.argv[1]), sys.argv[2])
"""


def finished_trials(out):
    study = optuna.load_study(study_name="loramigrate-search", storage=f"sqlite:///{out / 'study.db'}")
    return [(t.params, t.value) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


@pytest.fixture(scope="module")
def uninterrupted(pair, tmp_path_factory):
    cfg = config(pair, space="global", n_trials=12, limit=192)  # GP proposes from trial 10 on
    out = tmp_path_factory.mktemp("whole") / "s"
    run_search(cfg, out)
    return cfg, out


@pytest.mark.parametrize("killed_at", [0, 11], ids=["in-the-as-is-trial", "in-the-second-gp-trial"])
def test_a_search_killed_mid_trial_resumes_to_the_same_trials_and_best(uninterrupted, tmp_path, killed_at):
    """kill -9 leaves the trial running in the study and the lock file behind; the rerun retries that trial and
    continues as if never interrupted."""
    cfg, whole = uninterrupted
    proc = subprocess.run([sys.executable, "-c", KILLED_AT_TRIAL, cfg.model_dump_json(), str(tmp_path / "killed"),
                           str(killed_at)], env=python_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (tmp_path / "killed.lock").is_file()
    resumed = tmp_path / "killed"
    assert run_search(cfg, resumed)
    assert finished_trials(resumed) == finished_trials(whole)
    want, got = manifest(whole), manifest(resumed)
    assert (got["best_params"], got["best_value"], got["trials"]) == (want["best_params"], want["best_value"], 12)
    assert got["transfer_as_is"] == want["transfer_as_is"]


def test_a_killed_worker_of_a_shared_study_leaves_no_trial_running_forever(pair, tmp_path):
    cfg = config(pair, space="global", n_trials=4, limit=192, storage=str(tmp_path / "study.log"), study="shared")
    proc = subprocess.run([sys.executable, "-c", KILLED_AT_TRIAL, cfg.model_dump_json(), str(tmp_path / "w1"), "2"],
                          env=python_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_search(cfg, tmp_path / "w1")  # the worker started again fails its dead predecessor's trial
    trials = optuna.load_study(study_name="shared", storage=open_storage(cfg.storage)).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


def test_a_second_search_on_the_same_output_stops_at_once(pair, tmp_path):
    holder = lock_holder(tmp_path / "s")
    try:
        result = runner.invoke(app, ["search", "--align", str(pair["align"]), "--transfer", str(pair["transfer"]),
                                     "--data", str(pair["data"]), "-o", str(tmp_path / "s")])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1 and f"is writing {tmp_path / 's'} (pid {holder.pid})" in result.stderr, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.lock"]  # no study.db: the other process owns it


def test_a_failed_search_leaves_nothing(pair, tmp_path, monkeypatch):
    def diverges(*args):
        raise FloatingPointError("non-finite loss")  # every trial is pruned
    monkeypatch.setattr(search_core, "apply_blend", diverges)
    with pytest.raises(ArtifactError, match="no trial of study 'loramigrate-search' completed"):
        run_search(config(pair, n_trials=2), tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


def test_more_trials_continue_the_private_study_and_other_options_restart_it(pair, tmp_path):
    def trials(out):
        return optuna.load_study(study_name="loramigrate-search", storage=f"sqlite:///{out / 'study.db'}").trials

    out = tmp_path / "s"
    run_search(config(pair, space="global", n_trials=3), out)
    first = [t.params for t in trials(out)]
    assert run_search(config(pair, space="global", n_trials=5), out)
    assert [t.params for t in trials(out)][:3] == first and len(trials(out)) == 5
    run_search(config(pair, space="global", n_trials=3, alpha_max=0.8), out)  # a redone stage: a new study
    again = trials(out)
    assert len(again) == 3 and again[0].params == {"alpha": 1.0, "beta": 0.0}
    assert all(t.params["alpha"] <= 0.8 for t in again[1:])


def test_multi_fidelity_trials_score_a_short_finetune_and_stop_poor_ones_early(pair, tmp_path):
    from loramigrate.evaluate import read_task
    from loramigrate.finetune.loop import batch_rows, train
    from loramigrate.finetune.objective import completion_loss, mean_loss
    from loramigrate.models import ModelRef
    from loramigrate.search.runner import fidelity_finetune

    cfg = config(pair, fidelity_steps=3, train=str(pair["data"]), space="global", n_trials=8)
    out = tmp_path / "s"
    run_search(cfg, out)
    study = optuna.load_study(study_name=cfg.study, storage=f"sqlite:///{out / 'study.db'}")
    first = study.trials[0]
    assert first.params == {"alpha": 1.0, "beta": 0.0} and sorted(first.intermediate_values) == [0, 1, 2]
    task, tok = read_task(pair["data"]), transformers.AutoTokenizer.from_pretrained(pair["model"])
    loss = completion_loss(tok, task, cfg.max_len)

    def transferred():
        base = transformers.AutoModelForCausalLM.from_pretrained(pair["model"])
        return PeftModel.from_pretrained(base, str(pair["transfer"]), is_trainable=True).eval()
    # trial 0 = transfer as is + 3 Adam steps at a constant rate on the LoRA factors, recomputed with stock PEFT
    model = transferred()
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if "lora_" in n], lr=cfg.fidelity_lr)
    for step in range(3):
        opt.zero_grad()
        loss(model, batch_rows(task.rows, step, cfg.batch_size, cfg.seed)).backward()
        opt.step()
    with torch.no_grad():
        assert first.value == pytest.approx(float(loss(model, task.rows)), rel=1e-4)
    # … and it is the finetune loop's result for the same steps and seed, and lower than before those steps
    model = transferred()
    log, _ = train(model, task.rows, fidelity_finetune(cfg, ModelRef(str(pair["model"]))), loss,
                   lambda m: {"loss": mean_loss(loss, m, task.rows, cfg.batch_size)}, None, dropout=False)
    assert [r["val_loss"] for r in log] == pytest.approx([first.intermediate_values[i] for i in range(3)], rel=1e-5)
    summary = json.loads((out / "manifest.json").read_text())["search"]
    assert first.value < summary["transfer_as_is_value"]
    states = {t.state for t in study.trials}
    assert states <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert len(study.trials) == 8 and summary["trials"] + summary["pruned"] == 8  # pruned trials use the budget
    assert summary["transfer_as_is"] == first.value
    assert summary["pruned"] == sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    with pytest.raises(ConfigError, match="needs training data"):
        run_search(config(pair, fidelity_steps=2), tmp_path / "no-train")


def test_two_workers_share_one_study_without_duplicates(pair, tmp_path):
    """scripts/search_workers.sh: two processes on one journal file complete N trials in total."""
    root = tmp_path / "shared"
    proc = run_script("search_workers.sh", pair["align"], pair["transfer"], pair["data"], root, 2, 8, "--",
                      "--limit", pair["rows"], "--batch-size", 256, "--evolution-rank", 4, "--sampler", "tpe")
    assert proc.returncode == 0, proc.stderr[-2000:]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(root / "study.log")))
    trials = optuna.load_study(study_name="search", storage=storage).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 8
    assert len({t.number for t in trials}) == len(trials)
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 8
    assert sum(all(v == (1.0 if k.startswith("alpha") else 0.0) for k, v in t.params.items()) for t in complete) == 1
    for worker in ("worker-1", "worker-2"):
        assert (root / worker / "adapter_model.safetensors").is_file()
    best = json.loads((root / "best" / "manifest.json").read_text())["search"]
    assert best["trials"] == 8 and best["best_value"] == min(t.value for t in complete)


def test_bad_input(pair, tiny_models, tmp_path):
    other = tmp_path / "other-align"
    cli("align", "--old", tiny_models["llama"], "--new", tiny_models["llama"], "--max-tokens", "64", "-o", other)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    cli("search", "--align", pair["align"], "--transfer", pair["transfer"], "--data", pair["data"], "--n-trials", "1",
        "--space", "global", "--storage", storage, "--study", "s", "-o", tmp_path / "first")
    cases = [(["--storage", "redis://localhost/0"], "expected an Optuna URL"),
             (["--storage", storage, "--study", "s"], "different search space"),
             (["--n-trials", "0"], "n_trials"),
             (["--alpha-max", "inf"], "alpha_max"),
             (["--alpha-min", "2"], "alpha_min"),
             (["--objective", "distill"], "teacher_adapter"),
             (["--data", str(empty)], "holds no examples"),
             (["--align", str(other)], "another alignment")]
    for args, match in cases:
        options = {"--align": str(pair["align"]), "--transfer": str(pair["transfer"]), "--data": str(pair["data"])}
        flat = [x for k, v in options.items() if k not in args for x in (k, v)]
        result = runner.invoke(app, ["search", *flat, *args, "-o", str(tmp_path / "o")])
        assert result.exit_code == 1 and match in result.stderr, (args, result.output)
        assert not (tmp_path / "o").exists()


def manifest(out):
    return json.loads((out / "manifest.json").read_text())["search"]


def test_the_space_keeps_beta_where_the_weights_only_drifted_and_drops_it_elsewhere(pair, known_upgrade, tmp_path,
                                                                                     recwarn):
    from loramigrate.alignment import load_alignment

    def auto_beta(old, new, name):
        cli("align", "--old", old, "--new", new, "--max-tokens", "64", "-o", tmp_path / name)
        return resolve_beta_max(None, load_alignment(tmp_path / name))

    assert resolve_beta_max(None, load_alignment(pair["align"])) == DRIFT_BETA_MAX  # same model: identity maps
    assert auto_beta(*known_upgrade[:2], "permuted") == 0.0  # same shapes, heads permuted: not a drift
    unrelated = shape_pair(tmp_path / "models", {"hidden": 32}, {"hidden": 48})
    assert auto_beta(*unrelated, "unrelated") == 0.0
    assert resolve_beta_max(0.3, load_alignment(tmp_path / "unrelated")) == 0.3  # the user's choice wins
    assert search_space("groups", ["attn.late"], (0.5, 1.5), 0.0, 0.5) == {"alpha.attn.late": (0.5, 1.5),
                                                                          "gamma.attn.late": (0.0, 0.5)}
    # end to end on the unrelated pair: no β trial, the bases never loaded for it, the space recorded
    adapter = make_lora(unrelated[0], tmp_path / "lora", targets=TARGETS)
    cli("transfer", "--align", tmp_path / "unrelated", "--adapter", adapter, "-o", tmp_path / "transfer")
    # α below 1 only: the range is widened to hold trial 0, the transfer as is, so Optuna has no point out of range
    out = tmp_path / "s"
    run_search(SearchConfig(align=str(tmp_path / "unrelated"), transfer=str(tmp_path / "transfer"),
                            data=str(pair["data"]), limit=16, n_trials=2, space="global", alpha_max=0.8), out)
    assert manifest(out)["space"] == {"alpha": [0.5, 1.0]}
    assert not [w for w in recwarn if "out of range" in str(w.message)]
    assert not (tmp_path / "unrelated" / "cache").exists()


def test_the_distill_objective_needs_no_labels_and_is_zero_for_transfer_as_is_on_an_identity_pair(pair, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i:i + 4])}) + "\n" for i in range(12)))
    cfg = config(pair, data=str(prompts), limit=12, objective="distill", teacher_adapter=str(pair["adapter"]),
                 space="global", n_trials=4)
    out = tmp_path / "s"
    run_search(cfg, out)
    summary = manifest(out)
    assert summary["objective"].startswith("KL(old pair")
    assert summary["transfer_as_is"] == pytest.approx(0.0, abs=1e-5)  # teacher = old pair = new base + transfer
    study = optuna.load_study(study_name=cfg.study, storage=f"sqlite:///{out / 'study.db'}")
    perturbed = [t.value for t in study.trials if t.params["alpha"] != 1.0]
    assert perturbed and min(perturbed) > 1e-4


def test_a_worker_waits_for_a_shared_study_that_another_is_still_creating(tmp_path, monkeypatch):
    """The creator records the space last; a worker loading the study before then waits, and never
    enqueues the as-is trial again."""
    path = str(tmp_path / "study.log")
    half_made = optuna.create_study(study_name="s", storage=open_storage(path))
    threading.Timer(0.5, lambda: half_made.set_user_attr(SPACE_ATTR, "sig")).start()
    study = open_study("s", open_storage(path), None, None, {"alpha": (0.5, 1.5)}, "sig", private=False)
    assert study.user_attrs[SPACE_ATTR] == "sig" and not study.trials
    monkeypatch.setattr("loramigrate.search.study.READY_WAIT_S", 0.3)
    optuna.create_study(study_name="dead", storage=open_storage(path))
    with pytest.raises(ConfigError, match="never made ready"):
        open_study("dead", open_storage(path), None, None, {"alpha": (0.5, 1.5)}, "sig", private=False)


def test_the_base_evolution_leaves_the_global_rng_alone(pair):
    from loramigrate.alignment import load_alignment
    from loramigrate.search.evolution import module_evolution

    alignment = load_alignment(pair["align"])
    g = torch.Generator().manual_seed(5)
    shape = (alignment.new.hidden, alignment.new.n_heads * alignment.new.head_dim)
    old_w = torch.randn(*shape, generator=g)
    new_w = old_w + torch.randn(shape[0], 2, generator=g) @ torch.randn(2, shape[1], generator=g)
    state = torch.random.get_rng_state()
    b, a = module_evolution(old_w, new_w, alignment, 0, "o", rank=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.allclose(b @ a, new_w - old_w, atol=1e-4)


def test_the_base_evolution_computes_on_the_device_it_is_given(pair):
    """Every role's dense map and randomized SVD run where they are asked to (the meta device here: a tensor made or
    left on the host would not mix with it, as on a GPU); the CPU result is the same as before (test above)."""
    from loramigrate.alignment import load_alignment
    from loramigrate.search.evolution import module_evolution

    alignment = load_alignment(pair["align"])
    model = transformers.AutoModelForCausalLM.from_pretrained(pair["model"])
    for role in ("q", "k", "v", "o", "gate", "up", "down"):
        w = model.get_submodule(alignment.old.module_name(0, role)).weight
        b, a = module_evolution(w.to("meta"), w.to("meta"), alignment, 0, role, rank=2, device="meta")
        assert b.device.type == a.device.type == "meta" and (b @ a).shape == w.shape, role


def evolution_of(old_dir, new_dir, align_dir, rank):
    """(relative error against W_new − W_old when shapes allow, norm of the view) per module."""
    from loramigrate.alignment import load_alignment
    from loramigrate.search.evolution import module_evolution

    alignment = load_alignment(align_dir)
    old, new = (transformers.AutoModelForCausalLM.from_pretrained(d) for d in (old_dir, new_dir))
    out = {}
    for j, la in alignment.layers.items():
        for role in ("q", "k", "v", "o", "gate", "up", "down"):
            w_old = old.get_submodule(alignment.old.module_name(la.old_layer, role)).weight
            w_new = new.get_submodule(alignment.new.module_name(j, role)).weight
            b, a = module_evolution(w_old, w_new, alignment, j, role, rank)
            out[(j, role)] = (b @ a, (w_new - w_old).detach(), w_new.detach())
    return out


def test_base_evolution_is_the_low_rank_update_of_a_same_shape_upgrade(tmp_path):
    old = build(tiny_config("llama", init=0.2))
    new = build(tiny_config("llama", init=0.2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in new.model.layers:  # not q/k/v: their head-space maps are fitted, and would follow the drift
            for proj in (layer.self_attn.o_proj, layer.mlp.up_proj):
                out_dim, in_dim = proj.weight.shape
                proj.weight += 0.02 * torch.randn(out_dim, 2, generator=g) @ torch.randn(2, in_dim, generator=g)
    tok = make_tokenizer(WORDS)
    old_dir, new_dir = save(old, tok, tmp_path / "old"), save(new, tok, tmp_path / "new")
    cli("align", "--old", old_dir, "--new", new_dir, "-o", tmp_path / "align")
    for (j, role), (view, diff, _) in evolution_of(old_dir, new_dir, tmp_path / "align", rank=2).items():
        assert torch.allclose(view, diff, atol=1e-5), (j, role)


def test_base_evolution_vanishes_on_a_function_preserving_upgrade(known_upgrade, tmp_path):
    old_dir, new_dir, _ = known_upgrade
    cli("align", "--old", old_dir, "--new", new_dir, "-o", tmp_path / "align")
    for (j, role), (view, _, w_new) in evolution_of(old_dir, new_dir, tmp_path / "align", rank=4).items():
        assert view.norm() < 1e-3 * w_new.norm(), (j, role)
