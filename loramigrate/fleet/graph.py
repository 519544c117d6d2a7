"""A fleet's task graph and its scheduler, the same for every engine.

One align task per base pair; per adapter one task per stage (transfer → search → finetune → eval), each
depending on the one before and the first on the alignment; with search workers, several tasks search one
adapter's study between its transfer and its search. A task is a plain function and its arguments, so any
engine can ship it to another process or machine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path

from loramigrate.fleet.tasks import align_task, search_worker_task, stage_task
from loramigrate.pipeline import adapter_stages
from loramigrate.recipes import Recipe

log = logging.getLogger(__name__)
ALIGN = "align"


@dataclass(frozen=True)
class Task:
    """``call(*args)`` once every task of ``deps`` succeeded; it returns a dict (``error`` set when it failed)."""

    id: str  # "align", "<adapter>/<stage>", "<adapter>/search-worker-<i>"
    adapter: str | None
    stage: str
    deps: tuple[str, ...]
    call: Callable[..., dict]
    args: tuple


Submit = Callable[[Task], Future]  # an engine: start a task, and a future of its result dict
Event = Callable[[Task, dict | None], None]  # a task started (None) or ended (its result)


def build_graph(recipe: Recipe, adapters: dict[str, str], run_dir: Path) -> list[Task]:
    """The tasks of a fleet over ``adapters`` (name → source directory), dependencies first."""
    align_dir = run_dir / ALIGN
    tasks = [Task(ALIGN, None, ALIGN, (), align_task, (recipe, align_dir))]
    workers = recipe.fleet.search_workers if recipe.search is not None else 1
    for name, source in adapters.items():
        own = recipe_for(recipe, run_dir / name) if workers > 1 else recipe
        before = ALIGN
        for stage in adapter_stages(recipe):
            if stage == "search" and workers > 1:
                helpers = [Task(f"{name}/search-worker-{i}", name, "search", (before,), search_worker_task,
                                (own, name, source, run_dir, align_dir, i)) for i in range(1, workers + 1)]
                tasks += helpers
                deps = tuple(t.id for t in helpers)
            else:
                deps = (before,)
            tasks.append(Task(f"{name}/{stage}", name, stage, deps, stage_task,
                              (own, name, source, run_dir, align_dir, stage)))
            before = f"{name}/{stage}"
    return tasks


def recipe_for(recipe: Recipe, adapter_dir: Path) -> Recipe:
    """The recipe of one adapter whose search is shared by workers: its study in a journal file beside its
    stages (safe for processes on one file system), named for the adapter."""
    search = {**recipe.search, "storage": str(adapter_dir / "search-study.log"), "study": adapter_dir.name}
    return recipe.model_copy(update={"search": search})


def execute(tasks: list[Task], submit: Submit, event: Event) -> dict[str, dict]:
    """Run ``tasks`` on an engine, each once its dependencies succeeded; a task whose dependency failed is not
    started and fails with that reason. Returns every task's result dict by id."""
    results: dict[str, dict] = {}
    waiting = list(tasks)
    running: dict[Future, Task] = {}
    while waiting or running:
        for task in [t for t in waiting if all(d in results for d in t.deps)]:
            waiting.remove(task)
            failed = next((results[d] for d in task.deps if "error" in results[d]), None)
            if failed is None:
                event(task, None)
                running[submit(task)] = task
            else:
                results[task.id] = {"task": task.id, "error": failed["error"],
                                    "failed_in": failed.get("failed_in", failed["task"])}
                event(task, results[task.id])
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            task = running.pop(future)
            results[task.id] = _outcome(task, future)
            event(task, results[task.id])
    return results


def _outcome(task: Task, future: Future) -> dict:
    """The task's result; an engine failure (a worker killed, a node lost) fails the task alone."""
    try:
        return future.result()
    except Exception as e:  # noqa: BLE001 - the task code catches its own errors: this is the engine's
        first = (str(e).strip().splitlines() or [""])[0]
        log.debug("task %s failed in the engine", task.id, exc_info=True)
        return {"task": task.id, "error": f"{type(e).__name__}: {first}"}
