"""`loramigrate transfer`: move an old LoRA adapter into the new base's coordinates."""

from pathlib import Path
from typing import Annotated

import typer

from loramigrate.cli._options import DeviceOpt, DtypeOpt, ForceOpt, OutDirOpt
from loramigrate.cli._ui import handle_errors, progress_bars

EXAMPLES = """
Examples:

  loramigrate transfer --align runs/qwen/align --adapter adapters/sql -o runs/qwen/sql/transfer

  loramigrate transfer --align runs/qwen/align --adapter adapters/sql --rank auto --fill nearest -o out

  loramigrate transfer --align runs/qwen/align --adapter adapters/sql --prompts train.jsonl -o out
"""


@handle_errors
def transfer(
    align: Annotated[Path, typer.Option(help="Alignment directory written by `loramigrate align`.")],
    adapter: Annotated[Path, typer.Option(help="Old PEFT LoRA adapter directory (trained on the old base).")],
    out: OutDirOpt,
    rank: Annotated[str | None, typer.Option(
        help="New rank: an integer, 'auto' (keep --energy), default: the old rank.")] = None,
    energy: Annotated[float, typer.Option(help="Fraction of singular-value energy kept by --rank auto.")] = 0.99,
    keep_norm_ratio: Annotated[bool, typer.Option(help="Keep ‖ΔW‖/‖W‖ of each module.")] = True,
    fill: Annotated[str, typer.Option(help="New layers without a source layer: none, nearest or interpolate.")] = "none",
    verify: Annotated[bool, typer.Option(help="Reload the result with stock PEFT on the new base and check it.")] = True,
    prompts: Annotated[Path | None, typer.Option(
        help="Task inputs (JSONL 'prompt' [+ 'completion'] or 'text'): refit the transfer so each new block "
             "reproduces the old adapter's effect (data-aware; loads both bases).")] = None,
    prompt_limit: Annotated[int, typer.Option(help="Rows of --prompts used.")] = 256,
    max_len: Annotated[int, typer.Option(help="Tokens per prompt.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass.")] = 16,
    fit_solver: Annotated[str, typer.Option(
        help="Data-aware fit: block (Adam on each block's factors) or rrr (closed-form o/down, pre-norm models).")
    ] = "block",
    fit_steps: Annotated[int, typer.Option(help="Adam steps per block of the data-aware fit.")] = 30,
    fit_lr: Annotated[float, typer.Option(help="Learning rate of the data-aware fit.")] = 1e-3,
    fit_heads: Annotated[bool, typer.Option(help="Refit saved linear heads to the old pair's outputs.")] = True,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
) -> None:
    """Transfer an old LoRA adapter to the new base, training-free; writes a PEFT adapter."""
    from loramigrate.config import ModelLoadConfig, TransferConfig
    from loramigrate.transfer import run_transfer

    cfg = TransferConfig(align=str(align), adapter=str(adapter), rank=rank, energy=energy,
                         keep_norm_ratio=keep_norm_ratio, fill=fill, verify=verify,
                         prompts=str(prompts) if prompts else None, prompt_limit=prompt_limit, max_len=max_len,
                         batch_size=batch_size, fit_solver=fit_solver, fit_steps=fit_steps, fit_lr=fit_lr,
                         fit_heads=fit_heads,
                         load=ModelLoadConfig(dtype=dtype, device=device))
    with progress_bars() as progress:
        result = run_transfer(cfg, out, force=force, progress=progress)
    typer.echo(str(result))
