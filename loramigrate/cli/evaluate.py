"""`loramigrate eval`: task metrics of a base with and without adapters, with negative flips."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from loramigrate.cli._options import ForceOpt, with_config
from loramigrate.cli._ui import handle_errors, progress_bars
from loramigrate.config import EvalConfig

EXAMPLES = """
Examples:

  loramigrate eval --base NEW --adapter runs/sql/transfer --data test.jsonl

  # negative flips against the old pair; the numbers also as JSON
  loramigrate eval ... --reference-base O --reference-adapter A --json e.json

  # as a stage directory (results.json, manifest.json)
  loramigrate eval --base NEW --adapter FINAL --data test.jsonl -o runs/eval
"""


def _table(results: dict) -> Table:
    metric = results["metric"]
    table = Table(title=f"{metric} (higher is better) and loss")
    for col in ("model", "n", "loss", metric, "gap recovered", "negative flips"):
        table.add_column(col, justify="left" if col == "model" else "right")
    reference = results["reference"]
    for r in ([reference] if reference else []) + results["results"]:
        if "note" in r:
            table.add_row(r["arm"], "", "", "", "", r["note"])
            continue
        flips = "reference" if r is reference else str(r.get("negative_flips", ""))
        gap = "" if r.get("gap_recovered") is None else f"{100 * r['gap_recovered']:.0f} %"
        table.add_row(r["arm"], str(r["n"]), f"{r['loss']:.4f}", f"{r['score']:.4f}", gap, flips)
    return table


def _pair(base: str | None, adapter: Path | None, what: str):
    """The pair of --X-base and --X-adapter, or None when neither is given."""
    from loramigrate.errors import ConfigError
    from loramigrate.eval import Pair

    if (base is None) != (adapter is None):
        raise ConfigError(f"--{what}-base and --{what}-adapter go together")
    return Pair(f"{Path(base).name} + {adapter.name}", base, str(adapter)) if base else None


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
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write an eval stage directory (results.json, "
                                             "manifest.json); stdout then holds only its path.")] = None,
    force: ForceOpt = False,
) -> None:
    """Evaluate a base alone and with each adapter; prints the comparison table (on stderr with -o)."""
    from dataclasses import replace

    from loramigrate.errors import ConfigError
    from loramigrate.eval import RESULTS, Comparison, Pair, compare, run_eval
    from loramigrate.proxy import NAME

    if json_out and (json_out.is_dir() or not json_out.parent.is_dir()):
        raise ConfigError(f"--json {json_out}: expected a file path in an existing directory")
    name = Path(base).name
    proxy = _pair(proxy_old_base, proxy_old_adapter, "proxy-old")
    comparison = Comparison(str(data), Pair(f"{name} (no adapter)", base),
                            tuple(Pair(f"{name} + {a.name}", base, str(a)) for a in adapter or []),
                            _pair(reference_base, reference_adapter, "reference"),
                            replace(proxy, label=NAME) if proxy else None)
    with progress_bars() as progress:
        if out is None:
            results = compare(comparison, cfg, progress)
        else:
            run_eval(cfg, comparison, out, progress, force)
            results = json.loads((out / RESULTS).read_text())
    Console(stderr=out is not None).print(_table(results))
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))
    if out is not None:
        typer.echo(str(out))
