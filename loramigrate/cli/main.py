"""The `loramigrate` typer app: global options and one command per stage."""

import sys
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from loramigrate import __version__
from loramigrate.cli._options import flag
from loramigrate.cli._ui import debugging, print_error, setup_logging
from loramigrate.cli.align import EXAMPLES as ALIGN_EXAMPLES
from loramigrate.cli.align import align
from loramigrate.cli.demo import demo
from loramigrate.cli.evaluate import EXAMPLES as EVAL_EXAMPLES
from loramigrate.cli.evaluate import evaluate
from loramigrate.cli.finetune import EXAMPLES as FINETUNE_EXAMPLES
from loramigrate.cli.finetune import finetune
from loramigrate.cli.fleet import EXAMPLES as FLEET_EXAMPLES
from loramigrate.cli.fleet import fleet
from loramigrate.cli.run import EXAMPLES as RUN_EXAMPLES
from loramigrate.cli.run import run
from loramigrate.cli.search import EXAMPLES as SEARCH_EXAMPLES
from loramigrate.cli.search import search
from loramigrate.cli.transfer import EXAMPLES as TRANSFER_EXAMPLES
from loramigrate.cli.transfer import transfer

DEMO_EXAMPLES = """
Examples:

  loramigrate demo

  # the run folder elsewhere (default: runs/demo under the current directory)
  loramigrate demo -o /tmp/loramigrate-demo
"""


class _HelpFlag:
    """--help takes no value: its help shows none (typer's rich help would draw ``<bool>``)."""

    def get_help_option(self, ctx: typer.Context) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class Command(_HelpFlag, TyperCommand):
    """A stage command."""


class Cli(_HelpFlag, TyperGroup):
    """The app. Options typer cannot parse (a value of the wrong type, an unknown choice, a missing option) follow
    the one error contract too: one red line and exit code 1, not click's usage box and exit code 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:  # standalone_mode=False: click raises usage errors instead of printing them and exiting
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as e:  # click's usage errors derive from it
            if debugging():
                raise
            ctx = getattr(e, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            # typer checks values with pydantic, whose messages start "Value error, "
            print_error(f"{e.format_message().replace('Value error, ', '').rstrip('.')}{hint}")
            code = 1
        if standalone_mode:
            sys.exit(code if isinstance(code, int) else 0)  # a command returns None; an Exit returns its code
        return code


app = typer.Typer(
    name="loramigrate",
    help="Migrate LoRA adapters across base-model upgrades. Results go to stdout, everything else to stderr.",
    cls=Cli,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    verbose: Annotated[bool, flag("--verbose", "-v", help="Debug logging: each stage's whole config, model loads, "
                                  "chosen maps, checkpoints, timings, and library warnings in full.")] = False,
    quiet: Annotated[bool, flag("--quiet", "-q", help="Warnings and errors only, no progress.")] = False,
    version: Annotated[bool | None, flag("--version", callback=_version, is_eager=True,
                                         help="Print the version and exit.")] = None,
) -> None:
    """loramigrate: align → transfer → search → finetune → eval."""
    if ctx.invoked_subcommand is None:  # no command: the overview, as --help gives it
        typer.echo(ctx.get_help())
        raise typer.Exit()
    setup_logging(verbose, quiet)


app.command(cls=Command, epilog=DEMO_EXAMPLES)(demo)
app.command(cls=Command, epilog=RUN_EXAMPLES)(run)
app.command(cls=Command, epilog=FLEET_EXAMPLES)(fleet)
app.command(cls=Command, epilog=ALIGN_EXAMPLES)(align)
app.command(cls=Command, epilog=TRANSFER_EXAMPLES)(transfer)
app.command(cls=Command, epilog=SEARCH_EXAMPLES)(search)
app.command(cls=Command, epilog=FINETUNE_EXAMPLES)(finetune)
app.command("eval", cls=Command, epilog=EVAL_EXAMPLES)(evaluate)
