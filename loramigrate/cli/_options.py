"""Option aliases shared by every command, so the same flag means the same thing everywhere."""

from pathlib import Path
from typing import Annotated

import typer

OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output stage directory (written atomically).")]
DtypeOpt = Annotated[str, typer.Option(help="Model dtype: auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed; the same seed gives the same artifacts.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if its output is up to date.")]
