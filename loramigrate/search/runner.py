"""The search stage over artifact directories: an Optuna study over initialisation blends, scored by
the validation loss of the new base + candidate, with the base loaded once and weights swapped in place.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import statistics
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from loramigrate.adapters import read_adapter, write_adapter
from loramigrate.alignment import load_alignment
from loramigrate.artifacts import check_stage, hash_input, hash_inputs, is_up_to_date, prepare_output, stage_output
from loramigrate.config import SearchConfig
from loramigrate.errors import ArtifactError, ConfigError
from loramigrate.evaluate import Task, read_task
from loramigrate.finetune.loop import batch_rows, lora_layers
from loramigrate.finetune.objective import OBJECTIVES
from loramigrate.models import load_model, load_tokenizer, resolve_model
from loramigrate.progress import ProgressFn, no_progress
from loramigrate.search.blend import Ingredients, blend, fresh_direction, module_group
from loramigrate.search.evolution import base_evolution
from loramigrate.transfer.core import Delta, locate

log = logging.getLogger(__name__)
STAGE = "search"
STUDY_DB = "study.db"
SPACE_ATTR = "loramigrate_space"
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")


def open_storage(url: str):
    """An Optuna storage from a URL (sqlite/postgresql/mysql, with or without a driver) or a journal
    file (``*.log``, ``*.journal`` or ``journal:PATH``), which suits many processes on one file system.

    Raises:
        ConfigError: any other form.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend

    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme in RDB_SCHEMES:
        return optuna.storages.RDBStorage(url)
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        path = url.removeprefix("journal:")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    raise ConfigError(f"--storage {url!r}: expected an Optuna URL ({', '.join(RDB_SCHEMES)}) or a journal file (*.log)")


def search_space(cfg: SearchConfig, groups: list[str]) -> dict[str, tuple[float, float]]:
    """Parameter name → (low, high). ``global``: α, β for every module (the paper's two coefficients)."""
    if cfg.space == "global":
        return {"alpha": (0.0, cfg.alpha_max), "beta": (-cfg.beta_max, cfg.beta_max)}
    space = {}
    for g in groups:
        space.update({f"alpha.{g}": (0.0, cfg.alpha_max), f"beta.{g}": (-cfg.beta_max, cfg.beta_max),
                      f"gamma.{g}": (0.0, cfg.gamma_max)})
    return space


def coefficients(params: dict[str, float], group: str) -> tuple[float, float, float]:
    """(α, β, γ) of one module group under either space."""
    if "alpha" in params:
        return params["alpha"], params["beta"], 0.0
    return params[f"alpha.{group}"], params[f"beta.{group}"], params[f"gamma.{group}"]


def as_is(space: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The transfer-as-is point: α = 1, β = γ = 0."""
    return {name: 1.0 if name.startswith("alpha") else 0.0 for name in space}


def _check_inputs(cfg: SearchConfig) -> None:
    if cfg.fidelity_steps and not cfg.train:
        raise ConfigError("the multi-fidelity objective (--fidelity-steps) needs training data (--train)")
    check_stage(Path(cfg.align), "align")
    transfer = check_stage(Path(cfg.transfer), "transfer")
    made_from = transfer.get("inputs", {}).get("align", {}).get("sha256")
    if made_from != hash_input(cfg.align):
        raise ArtifactError(f"{cfg.transfer} was transferred with another alignment than {cfg.align}")


def _train_rows(cfg: SearchConfig, val: Task) -> list[dict]:
    train = read_task(cfg.train)
    if train.kind != val.kind:
        raise ConfigError(f"{cfg.train} is a {train.kind} task, {cfg.data} a {val.kind} task")
    unseen = sorted(set(train.labels) - set(val.labels)) if val.kind == "classification" else []
    if unseen:
        raise ConfigError(f"{cfg.train} has labels the validation data lacks (the head is sized from it): {unseen[:5]}")
    return train.rows


def short_finetune(model, layers, batch_loss, rows: list[dict], cfg: SearchConfig, val_loss: Callable[[], float],
                   report: Callable[[float, int], None]) -> float:
    """The multi-fidelity objective: ``cfg.fidelity_steps`` Adam steps on the LoRA factors from the blend now
    loaded (seeded batches, dropout off, head frozen), reporting the validation loss after each step to
    ``report`` (which may prune the trial). Returns the last validation loss."""
    weights = [w for layer in layers.values() for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    opt = torch.optim.Adam(weights, lr=cfg.fidelity_lr)
    for w in weights:
        w.requires_grad_(True)
    try:
        for step in range(cfg.fidelity_steps):
            opt.zero_grad()
            with torch.enable_grad():
                batch_loss(model, batch_rows(rows, step, cfg.batch_size, cfg.seed)).backward()
            opt.step()
            loss = val_loss()
            report(loss, step)
    finally:
        for w in weights:
            w.requires_grad_(False)
    return loss


def _pruning(trial) -> Callable[[float, int], None]:
    import optuna

    def report(value: float, step: int) -> None:
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after {step + 1} steps (loss {value:.4f})")
    return report


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    """LoRA layers by their module name in the base model (the adapter's names)."""
    return {name.removeprefix("base_model.model."): m for name, m in lora_layers(model).items()}


def _ingredients(layers, alignment, align_dir: Path, cfg: SearchConfig, progress: ProgressFn) -> dict[str, Ingredients]:
    where = {name: locate(alignment.new, name) for name in layers}

    def load_bases():
        options = alignment.info.get("options", {})
        return tuple(load_model(resolve_model(options[side]), cfg.load.dtype, "cpu") for side in ("old", "new"))
    evolution = base_evolution(align_dir, alignment, sorted(set(where.values())), cfg.evolution_rank, load_bases,
                               progress)
    out = {}
    for name, layer in layers.items():
        j, role = where[name]
        b = (layer.lora_B["default"].weight.detach().float().cpu() * float(layer.scaling["default"]))
        a = layer.lora_A["default"].weight.detach().float().cpu().clone()  # trials overwrite the live weight
        fresh = fresh_direction(b.shape[0], a.shape[1], a.shape[0], Delta(b, a, 1.0).norm(),
                                seed=cfg.seed + zlib.crc32(name.encode()))
        out[name] = Ingredients(group=module_group(j, alignment.new.n_layers, role), rank=a.shape[0], transfer=(b, a),
                                evolution=evolution.get((j, role)), fresh=fresh)
    return out


def _apply(layers, parts: dict[str, Ingredients], params: dict[str, float]) -> None:
    """Write the blend for ``params`` into the loaded LoRA weights, in place."""
    with torch.no_grad():
        for name, layer in layers.items():
            b, a = blend(parts[name], *coefficients(params, parts[name].group))
            w_b, w_a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
            w_b.copy_((b / float(layer.scaling["default"])).to(w_b.dtype))
            w_a.copy_(a.to(w_a.dtype))


# options that do not change what a trial's value means: a study continues across them
NOT_IN_STUDY = {"n_trials", "timeout", "storage", "study", "load"}


def _open_study(cfg: SearchConfig, storage, space: dict[str, tuple[float, float]], own_storage: bool, seed: int):
    """Create the study (and enqueue transfer-as-is as its first trial) or load it; only the process that
    creates it enqueues, so workers sharing a storage never duplicate that trial.

    A study records its space and scoring options. The private study of an output directory starts afresh
    when they changed (the stage is being redone); a shared storage refuses to mix them.
    """
    import optuna

    # GP learns from completed trials only; TPE also from where pruned ones stopped (multi-fidelity)
    name = cfg.sampler if cfg.sampler != "auto" else "tpe" if cfg.fidelity_steps else "gp"
    sampler = optuna.samplers.GPSampler(seed=seed) if name == "gp" else optuna.samplers.TPESampler(seed=seed)
    # multi-fidelity trials report after every step; from the second on, the median rule stops laggards
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1) if cfg.fidelity_steps
              else optuna.pruners.NopPruner())
    signature = json.dumps({"space": space, "options": cfg.model_dump(exclude=NOT_IN_STUDY)}, sort_keys=True)

    def create():
        study = optuna.create_study(study_name=cfg.study, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="minimize")
        study.set_user_attr(SPACE_ATTR, signature)
        study.enqueue_trial(as_is(space))
        return study
    try:
        return create()
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=cfg.study, storage=storage, sampler=sampler, pruner=pruner)
    if study.user_attrs.get(SPACE_ATTR) != signature:
        if not own_storage:
            raise ConfigError(f"study {cfg.study!r} exists in this storage with a different search space or "
                              "options; choose another --study")
        log.info("the search options changed: study %r starts afresh", cfg.study)
        optuna.delete_study(study_name=cfg.study, storage=storage)
        return create()
    if own_storage:  # a single-process study: trials left running by an interruption will never finish
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return study


def run_search(cfg: SearchConfig, out_dir: Path, progress: ProgressFn = no_progress, force: bool = False) -> Path:
    """Search blends of the transferred adapter, the base evolution and a fresh direction; resumable."""
    import optuna
    from peft import PeftModel

    out_dir = Path(out_dir)
    _check_inputs(cfg)
    task = read_task(cfg.data, cfg.limit)
    train_rows = _train_rows(cfg, task) if cfg.fidelity_steps else []
    own_storage = cfg.storage is None
    storage = None if own_storage else open_storage(cfg.storage)  # a bad URL fails before any heavy work
    prepare_output(out_dir, allow=(STUDY_DB,))
    inputs = hash_inputs({"align": cfg.align, "transfer": cfg.transfer, "data": cfg.data,
                          **({"train": cfg.train} if cfg.fidelity_steps else {})})
    config = cfg.model_dump()
    if not force and is_up_to_date(out_dir, STAGE, config, inputs):
        log.info("%s is up to date; skipping search (use --force to redo)", out_dir)
        return out_dir
    log.info("search config:\n%s", yaml.safe_dump(config, sort_keys=False))
    alignment = load_alignment(Path(cfg.align))
    ref = resolve_model(alignment.info.get("options", {}).get("new", ""))
    tok = load_tokenizer(ref)
    classification = task.kind == "classification"
    base = load_model(ref, cfg.load.dtype, cfg.load.device, num_labels=len(task.labels) if classification else None)
    model = PeftModel.from_pretrained(base, cfg.transfer).eval()
    layers = _lora_layers(model)
    parts = _ingredients(layers, alignment, Path(cfg.align), cfg, progress)
    space = search_space(cfg, sorted({p.group for p in parts.values()}))
    batch_loss = OBJECTIVES[task.kind](tok, task, cfg.max_len)

    @torch.no_grad()
    def val_loss() -> float:
        total = 0.0
        for start in range(0, len(task.rows), cfg.batch_size):
            rows = task.rows[start:start + cfg.batch_size]
            total += float(batch_loss(model, rows)) * len(rows)
        return total / len(task.rows)

    started_at, started = time.time(), time.perf_counter()
    plain_loss = val_loss()  # transfer as is, as loaded: what one validation pass costs
    pass_s = time.perf_counter() - started

    if own_storage:
        out_dir.mkdir(parents=True, exist_ok=True)
        storage = open_storage(f"sqlite:///{out_dir / STUDY_DB}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # workers sharing a study need their own sampler seeds, or they would propose the same points
    seed = cfg.seed if own_storage else cfg.seed + zlib.crc32(str(out_dir.resolve()).encode())
    study = _open_study(cfg, storage, space, own_storage, seed)

    # the budget counts every trial that ran to its end or was stopped by the pruner
    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def objective(trial: optuna.Trial) -> float:
        done = study.get_trials(deepcopy=False, states=(*counted, optuna.trial.TrialState.RUNNING))
        if len(done) - 1 >= cfg.n_trials:  # other workers already run or ran the last ones
            study.stop()
            raise optuna.TrialPruned("the study has its trials")
        params = {name: trial.suggest_float(name, lo, hi) for name, (lo, hi) in space.items()}
        t0 = time.perf_counter()
        _apply(layers, parts, params)
        t1 = time.perf_counter()
        if cfg.fidelity_steps:
            loss = short_finetune(model, layers, batch_loss, train_rows, cfg, val_loss, report=_pruning(trial))
        else:
            loss = val_loss()
        trial.set_user_attr("blend_s", t1 - t0)
        trial.set_user_attr("pass_s", time.perf_counter() - t1)
        if not math.isfinite(loss):
            raise optuna.TrialPruned(f"non-finite loss {loss}")
        return loss

    remaining = cfg.n_trials - len(study.get_trials(deepcopy=False, states=counted))
    if remaining > 0:
        def report(study_, _trial) -> None:
            progress("search", min(len(study_.get_trials(deepcopy=False, states=counted)), cfg.n_trials), cfg.n_trials)
        study.optimize(objective, timeout=cfg.timeout, callbacks=[
            optuna.study.MaxTrialsCallback(cfg.n_trials, states=counted), report])
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not finished:
        raise ArtifactError(f"no trial of study {cfg.study!r} completed (timeout {cfg.timeout} s?)")
    if len(study.get_trials(deepcopy=False, states=counted)) < cfg.n_trials:
        log.warning("%d of %d trials finished (timeout); rerun the command to continue", len(finished), cfg.n_trials)
    best = min(finished, key=lambda t: t.value)
    with stage_output(out_dir, STAGE, config, inputs, allow=(STUDY_DB,)) as run:
        run.started = started_at
        _apply(layers, parts, best.params)
        result = read_adapter(cfg.transfer)
        for name, layer in layers.items():
            m = result.modules[name]
            m.b.copy_(layer.lora_B["default"].weight.detach().float().cpu())
            m.a.copy_(layer.lora_A["default"].weight.detach().float().cpu())
        write_adapter(result, run.tmp_dir)
        _write_trials(study, run.tmp_dir / "trials.csv")
        _plots(study, run.tmp_dir)
        as_is_trial = next((t for t in finished if t.params == as_is(space)), None)
        pruned = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
        run.extra["search"] = {"objective": f"val loss after {cfg.fidelity_steps} finetune steps" if cfg.fidelity_steps
                               else "val loss", "trials": len(finished), "pruned": len(pruned),
                               "best_trial": best.number, "best_value": best.value, "best_params": best.params,
                               "transfer_as_is": as_is_trial.value if as_is_trial else None,
                               "transfer_as_is_val_loss": plain_loss,
                               "validation_pass_s": round(pass_s, 4), **trial_costs(finished, pass_s)}
        if own_storage:
            shutil.copy2(out_dir / STUDY_DB, run.tmp_dir / STUDY_DB)
    return out_dir


def trial_costs(trials, pass_s: float) -> dict[str, float]:
    """Median seconds of a whole trial (sampler included) and of blend + scoring, and both over one
    plain validation pass."""
    whole = statistics.median(t.duration.total_seconds() for t in trials)
    swap = statistics.median(t.user_attrs.get("blend_s", 0.0) + t.user_attrs.get("pass_s", 0.0) for t in trials)
    return {"median_trial_s": round(whole, 4), "median_blend_and_pass_s": round(swap, 4),
            "trial_cost_ratio": round(whole / pass_s, 3), "blend_and_pass_ratio": round(swap / pass_s, 3)}


def _write_trials(study, path: Path) -> None:
    names = sorted({k for t in study.trials for k in t.params})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "value", "duration_s", *names])
        for t in study.trials:
            duration = t.duration.total_seconds() if t.duration else ""
            writer.writerow([t.number, t.state.name, "" if t.value is None else t.value, duration,
                             *(t.params.get(n, "") for n in names)])


def _plots(study, out: Path) -> None:
    """history.png and importance.png (the latter needs a few completed trials with varied values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    ax = ovm.plot_optimization_history(study)
    ax.figure.savefig(out / "history.png", dpi=100, bbox_inches="tight")
    plt.close(ax.figure)
    try:
        ax = ovm.plot_param_importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        log.info("no parameter-importance plot: %s", e)
        return
    ax.figure.savefig(out / "importance.png", dpi=100, bbox_inches="tight")
    plt.close(ax.figure)
