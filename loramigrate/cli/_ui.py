"""Presentation: logging, progress bars on stderr, and the one-line error contract."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from loramigrate.config import explain
from loramigrate.errors import LoramigrateError
from loramigrate.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
state = {"quiet": False}
PLAIN_EVERY_S = 10.0  # seconds between two progress lines of a task when stderr is not a terminal


def setup_logging(verbose: bool, quiet: bool) -> None:
    state["quiet"] = quiet
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=err_console, show_path=False, show_time=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("loramigrate").setLevel(level)
    if not verbose:  # peft reads a transformers property deprecated in v5 on every adapter load: noise to a user
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _one_line(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return f"invalid configuration: {explain(e)}"
    return " ".join(str(e).split())


def debugging() -> bool:
    """LORAMIGRATE_DEBUG=1: let errors propagate with their traceback."""
    return os.environ.get("LORAMIGRATE_DEBUG") == "1"


def print_error(message: str) -> None:
    """The error contract's one red line on stderr."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def handle_errors(fn: F) -> F:
    """User errors become one red line on stderr and exit code 1; LORAMIGRATE_DEBUG=1 re-raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (LoramigrateError, ValidationError) as e:
            if debugging():
                raise
            print_error(_one_line(e))
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def progress_bars() -> Iterator[ProgressFn]:
    """A ``ProgressFn`` for stderr: one rich bar per task name on a terminal; elsewhere (a file, a CI log), where
    bars would only show at the end, plain log lines (``PlainProgress``); nothing when quiet."""
    if state["quiet"]:
        yield no_progress
        return
    if not err_console.is_terminal:
        yield PlainProgress(PLAIN_EVERY_S)
        return
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[note]}"), console=err_console, transient=False)
    tasks: dict[str, Any] = {}

    def report(task: str, done: int, total: int, note: str = "") -> None:
        if task not in tasks:
            tasks[task] = bars.add_task(task, total=total, note=note)
        bars.update(tasks[task], completed=done, total=total, note=note)

    with bars:
        yield report


class PlainProgress:
    """Progress as INFO lines, ``finetune 40/300 loss 0.531 (1.9 s/it, eta 8 min)``: one per task every ``every_s``
    seconds, and one when it completes."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.tasks: dict[str, list] = {}  # task → [first seen, done then, time of its last line, done now]

    def __call__(self, task: str, done: int, total: int, note: str = "") -> None:
        now = time.monotonic()
        t = self.tasks.get(task)
        if t is None or done < t[3]:  # new, or the same name counting again (another arm's evaluation)
            t = self.tasks[task] = [now, done, now, -1]
        seen, done0, last, before = t
        t[3] = done
        if (done >= total > before) or (done < total and now - last >= self.every_s):
            t[2] = now
            rate = f" ({_rate((now - seen) / (done - done0), total - done)})" if done > done0 else ""
            log.info("%s %d/%d%s%s", task, done, total, f" {note}" if note else "", rate)


def _rate(per_item: float, left: int) -> str:
    per = f"{per_item:.1f} s/it" if per_item >= 0.1 else f"{1000 * per_item:.0f} ms/it"
    return per if left <= 0 else f"{per}, eta {_duration(per_item * left)}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


@contextlib.contextmanager
def fleet_progress(adapters: list[str], stages: tuple[str, ...]) -> Iterator[Callable[[Any, dict | None], None]]:
    """The fleet's task events (``fleet.graph.Event``) on stderr: a live table, adapter × stage, on a terminal;
    elsewhere one line per finished task; nothing when quiet."""
    if state["quiet"]:
        yield lambda task, result: None
        return
    cells = {adapter: dict.fromkeys(stages, "·") for adapter in adapters}
    align = ["·"]

    def table() -> Table:
        t = Table(title=f"fleet: alignment {align[0]}", title_justify="left")
        for col in ("adapter", *stages):
            t.add_column(col)
        for adapter, row in cells.items():
            t.add_row(adapter, *row.values())
        return t

    def event(task: Any, result: dict | None) -> None:
        text = _task_text(result)
        if task.adapter is None:
            align[0] = text
        else:
            label = task.id.rpartition("/")[2]  # a search worker's: search-worker-<i>
            cells[task.adapter][task.stage] = text if label == task.stage else f"{label} {text}"
        if live is not None:
            live.update(table())
        elif result is not None:
            where = f" on {result['host']}:{result['pid']}" if "pid" in result else ""
            log.info("%s: %s%s", task.id, _plain(result), where)

    live = Live(table(), console=err_console, refresh_per_second=2) if err_console.is_terminal else None
    with live or contextlib.nullcontext():
        yield event


def _task_text(result: dict | None) -> str:
    if result is None:
        return "[yellow]running[/]"
    if "error" in result:  # the reasons come after the table
        return "[dim]not run[/]" if "failed_in" in result else "[red]failed[/]"
    return _plain(result)


def _plain(result: dict) -> str:
    if "error" in result:
        return f"failed in {result['failed_in']}" if "failed_in" in result else f"failed: {result['error']}"
    return f"ran {result['wall_s']:.0f} s" if result["ran"] else "kept"
