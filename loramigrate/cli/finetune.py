"""`loramigrate finetune`: short re-adaptation with scheduled regularisation toward the init."""

import typer

from loramigrate.cli._options import ForceOpt, OutDirOpt, with_config
from loramigrate.cli._ui import handle_errors, progress_bars
from loramigrate.config import FinetuneConfig

EXAMPLES = """
Examples:

  loramigrate finetune --base models/new --init runs/pair/sql/transfer --data train.jsonl --val val.jsonl \\
      --steps 100 --reg-lambda 1.0 --reg-final 0.01 --target exact_match=0.85 -o runs/pair/sql/final

  loramigrate finetune --base models/new --init fresh --rank 16 --data train.jsonl -o runs/baselines/retrain

  loramigrate finetune --base models/new --init runs/pair/sql/transfer --data prompts.jsonl --val val.jsonl \
      --teacher old --teacher-base models/old --teacher-adapter adapters/sql -o runs/pair/sql/distilled
"""


@handle_errors
@with_config(FinetuneConfig)
def finetune(cfg: FinetuneConfig, out: OutDirOpt, force: ForceOpt = False) -> None:
    """Fine-tune an adapter (or a fresh LoRA) on task data; resumable after an interruption."""
    from loramigrate.finetune.runner import run_finetune

    with progress_bars() as progress:
        run_finetune(cfg, out, progress=progress, force=force)
    typer.echo(str(out))
