"""The search stage over artifact directories: an Optuna study over initialisation blends of the transferred
adapter, scored on validation rows of the new base + candidate (the base loaded once, weights swapped in place).
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
import zlib
from pathlib import Path

from loramigrate.adapters import check_adapter_dir, read_adapter, write_adapter
from loramigrate.alignment import Alignment, load_alignment
from loramigrate.artifacts import (
    check_stage,
    hash_input,
    hash_inputs,
    is_up_to_date,
    log_start,
    output_lock,
    prepare_output,
    stage_output,
)
from loramigrate.config import FinetuneConfig, SearchConfig
from loramigrate.errors import ArtifactError, ConfigError, LoramigrateError
from loramigrate.evaluate import Task, read_task
from loramigrate.finetune.objective import OBJECTIVES, BatchLoss, Distill
from loramigrate.finetune.teacher import check_teacher, fill_targets, load_teacher
from loramigrate.models import ModelRef, load_model, load_tokenizer, resolve_device, resolve_model, resolved_load
from loramigrate.progress import ProgressFn, no_progress
from loramigrate.search.core import SCORES, BlendScorer, adapted_layers, apply_blend, ingredients, module_sites
from loramigrate.search.evolution import base_evolution
from loramigrate.search.space import Space, as_is, resolve_beta_max, search_space
from loramigrate.search.study import (
    WORKER_ATTR,
    fail_orphans,
    open_storage,
    open_study,
    plot_study,
    resume_interrupted,
    sampler_and_pruner,
    study_signature,
    trial_costs,
    worker,
    write_trials,
)

log = logging.getLogger(__name__)
STAGE = "search"
STUDY_DB = "study.db"
# options that do not change what a trial's value means: a study continues across them
NOT_IN_STUDY = {"n_trials", "timeout", "storage", "study", "load"}
TEACHER_NEW_TOKENS = FinetuneConfig.model_fields["teacher_new_tokens"].default  # greedy completion of a prompt-only row


def _check_inputs(cfg: SearchConfig) -> None:
    if cfg.fidelity_steps and not cfg.train:
        raise ConfigError("the multi-fidelity objective (--fidelity-steps) needs training data (--train)")
    check_stage(Path(cfg.align), "align")
    transfer = check_stage(Path(cfg.transfer), "transfer")
    for adapter in [cfg.transfer] + ([cfg.teacher_adapter] if cfg.teacher_adapter else []):
        check_adapter_dir(adapter)
    made_from = transfer.get("inputs", {}).get("align", {}).get("sha256")
    if made_from != hash_input(cfg.align):
        raise ArtifactError(f"{cfg.transfer} was transferred with another alignment than {cfg.align}")


def _check_teacher(cfg: SearchConfig, task: Task, new: ModelRef, alignment: Alignment) -> None:
    """Refuse a distillation that cannot work before any model loads."""
    teacher = SCORES[cfg.objective]
    if teacher is None:
        return
    if task.kind == "classification" and not task.labels:
        raise ConfigError(f"{cfg.data}: no row has a label; the classes must be named for the teacher's head")
    check_teacher(teacher, task.kind, new, alignment.base("old"))


def _train_rows(cfg: SearchConfig, val: Task) -> list[dict]:
    train = read_task(cfg.train)
    if train.kind != val.kind:
        raise ConfigError(f"{cfg.train} is a {train.kind} task, {cfg.data} a {val.kind} task")
    unseen = sorted(set(train.labels) - set(val.labels)) if val.kind == "classification" else []
    if unseen:
        raise ConfigError(f"{cfg.train} has labels the validation data lacks (the head is sized from it): {unseen[:5]}")
    return train.rows


def _objective(cfg: SearchConfig, alignment: Alignment, task: Task, tok, model, progress: ProgressFn
               ) -> tuple[list[dict], BatchLoss]:
    """The rows a blend is scored on and the loss over them: the label loss, or the KL from the objective's
    teacher on the old base (rows without a target get the teacher's)."""
    teacher_name = SCORES[cfg.objective]
    if teacher_name is None:
        return task.rows, OBJECTIVES[task.kind](tok, task, cfg.max_len)
    teacher = load_teacher(teacher_name, alignment.base("old"), cfg.teacher_adapter, task, cfg.load)
    rows = fill_targets(teacher, model, tok, task, task.rows, cfg.max_len, TEACHER_NEW_TOKENS, cfg.batch_size,
                        progress, "validation")
    return rows, OBJECTIVES[task.kind](tok, task, cfg.max_len, Distill(teacher.logits))


def _scorer(cfg: SearchConfig, alignment: Alignment, new: ModelRef, task: Task, train_rows: list[dict],
            progress: ProgressFn) -> tuple[BlendScorer, Space]:
    """Load the new base with the transferred adapter, the blend ingredients and the objective; the space
    leaves β out where the pair makes it meaningless, and then never loads the two bases for it."""
    from peft import PeftModel

    num_labels = len(task.labels) if task.kind == "classification" else None
    base = load_model(new, cfg.load.dtype, cfg.load.device, num_labels=num_labels)
    model = PeftModel.from_pretrained(base, cfg.transfer).eval()
    layers = adapted_layers(model)
    beta_max = resolve_beta_max(cfg.beta_max, alignment)
    evolution = _evolution(cfg, alignment, layers, progress) if beta_max > 0 else {}
    parts = ingredients(layers, alignment, evolution, cfg.seed)
    space = search_space(cfg.space, sorted({p.group for p in parts.values()}), (cfg.alpha_min, cfg.alpha_max),
                         beta_max, cfg.gamma_max)
    rows, batch_loss = _objective(cfg, alignment, task, load_tokenizer(new), model, progress)
    return BlendScorer(model, layers, parts, batch_loss, rows, cfg.batch_size, train_rows,
                       fidelity_finetune(cfg, new) if cfg.fidelity_steps else None), space


def fidelity_finetune(cfg: SearchConfig, new: ModelRef) -> FinetuneConfig:
    """The multi-fidelity objective's finetune: ``fidelity_steps`` at a constant ``fidelity_lr`` on ``train``, the
    validation loss after every step (what the pruner compares)."""
    return FinetuneConfig(base=new.path, data=cfg.train, steps=cfg.fidelity_steps, lr=cfg.fidelity_lr,
                          lr_schedule="constant", batch_size=cfg.batch_size, max_len=cfg.max_len, eval_every=1,
                          reg_toward="zero", seed=cfg.seed, load=cfg.load)


def _evolution(cfg: SearchConfig, alignment: Alignment, layers, progress: ProgressFn):
    # both bases on the host, in the dtype the run computes in (bf16 for auto on a GPU: not 56 GB of fp32 for a 7B
    # pair), or with a device map partly on disk; the difference is taken tensor by tensor in fp32
    dtype = resolved_load(cfg.load.dtype, cfg.load.device)["dtype"]

    def load_bases():
        return tuple(load_model(resolve_model(alignment.base(side)), dtype, "cpu", device_map=cfg.load.device_map,
                                max_memory=cfg.load.max_memory_map()) for side in ("old", "new"))
    wanted = sorted(set(module_sites(layers, alignment).values()))
    return base_evolution(Path(cfg.align), alignment, wanted, cfg.evolution_rank, load_bases, progress,
                          device=resolve_device(cfg.load.device))


def _study(cfg: SearchConfig, out_dir: Path, storage, space: Space, inputs: dict[str, dict[str, str]]):
    """The study: private (``study.db`` in the output) when no storage is given, else shared with workers.
    Its signature holds the inputs' content, so a study never continues over edited inputs."""
    import optuna

    private = storage is None
    if private:
        out_dir.mkdir(parents=True, exist_ok=True)
        storage = open_storage(f"sqlite:///{out_dir / STUDY_DB}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # workers sharing a study need their own sampler seeds, or they would propose the same points
    seed = cfg.seed if private else cfg.seed + zlib.crc32(str(out_dir.resolve()).encode())
    sampler, pruner = sampler_and_pruner(cfg.sampler, cfg.fidelity_steps, seed)
    signature = study_signature(space, {**cfg.model_dump(exclude=NOT_IN_STUDY),
                                        "inputs": {k: v["sha256"] for k, v in inputs.items()}})
    study = open_study(cfg.study, storage, sampler, pruner, space, signature, private)
    if private:
        resume_interrupted(study, space)
    else:
        fail_orphans(study)
    return study


def _optimize(study, scorer: BlendScorer, space: Space, cfg: SearchConfig, progress: ProgressFn) -> None:
    """Run trials until the study, across workers and reruns, has ``n_trials`` completed or pruned ones."""
    import optuna

    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    me = worker()

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER_ATTR, me)
        done = study.get_trials(deepcopy=False, states=(*counted, optuna.trial.TrialState.RUNNING))
        if len(done) - 1 >= cfg.n_trials:  # other workers already run or ran the last ones
            study.stop()
            raise optuna.TrialPruned("the study has its trials")
        params = {name: trial.suggest_float(name, lo, hi) for name, (lo, hi) in space.items()}
        try:
            value, costs = scorer.score(params, _pruning(trial))
        except FloatingPointError as e:
            raise optuna.TrialPruned(str(e)) from None
        for key, seconds in costs.items():
            trial.set_user_attr(key, seconds)
        return value

    def report(study_, _trial) -> None:
        progress("search", min(len(study_.get_trials(deepcopy=False, states=counted)), cfg.n_trials), cfg.n_trials)
    if len(study.get_trials(deepcopy=False, states=counted)) < cfg.n_trials:
        study.optimize(objective, timeout=cfg.timeout,
                       callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials, states=counted), report])


def _pruning(trial):
    import optuna

    def report(value: float, step: int) -> None:
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after {step + 1} steps (loss {value:.4f})")
    return report


def _completed(study, cfg: SearchConfig) -> list:
    """The completed trials; a warning when the budget is not used up.

    Raises:
        ArtifactError: none completed.
    """
    import optuna

    states = optuna.trial.TrialState
    finished = study.get_trials(deepcopy=False, states=(states.COMPLETE,))
    if not finished:
        why = f"within --timeout {cfg.timeout} s" if cfg.timeout else "(every trial failed or was pruned)"
        raise ArtifactError(f"no trial of study {cfg.study!r} completed {why}")
    if len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED))) < cfg.n_trials:
        log.warning("%d of %d trials finished (timeout); rerun the command to continue", len(finished), cfg.n_trials)
    return finished


def _summary(cfg: SearchConfig, study, space: Space, finished: list, plain: float, pass_s: float) -> dict:
    import optuna

    best = min(finished, key=lambda t: t.value)
    as_is_trial = next((t for t in finished if t.params == as_is(space)), None)
    pruned = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
    what = {"loss": "val loss", "distill": "KL(old pair ‖ new base + blend) on the val inputs"}[cfg.objective]
    return {"objective": f"{what} after {cfg.fidelity_steps} finetune steps" if cfg.fidelity_steps else what,
            "space": {name: list(bounds) for name, bounds in space.items()},
            "trials": len(finished), "pruned": len(pruned),
            "best_trial": best.number, "best_value": best.value, "best_params": best.params,
            "transfer_as_is": as_is_trial.value if as_is_trial else None, "transfer_as_is_value": plain,
            "validation_pass_s": round(pass_s, 4), **trial_costs(finished, pass_s)}


def _write_adapter(scorer: BlendScorer, params: dict[str, float], transfer: str, out: Path) -> None:
    """The blend of ``params`` as a copy of the transferred adapter (its config and any saved modules)."""
    apply_blend(scorer.layers, scorer.parts, params)
    result = read_adapter(transfer)
    for name, layer in scorer.layers.items():
        result.modules[name].b.copy_(layer.lora_B["default"].weight.detach().float().cpu())
        result.modules[name].a.copy_(layer.lora_A["default"].weight.detach().float().cpu())
    write_adapter(result, out)


def run_search(cfg: SearchConfig, out_dir: Path, progress: ProgressFn = no_progress, force: bool = False) -> bool:
    """Search blends of the transferred adapter, the base evolution and a fresh direction; resumable.

    Returns:
        True when it searched, False when ``out_dir`` already held this search of the same inputs.
    """
    out_dir = Path(out_dir)
    _check_inputs(cfg)
    task = read_task(cfg.data, cfg.limit, unlabelled=SCORES[cfg.objective] is not None)
    train_rows = _train_rows(cfg, task) if cfg.fidelity_steps else []
    alignment = load_alignment(Path(cfg.align))
    new = resolve_model(alignment.base("new"))
    _check_teacher(cfg, task, new, alignment)
    storage = open_storage(cfg.storage) if cfg.storage else None  # a bad URL fails before any heavy work
    names = {"align": cfg.align, "transfer": cfg.transfer, "data": cfg.data,
             **({"train": cfg.train} if cfg.fidelity_steps else {}),
             **({"teacher_adapter": cfg.teacher_adapter} if SCORES[cfg.objective] else {})}
    prepare_output(out_dir, allow=(STUDY_DB,), inputs=[*names.values(), new.path])
    inputs = hash_inputs(names)
    config = cfg.model_dump()
    if not force and is_up_to_date(out_dir, STAGE, config, inputs):
        log.info("%s is up to date; skipping search (use --force to redo)", out_dir)
        return False
    with output_lock(out_dir):  # held from the study's first trial: a second process would share the private study
        log_start(STAGE, out_dir, cfg)
        fresh = not out_dir.exists()
        try:
            _search(cfg, alignment, new, task, train_rows, storage, out_dir, inputs, progress)
        except LoramigrateError:  # e.g. no trial completed: a failed stage leaves nothing (an interrupted one, its study)
            if fresh:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
    return True


def _search(cfg: SearchConfig, alignment: Alignment, new: ModelRef, task: Task, train_rows: list[dict], storage,
            out_dir: Path, inputs: dict[str, dict[str, str]], progress: ProgressFn) -> None:
    """Load, run the study to ``n_trials``, and write the best blend with the study's record into ``out_dir``."""
    scorer, space = _scorer(cfg, alignment, new, task, train_rows, progress)
    log.info("search space: %s", space)
    started_at, started = time.time(), time.perf_counter()
    plain = scorer.value()  # transfer as is, as loaded: what one validation pass costs
    pass_s = time.perf_counter() - started
    study = _study(cfg, out_dir, storage, space, inputs)
    _optimize(study, scorer, space, cfg, progress)
    finished = _completed(study, cfg)
    with stage_output(out_dir, STAGE, cfg.model_dump(), inputs, allow=(STUDY_DB,)) as run:
        run.started = started_at
        run.extra["search"] = summary = _summary(cfg, study, space, finished, plain, pass_s)
        _write_adapter(scorer, summary["best_params"], cfg.transfer, run.tmp_dir)
        write_trials(study, run.tmp_dir / "trials.csv")
        plot_study(study, run.tmp_dir)
        if storage is None:
            shutil.copy2(out_dir / STUDY_DB, run.tmp_dir / STUDY_DB)
