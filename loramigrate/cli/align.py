"""`loramigrate align`: compare an old and a new base model and write the alignment."""

import typer

from loramigrate.cli._options import ForceOpt, OutDirOpt, with_config
from loramigrate.cli._ui import handle_errors, progress_bars
from loramigrate.config import AlignConfig

EXAMPLES = """
Examples:

  loramigrate align --old models/old --new models/new -o runs/pair/align

  loramigrate align --old old_dir --new new.gguf --calib calib.jsonl -o out

  # any option also as KEY=VALUE, with the keys of a recipe's align section
  loramigrate align --old A --new B --set load.dtype=bfloat16 -o out
"""


@handle_errors
@with_config(AlignConfig)
def align(cfg: AlignConfig, out: OutDirOpt, force: ForceOpt = False) -> None:
    """Align two base models: CKA layer map, head and neuron maps, hidden transfer matrix."""
    from loramigrate.align import run_align

    with progress_bars() as progress:
        run_align(cfg, out, progress=progress, force=force)
    typer.echo(str(out))

