"""The `loramigrate` typer app: global options and one command per stage."""

from typing import Annotated

import typer

from loramigrate import __version__
from loramigrate.cli._ui import setup_logging
from loramigrate.cli.align import EXAMPLES as ALIGN_EXAMPLES
from loramigrate.cli.align import align
from loramigrate.cli.demo import demo
from loramigrate.cli.evaluate import EXAMPLES as EVAL_EXAMPLES
from loramigrate.cli.evaluate import evaluate
from loramigrate.cli.finetune import EXAMPLES as FINETUNE_EXAMPLES
from loramigrate.cli.finetune import finetune
from loramigrate.cli.run import EXAMPLES as RUN_EXAMPLES
from loramigrate.cli.run import run
from loramigrate.cli.search import EXAMPLES as SEARCH_EXAMPLES
from loramigrate.cli.search import search
from loramigrate.cli.transfer import EXAMPLES as TRANSFER_EXAMPLES
from loramigrate.cli.transfer import transfer

app = typer.Typer(
    name="loramigrate",
    help="Migrate LoRA adapters across base-model upgrades. Results go to stdout, everything else to stderr.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only, no progress bars.")] = False,
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")] = None,
) -> None:
    """loramigrate: align → transfer → search → finetune → eval."""
    setup_logging(verbose, quiet)


app.command()(demo)
app.command(epilog=RUN_EXAMPLES)(run)
app.command(epilog=ALIGN_EXAMPLES)(align)
app.command(epilog=TRANSFER_EXAMPLES)(transfer)
app.command(epilog=SEARCH_EXAMPLES)(search)
app.command(epilog=FINETUNE_EXAMPLES)(finetune)
app.command("eval", epilog=EVAL_EXAMPLES)(evaluate)
