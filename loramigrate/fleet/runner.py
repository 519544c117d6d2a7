"""`fleet`: many adapters of one base pair on an engine, one alignment for all, each adapter failing alone.

Layout: that of `loramigrate run` (RUN/align, RUN/<adapter>/<stage>), plus RUN/fleet.md and RUN/fleet.json.
"""

from __future__ import annotations

import time
from pathlib import Path

from loramigrate.adapters import check_adapter_dir
from loramigrate.errors import ArtifactError, ConfigError
from loramigrate.fleet.engines import ENGINES
from loramigrate.fleet.graph import ALIGN, Event, Task, build_graph, execute
from loramigrate.fleet.report import adapter_row, totals, write_fleet_report
from loramigrate.pipeline import check_inputs, run_layout
from loramigrate.recipes import Recipe


def adapter_sources(given: Path) -> list[str]:
    """The adapters of ``--adapters``: every subdirectory of a directory (one that is no adapter then fails alone,
    visibly), or the paths listed in a file, one per line (relative to the file; ``#`` starts a comment).

    Raises:
        ConfigError: no such path, or it names no adapter.
    """
    if given.is_dir():
        sources = [str(p) for p in sorted(given.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    elif given.is_file():
        lines = (line.split("#", 1)[0].strip() for line in given.read_text().splitlines())
        sources = [str(given.parent / line) for line in lines if line]
    else:
        raise ConfigError(f"--adapters {given}: no such directory or list file")
    if not sources:
        raise ConfigError(f"--adapters {given}: names no adapter (a directory of adapter directories, or a list file)")
    return sources


def _no_event(task: Task, result: dict | None) -> None:
    """Default callback: report nothing."""


def run_fleet(recipe: Recipe, run_dir: Path, event: Event = _no_event) -> tuple[list[dict], dict, Path]:
    """Migrate every adapter of ``recipe`` on the engine of ``recipe.fleet``; resumable like `run` (a finished
    stage is kept), and an adapter whose input or stage fails stops alone with its one-line reason.

    Returns:
        The report's rows (one per adapter), its totals, and the path of fleet.md.

    Raises:
        LoramigrateError: a problem every adapter shares (the bases, the data, the run layout, the engine).
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    adapters = dict(zip(run_layout(recipe, run_dir, run_dir / ALIGN), recipe.adapters, strict=True))
    rejected = {}
    for name, source in adapters.items():  # before any work, as `run` checks them
        try:
            check_adapter_dir(source)
        except ArtifactError as e:
            rejected[name] = {"task": f"{name}/inputs", "error": " ".join(str(e).split())}
    good = {name: source for name, source in adapters.items() if name not in rejected}
    results: dict[str, dict] = {}
    if good:
        check_inputs(recipe.model_copy(update={"adapters": list(good.values())[:1]}))  # the inputs all share
        with ENGINES[recipe.fleet.engine](recipe.fleet) as submit:
            results = execute(build_graph(recipe, good, run_dir), submit, event)
    rows = []
    for name, source in adapters.items():
        tasks = {task.partition("/")[2]: r for task, r in results.items() if task.startswith(f"{name}/")}
        rows.append(adapter_row(recipe, name, source, run_dir, {"inputs": rejected[name]} if name in rejected else tasks))
    total = totals(rows, run_dir / ALIGN, results.get(ALIGN), time.perf_counter() - started)
    return rows, total, write_fleet_report(recipe, recipe.fleet.engine, rows, total, run_dir)
