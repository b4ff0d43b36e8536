"""The Typer application: global options, error handling, and the command groups."""

from __future__ import annotations

import sys
import traceback

import typer

from midms_cli.cli import info as info_commands
from midms_cli.cli.state import STATE, err_console
from midms_cli.errors import MidmsError

app = typer.Typer(
    name="midms",
    help="MIDMs exemplar-based image translation: prepare data, train, translate, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.callback()
def _global_options(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of text."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log lines on stderr (repeatable)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    STATE.json = json_output
    STATE.debug = debug
    STATE.verbose = verbose
    STATE.device = device


info_commands.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        # Standalone mode: usage errors print click's message and exit 2, --help exits 0.
        app(args=args, prog_name="midms")
    except MidmsError as exc:
        if debug:
            traceback.print_exc()
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted", highlight=False)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # an internal error: say so, traceback only with --debug
        if debug:
            traceback.print_exc()
        else:
            err_console.print(
                f"[bold red]internal error:[/bold red] {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
        sys.exit(1)
