"""`loramigrate fleet`: many adapters of one base pair, one alignment, on this machine or a Ray cluster."""

from pathlib import Path
from typing import Annotated

import typer

from loramigrate.cli._options import RecipeSetOpt, with_config
from loramigrate.cli._ui import err_console, fleet_progress, handle_errors, print_error
from loramigrate.config import FleetConfig

EXAMPLES = """
Examples:

  loramigrate fleet RECIPE --adapters adapters/ -o runs/fleet

  # on a private local Ray cluster of 4 CPUs
  loramigrate fleet RECIPE --adapters a/ -o runs/f --engine ray --workers 4

  # on the Ray cluster this machine joined (`ray start`); l lists adapters
  loramigrate fleet RECIPE --adapters l -o /nfs --engine ray --address auto

  # half a GPU per task
  loramigrate fleet RECIPE --adapters l -o /nfs --engine ray --gpus 0.5
"""


@handle_errors
@with_config(FleetConfig, given_only=True, arg="fleet")
def fleet(
    fleet: dict[str, object],
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/); its fleet: section sets the defaults.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (RUN/align, RUN/<adapter>/<stage>).")],
    adapters: Annotated[Path | None, typer.Option(
        help="A directory of adapter directories, or a file listing one per line (default: the recipe's).")] = None,
    set_: RecipeSetOpt = None,
) -> None:
    """Migrate every adapter with one shared alignment; finished stages are kept, and a failing adapter stops
    alone (exit code 1 at the end). Writes RUN/fleet.md and RUN/fleet.json and prints fleet.md's path."""
    from loramigrate.fleet import adapter_sources, run_fleet
    from loramigrate.pipeline import adapter_names, adapter_stages
    from loramigrate.recipes import load_recipe

    cfg = load_recipe(recipe, list(set_ or []), adapter_sources(adapters) if adapters else None)
    cfg = cfg.model_copy(update={"fleet": FleetConfig.model_validate({**cfg.fleet.model_dump(), **fleet})})
    with fleet_progress(adapter_names(cfg.adapters), adapter_stages(cfg)) as event:
        rows, total, report = run_fleet(cfg, out, event)
    err_console.print(f"{total['migrated']} migrated, {total['kept']} kept, {total['failed']} failed; "
                      f"{total['amortised_s']} s of compute per finished adapter")
    typer.echo(report)
    for row in rows:
        if row["status"] == "failed":
            print_error(f"{row['adapter']}: {row['error']}")
    if total["failed"]:
        raise typer.Exit(code=1)
