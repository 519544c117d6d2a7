"""What a fleet's tasks run, in whichever process or machine the engine picks: the stage runners of
`loramigrate run` over the run layout, so a fleet's artifacts and manifests are those of `run`.

A task never raises for its adapter's problems: it returns them as ``error``, one line, so the fleet goes on.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from loramigrate.align import run_align
from loramigrate.errors import LoramigrateError
from loramigrate.pipeline import adapter_run, run_stage
from loramigrate.recipes import Recipe
from loramigrate.search import run_search

log = logging.getLogger(__name__)


def align_task(recipe: Recipe, align_dir: Path) -> dict:
    return _attempt("align", lambda: run_align(recipe.align_config(), align_dir))


def stage_task(recipe: Recipe, name: str, source: str, run_dir: Path, align_dir: Path, stage: str) -> dict:
    def run() -> bool:
        r = adapter_run(recipe, name, source, run_dir, align_dir)
        run_stage(recipe, r, stage)
        return r.ran[stage]
    return _attempt(f"{name}/{stage}", run)


def search_worker_task(recipe: Recipe, name: str, source: str, run_dir: Path, align_dir: Path, worker: int) -> dict:
    """Trials of the adapter's shared study (``recipe_for``); the adapter's search task then writes its best."""
    def run() -> bool:
        transfer = adapter_run(recipe, name, source, run_dir, align_dir).dirs["transfer"]
        cfg = recipe.search_config(str(align_dir), str(transfer), source)
        return run_search(cfg, run_dir / name / "search-workers" / str(worker))
    return _attempt(f"{name}/search-worker-{worker}", run)


def _attempt(task: str, run: Callable[[], bool]) -> dict:
    """``{"task", "ran", "host", "pid", "wall_s"}``, or ``error`` in place of ``ran``: the user error's one line, or
    an unexpected error's type and message (its traceback goes to this worker's log)."""
    started = time.perf_counter()
    out: dict = {"task": task, "host": socket.gethostname(), "pid": os.getpid()}
    try:
        out["ran"] = run()
    except LoramigrateError as e:
        out["error"] = " ".join(str(e).split())
    except Exception as e:  # noqa: BLE001 - one adapter's bug must not stop the others: reported, with its type
        log.exception("task %s failed", task)
        out["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return {**out, "wall_s": round(time.perf_counter() - started, 3)}
