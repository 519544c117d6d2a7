"""The Optuna study of a search: storage, creation shared safely by workers, and what it leaves on disk.

Only Optuna's public API is used, so storages and versions behave as documented.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import socket
import statistics
import time
from pathlib import Path

from loramigrate.artifacts import pid_alive
from loramigrate.errors import ConfigError
from loramigrate.search.space import Space, as_is

log = logging.getLogger(__name__)
SPACE_ATTR = "loramigrate_space"
WORKER_ATTR = "loramigrate_worker"  # host:pid of the process running a trial
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
READY_WAIT_S = 60.0  # how long a worker waits for another to finish creating a shared study


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


def sampler_and_pruner(name: str, fidelity_steps: int, seed: int):
    """``auto``: GP, which learns from completed trials only, or TPE for the multi-fidelity objective, which
    also learns from where pruned trials stopped. Multi-fidelity trials report after every step; from the
    second on, the median rule stops laggards. The sampler proposes from the study's history alone
    (``HistorySeeded``), so a resumed study goes on as an uninterrupted one."""
    import optuna

    from loramigrate.search.sampler import HistorySeeded

    name = name if name != "auto" else "tpe" if fidelity_steps else "gp"
    make = optuna.samplers.GPSampler if name == "gp" else optuna.samplers.TPESampler
    sampler = HistorySeeded(lambda s: make(seed=s), seed)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1) if fidelity_steps
              else optuna.pruners.NopPruner())
    return sampler, pruner


def open_study(name: str, storage, sampler, pruner, space: Space, signature: str, private: bool):
    """Create the study, with transfer-as-is enqueued as its first trial, or load it.

    Creating takes three storage calls (create, enqueue, record the signature), so the signature, written
    last, marks a study as ready: a worker that loads a shared study another is still creating waits for
    it, and no two workers enqueue the as-is trial. A study whose signature (space and scoring options)
    differs is refused in a shared storage; the private study of an output directory, which no one else
    uses, starts afresh instead (the stage is being redone, or its creation was interrupted).

    Raises:
        ConfigError: a shared study with other options, or one never made ready.
    """
    import optuna

    def create():
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="minimize")
        study.enqueue_trial(as_is(space))
        study.set_user_attr(SPACE_ATTR, signature)
        return study
    try:
        return create()
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    found = study.user_attrs.get(SPACE_ATTR) if private else _wait_until_ready(study, name)
    if found == signature:
        return study
    if not private:
        raise ConfigError(f"study {name!r} exists in this storage with a different search space or options; "
                          "choose another --study")
    log.info("the search options changed: study %r starts afresh", name)
    optuna.delete_study(study_name=name, storage=storage)
    return create()


def _wait_until_ready(study, name: str) -> str:
    deadline = time.monotonic() + READY_WAIT_S
    while (found := study.user_attrs.get(SPACE_ATTR)) is None:
        if time.monotonic() > deadline:
            raise ConfigError(f"study {name!r} was never made ready (its creator stopped after "
                              f"{READY_WAIT_S:.0f} s?); delete it or choose another --study")
        time.sleep(0.2)
    return found


def worker() -> str:
    """This process, as the trials it runs record it (``WORKER_ATTR``)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_orphans(study) -> None:
    """Fail the running trials of workers of this host that are gone (killed): in a shared study they would
    count as running forever. Workers of other hosts fail those of their own when they start again."""
    import optuna

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner, _, pid = str(t.user_attrs.get(WORKER_ATTR, "")).rpartition(":")
        if owner == host and pid.isdigit() and not pid_alive(int(pid)):
            log.info("failing trial %d: its worker, process %s, is gone", t.number, pid)
            with contextlib.suppress(ValueError, optuna.exceptions.UpdateFinishedTrialError):  # another worker did
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def resume_interrupted(study, space: Space) -> None:
    """Fail the trials a killed run left running (in a single-process study they never end), and queue
    transfer as is again if an interruption cost it: the search only ever improves on it. Other points
    need no retry: ``HistorySeeded`` proposes the same ones again."""
    import optuna

    states = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        study.tell(t.number, state=states.FAIL)
    kept = study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.WAITING))
    if not any(t.state == states.WAITING or t.params == as_is(space) for t in kept):  # only as-is is ever queued
        log.info("queueing transfer as is again: an interrupted run did not finish it")
        study.enqueue_trial(as_is(space))


def trial_costs(trials, pass_s: float) -> dict[str, float]:
    """Median seconds of a whole trial (sampler included) and of blend + scoring, and both over one
    plain validation pass."""
    whole = statistics.median(t.duration.total_seconds() for t in trials)
    swap = statistics.median(t.user_attrs.get("blend_s", 0.0) + t.user_attrs.get("pass_s", 0.0) for t in trials)
    return {"median_trial_s": round(whole, 4), "median_blend_and_pass_s": round(swap, 4),
            "trial_cost_ratio": round(whole / pass_s, 3), "blend_and_pass_ratio": round(swap / pass_s, 3)}


def study_signature(space: Space, options: dict) -> str:
    """What a trial's value means: the resolved space and the scoring options."""
    return json.dumps({"space": space, "options": options}, sort_keys=True)


def write_trials(study, path: Path) -> None:
    names = sorted({k for t in study.trials for k in t.params})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "value", "duration_s", *names])
        for t in study.trials:
            duration = t.duration.total_seconds() if t.duration else ""
            writer.writerow([t.number, t.state.name, "" if t.value is None else t.value, duration,
                             *(t.params.get(n, "") for n in names)])


def plot_study(study, out: Path) -> None:
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
