"""`loramigrate search`: choose the starting adapter by Bayesian optimisation over blends."""

import typer

from loramigrate.cli._options import ForceOpt, OutDirOpt, with_config
from loramigrate.cli._ui import handle_errors, progress_bars
from loramigrate.config import SearchConfig

EXAMPLES = """
Examples:

  loramigrate search --align A --transfer T --data val.jsonl -o out

  # no labels: score blends by the KL to the old pair (old base + old adapter)
  loramigrate search ... --objective distill --teacher-adapter OLD -o out

  # two workers sharing one study (each in its own shell or machine)
  loramigrate search ... --storage runs/study.log --study sql -o runs/w1
  loramigrate search ... --storage runs/study.log --study sql -o runs/w2
"""


@handle_errors
@with_config(SearchConfig)
def search(cfg: SearchConfig, out: OutDirOpt, force: ForceOpt = False) -> None:
    """Search the initial adapter: the transfer-as-is point is trial 0, so search only improves on it."""
    from loramigrate.search import run_search

    with progress_bars() as progress:
        run_search(cfg, out, progress=progress, force=force)
    typer.echo(str(out))
