"""`loramigrate search`: choose the starting adapter by Bayesian optimisation over blends."""

import typer

from loramigrate.cli._options import ForceOpt, OutDirOpt, with_config
from loramigrate.cli._ui import handle_errors, progress_bars
from loramigrate.config import SearchConfig

EXAMPLES = """
Examples:

  loramigrate search --align runs/pair/align --transfer runs/pair/sql/transfer --data val.jsonl \\
      --n-trials 30 -o runs/pair/sql/search

  # no labels: score blends by the KL to the old pair (old base + the adapter being migrated)
  loramigrate search ... --objective distill --teacher-adapter adapters/sql -o runs/pair/sql/search

  # two workers sharing one study (run each line in its own shell or on its own machine)
  loramigrate search ... --storage runs/pair/sql/study.log --study sql -o runs/pair/sql/search-w1
  loramigrate search ... --storage runs/pair/sql/study.log --study sql -o runs/pair/sql/search-w2
"""


@handle_errors
@with_config(SearchConfig)
def search(cfg: SearchConfig, out: OutDirOpt, force: ForceOpt = False) -> None:
    """Search the initial adapter: the transfer-as-is point is trial 0, so search only improves on it."""
    from loramigrate.search import run_search

    with progress_bars() as progress:
        run_search(cfg, out, progress=progress, force=force)
    typer.echo(str(out))
