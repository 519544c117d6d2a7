"""`loramigrate finetune`: short re-adaptation with scheduled regularisation toward the init."""

import typer

from loramigrate.cli._options import ForceOpt, OutDirOpt, with_config
from loramigrate.cli._ui import handle_errors, progress_bars
from loramigrate.config import FinetuneConfig

EXAMPLES = """
Examples:

  loramigrate finetune --base NEW --init TRANSFER --data train.jsonl -o out

  # stop once the validation metric reaches the target
  loramigrate finetune ... --val val.jsonl --target exact_match=0.85 -o out

  # a fresh LoRA trained from scratch: the baseline to beat
  loramigrate finetune --base NEW --init fresh --data train.jsonl -o out

  # distil the old pair (old base + old adapter) into the new base
  loramigrate finetune ... --teacher old --teacher-base O --teacher-adapter A
"""


@handle_errors
@with_config(FinetuneConfig)
def finetune(cfg: FinetuneConfig, out: OutDirOpt, force: ForceOpt = False) -> None:
    """Fine-tune an adapter (or a fresh LoRA) on task data; resumable after an interruption."""
    from loramigrate.finetune.runner import run_finetune

    with progress_bars() as progress:
        run_finetune(cfg, out, progress=progress, force=force)
    typer.echo(str(out))
