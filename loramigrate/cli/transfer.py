"""`loramigrate transfer`: move an old LoRA adapter into the new base's coordinates."""

import typer

from loramigrate.cli._options import ForceOpt, OutDirOpt, with_config
from loramigrate.cli._ui import handle_errors, progress_bars
from loramigrate.config import TransferConfig

EXAMPLES = """
Examples:

  loramigrate transfer --align runs/pair/align --adapter adapters/sql -o out

  # rank by kept energy (--energy); new layers take a neighbour's update
  loramigrate transfer --align A --adapter B --rank auto --fill nearest -o out

  # data-aware: refit to the old adapter's effect on task inputs
  loramigrate transfer --align A --adapter B --prompts train.jsonl -o out
"""


@handle_errors
@with_config(TransferConfig)
def transfer(cfg: TransferConfig, out: OutDirOpt, force: ForceOpt = False) -> None:
    """Transfer an old LoRA adapter to the new base, training-free; writes a PEFT adapter."""
    from loramigrate.transfer import run_transfer

    with progress_bars() as progress:
        run_transfer(cfg, out, force=force, progress=progress)
    typer.echo(str(out))
