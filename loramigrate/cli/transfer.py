"""`loramigrate transfer`: move an old LoRA adapter into the new base's coordinates."""

from pathlib import Path
from typing import Annotated

import typer

from loramigrate.cli._options import DeviceOpt, DtypeOpt, ForceOpt, OutDirOpt
from loramigrate.cli._ui import handle_errors

EXAMPLES = """
Examples:

  loramigrate transfer --align runs/qwen/align --adapter adapters/sql -o runs/qwen/sql/transfer

  loramigrate transfer --align runs/qwen/align --adapter adapters/sql --rank auto --fill nearest -o out
"""


def _rank(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise typer.BadParameter("an integer ≥ 1 or 'auto'")
    return int(value)


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
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
) -> None:
    """Transfer an old LoRA adapter to the new base, training-free; writes a PEFT adapter."""
    from loramigrate.config import ModelLoadConfig, TransferConfig
    from loramigrate.transfer import run_transfer

    cfg = TransferConfig(align=str(align), adapter=str(adapter), rank=_rank(rank), energy=energy,
                         keep_norm_ratio=keep_norm_ratio, fill=fill, verify=verify,
                         load=ModelLoadConfig(dtype=dtype, device=device))
    typer.echo(str(run_transfer(cfg, out, force=force)))
