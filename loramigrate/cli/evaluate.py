"""`loramigrate eval`: task metrics of a base with and without adapters, with negative flips."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from loramigrate.cli._options import with_config
from loramigrate.cli._ui import handle_errors, progress_bars
from loramigrate.config import EvalConfig

EXAMPLES = """
Examples:

  loramigrate eval --base models/new --adapter runs/pair/sql/transfer --data test.jsonl

  loramigrate eval --base models/new --adapter runs/pair/sql/transfer --adapter runs/pair/sql/final \\
      --data test.jsonl --reference-base models/old --reference-adapter adapters/sql --json eval.json

  loramigrate eval --base models/new --data test.jsonl --reference-base models/old --reference-adapter adapters/sql \
      --proxy-old-base models/old --proxy-old-adapter adapters/sql
"""


def _table(rows: list, reference) -> Table:
    metric = rows[0].metric if rows else "score"
    table = Table(title=f"{metric} (higher is better) and loss")
    for col in ("model", "n", "loss", metric, "gap recovered", "negative flips"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in ([reference] if reference else []) + rows:
        flips = "reference" if r is reference else ("" if r.negative_flips is None else str(r.negative_flips))
        gap = "" if r.gap_recovered is None else f"{100 * r.gap_recovered:.0f} %"
        table.add_row(r.name, str(r.n), f"{r.loss:.4f}", f"{r.score:.4f}", gap, flips)
    return table


@handle_errors
@with_config(EvalConfig)
def evaluate(
    cfg: EvalConfig,
    base: Annotated[str, typer.Option(help="Base model: HF directory, .gguf file or hub id.")],
    data: Annotated[Path, typer.Option(help="JSONL: prompt/completion (generation) or text/label (classification).")],
    adapter: Annotated[list[Path] | None, typer.Option(help="PEFT adapter directory; repeat for several.")] = None,
    reference_base: Annotated[str | None, typer.Option(help="Old base for negative flips.")] = None,
    reference_adapter: Annotated[Path | None, typer.Option(help="Old adapter, with --reference-base.")] = None,
    proxy_old_base: Annotated[str | None, typer.Option(help="Also evaluate the proxy ensemble of --base with this old "
                                                       "base and --proxy-old-adapter (generation, same vocabulary).")
                              ] = None,
    proxy_old_adapter: Annotated[Path | None, typer.Option(help="Old adapter, with --proxy-old-base.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the numbers to this JSON file.")] = None,
) -> None:
    """Evaluate a base alone and with each adapter; prints the comparison table on stdout."""
    from loramigrate.adapters import check_adapter_dir
    from loramigrate.errors import ArtifactError, ConfigError
    from loramigrate.evaluate import evaluate_pairs, read_task, with_flips, with_gap
    from loramigrate.models import resolve_model
    from loramigrate.proxy import evaluate_proxy

    batch_size, load = cfg.batch_size, cfg.load
    if json_out and (json_out.is_dir() or not json_out.parent.is_dir()):
        raise ConfigError(f"--json {json_out}: expected a file path in an existing directory")
    task = read_task(data, cfg.limit)
    resolve_model(base)
    adapters = [str(a) for a in adapter or []]
    for a in adapters + ([str(reference_adapter)] if reference_adapter else []):
        check_adapter_dir(a)
    if (reference_base is None) != (reference_adapter is None):
        raise ConfigError("--reference-base and --reference-adapter go together")
    if (proxy_old_base is None) != (proxy_old_adapter is None):
        raise ConfigError("--proxy-old-base and --proxy-old-adapter go together")
    with progress_bars() as progress:
        reference = None
        proxy = [evaluate_proxy(base, proxy_old_base, str(proxy_old_adapter), task, batch_size, load, progress)
                 ] if proxy_old_base else []  # first: it refuses what it cannot evaluate
        if reference_base:
            ref_rows = evaluate_pairs(reference_base, [str(reference_adapter)], task, batch_size, load, progress,
                                      include_base=False)
            if not ref_rows:
                raise ArtifactError(f"{reference_adapter} does not load on {reference_base}")
            reference = ref_rows[0]
        rows = evaluate_pairs(base, adapters, task, batch_size, load, progress) + proxy
    if reference is not None:
        rows = with_gap(with_flips(rows, reference), reference, rows[0])
        (reference,) = with_gap([reference], reference, rows[0])
    Console().print(_table(rows, reference))
    if json_out:
        payload = {"data": str(data), "base": base, "results": [r.summary() for r in rows],
                   "reference": reference.summary() if reference else None}
        json_out.write_text(json.dumps(payload, indent=2))
