"""`loramigrate run`: every stage of a recipe, resumable, ending with a migration report."""

from pathlib import Path
from typing import Annotated

import typer

from loramigrate.cli._options import RecipeSetOpt, flag, with_config
from loramigrate.cli._ui import handle_errors, progress_bars
from loramigrate.config import ModelLoadConfig

EXAMPLES = """
Examples:

  loramigrate run recipes/minilm-l3-to-l6.yaml -o runs/minilm

  # redo finetune and eval with other settings
  loramigrate run RECIPE -o runs/a --set finetune.steps=200 --from finetune

  # a fleet: one shared alignment, one run folder per adapter
  loramigrate run RECIPE --adapter adapters/a --align-dir runs/align -o runs/a
"""


@handle_errors
@with_config(ModelLoadConfig, given_only=True, arg="load")
def run(
    load: dict[str, str],
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (one folder per stage and adapter).")],
    set_: RecipeSetOpt = None,
    adapter: Annotated[list[Path] | None, typer.Option(help="Migrate these adapters instead of the recipe's.")] = None,
    align_dir: Annotated[Path | None, typer.Option(help="Shared alignment directory (default: RUN/align).")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="Redo this stage and every later one.")] = None,
    force: Annotated[bool, flag("--force", help="Redo every stage, even those whose outputs are up to date "
                                "(--from align).")] = False,
) -> None:
    """Run align → transfer → search → finetune → eval; stages whose manifests match are skipped.

    The model-loading options (--dtype, --device, --device-map, --max-memory) apply to every stage, over the
    recipe's load settings.
    """
    from loramigrate.cli._summary import print_summary
    from loramigrate.pipeline import timed_run
    from loramigrate.recipes import load_recipe

    cfg = load_recipe(recipe, list(set_ or []), [str(a) for a in adapter] if adapter else None, load)
    with progress_bars() as progress:
        runs, report = timed_run(cfg, out, "align" if force else from_, align_dir, progress)
    print_summary(runs, report)
