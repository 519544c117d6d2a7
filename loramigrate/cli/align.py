"""`loramigrate align`: compare an old and a new base model and write the alignment."""

from pathlib import Path
from typing import Annotated

import typer

from loramigrate.cli._options import DeviceOpt, DtypeOpt, ForceOpt, OutDirOpt, SeedOpt
from loramigrate.cli._ui import handle_errors, progress_bars

EXAMPLES = """
Examples:

  loramigrate align --old models/qwen2.5-coder-0.5b --new models/qwen2.5-coder-1.5b -o runs/qwen/align

  loramigrate align --old old_dir --new new.gguf --calib calib.jsonl --max-tokens 16384 -o runs/pair/align
"""


@handle_errors
def align(
    old: Annotated[str, typer.Option(help="Old base model: HF directory, .gguf file or hub id.")],
    new: Annotated[str, typer.Option(help="New base model: HF directory, .gguf file or hub id.")],
    out: OutDirOpt,
    calib: Annotated[Path | None, typer.Option(help="Calibration text (.txt or .jsonl); default: shipped text.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Calibration tokens to use.")] = 4096,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    cka: Annotated[str, typer.Option(help="CKA estimator: auto, feature (exact) or minibatch (unbiased HSIC).")] = "auto",
    layer_map: Annotated[str, typer.Option(help="Layer mapper: cka_dp, uniform, first or last.")] = "cka_dp",
    head_match: Annotated[str, typer.Option(help="Head matcher: hungarian or identity.")] = "hungarian",
    head_similarity: Annotated[str, typer.Option(
        help="Head similarity: weights (QK/OV circuits) or activations (head outputs on the calibration text).")
    ] = "weights",
    head_sketch: Annotated[int | None, typer.Option(
        help="Project hidden onto this many random directions for head matching (faster, approximate).")] = None,
    mlp_match: Annotated[str, typer.Option(
        help="Neuron matcher: auto, hungarian, mutual_best, greedy or identity.")] = "auto",
    mlp_similarity: Annotated[str, typer.Option(
        help="Neuron similarity: weights or activations (MLP activations on the calibration text).")] = "weights",
    transfer: Annotated[str, typer.Option(help="Transfer matrix fit: procrustes or lstsq.")] = "procrustes",
    per_layer_transfer: Annotated[bool, typer.Option(
        "--per-layer-transfer", help="Also fit a transfer matrix per mapped layer on calibration activations.")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
) -> None:
    """Align two base models: CKA layer map, head and neuron maps, hidden transfer matrix."""
    from loramigrate.align import run_align
    from loramigrate.config import AlignConfig, ModelLoadConfig

    cfg = AlignConfig(
        old=old, new=new, calib=str(calib) if calib else None, max_tokens=max_tokens, seq_len=seq_len,
        batch_size=batch_size, cka=cka, layer_map=layer_map, head_match=head_match,
        head_similarity=head_similarity, head_sketch=head_sketch,
        mlp_match=mlp_match, mlp_similarity=mlp_similarity,
        transfer=transfer, per_layer_transfer=per_layer_transfer, seed=seed,
        load=ModelLoadConfig(dtype=dtype, device=device),
    )
    with progress_bars() as progress:
        result = run_align(cfg, out, progress=progress, force=force)
    typer.echo(str(result))

