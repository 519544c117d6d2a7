"""Presentation: logging, progress bars on stderr, and the one-line error contract."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from loramigrate.errors import LoramigrateError
from loramigrate.progress import ProgressFn

err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
state = {"quiet": False}


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
        # a cross-field rule (model validator) has no field to name
        parts = [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" if err["loc"] else err["msg"]
                 for err in e.errors()]
        return "invalid configuration: " + "; ".join(parts)
    return " ".join(str(e).split())


def handle_errors(fn: F) -> F:
    """User errors become one red line on stderr and exit code 1; LORAMIGRATE_DEBUG=1 re-raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (LoramigrateError, ValidationError) as e:
            if os.environ.get("LORAMIGRATE_DEBUG") == "1":
                raise
            err_console.print(f"[bold red]error:[/] {_one_line(e)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def progress_bars() -> Iterator[ProgressFn]:
    """A ``ProgressFn`` that draws one rich bar per task name on stderr (nothing when quiet)."""
    if state["quiet"]:
        yield lambda task, done, total: None
        return
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=err_console, transient=False)
    tasks: dict[str, Any] = {}

    def report(task: str, done: int, total: int) -> None:
        if task not in tasks:
            tasks[task] = bars.add_task(task, total=total)
        bars.update(tasks[task], completed=done, total=total)

    with bars:
        yield report
