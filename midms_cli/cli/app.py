"""The Typer application: global options, error handling, and the command groups."""

from __future__ import annotations

import os
import re
import sys
import traceback

import typer
from rich.markup import escape

import midms_cli
from midms_cli.atomic import fixable_reason
from midms_cli.cli.lazy import LazyGroup
from midms_cli.cli.state import STATE, err_console
from midms_cli.errors import MidmsError

try:  # recent Typer versions carry their own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:  # older ones depend on click itself
    from click import exceptions as _click_errors

UsageError = _click_errors.UsageError
# A bare command group (no arguments): click prints its help; missing before click 8.2.
NoArgsIsHelpError = getattr(_click_errors, "NoArgsIsHelpError", type("NoArgsIsHelpError", (Exception,), {}))

app = typer.Typer(
    name="midms",
    help="MIDMs exemplar-based image translation: prepare data, train, translate, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's own help layout: at any width it wraps the descriptions, never cuts an option name,
    # and shows no value placeholder for flags (typer's rich panels did both at 80 columns).
    rich_markup_mode=None,
    cls=LazyGroup,  # commands are imported when they run, so `midms --help` starts fast
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        print(f"midms {midms_cli.__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON object on stdout instead of text."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="More log lines on stderr (repeatable)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    STATE.json = json_output
    STATE.debug = debug
    STATE.verbose = verbose
    STATE.device = device


# Global options are accepted anywhere before "--" (`midms info --json` as well as `midms --json info`):
# click parses them only before the command name, so `main` moves them to the front.
_GLOBAL_FLAGS = re.compile(r"--json|--debug|--verbose|-v+|--device=.*")


def hoist_global_options(args: list[str]) -> list[str]:
    """`args` with the global options (and --device's value) moved before the command name."""
    front: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            rest.extend(args[index:])
            break
        if _GLOBAL_FLAGS.fullmatch(arg):
            front.append(arg)
        elif arg == "--device" and index + 1 < len(args):
            front.extend(args[index : index + 2])
            index += 1
        else:
            rest.append(arg)
        index += 1
    return front + rest


def _error_line(text: str) -> None:
    """One line whatever the message embeds (e.g. a third-party exception's multi-line text);
    escaped so that brackets in paths or values are printed, not read as rich markup."""
    message = escape(" ".join(text.split()))
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)


def _usage_line(exc: UsageError) -> str:
    """A click usage error (bad option value, missing argument, unknown option) as one line."""
    command = exc.ctx.command_path if exc.ctx is not None else "midms"
    return f"{exc.format_message()} (see `{command} --help`)"


def _end_distributed(code: int) -> None:
    """A process of a finished torchrun run exits at once, its output flushed (see
    `distributed.ended_process_group`); torch is only looked at if a command imported it."""
    distributed = sys.modules.get("midms_cli.distributed")
    if distributed is not None and distributed.ended_process_group():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    args = hoist_global_options(sys.argv[1:] if argv is None else list(argv))
    debug = "--debug" in args
    try:
        # Not standalone: click's usage errors come here to be printed as one line; --help and
        # typer.Exit return their exit code.
        code = app(args=args, prog_name="midms", standalone_mode=False)
        code = code if isinstance(code, int) else 0
        _end_distributed(code)
        sys.exit(code)
    except NoArgsIsHelpError as exc:  # a bare group: its help, as click prints it
        exc.show()
        sys.exit(exc.exit_code)
    except UsageError as exc:
        if debug:
            traceback.print_exc()
        _error_line(_usage_line(exc))
        sys.exit(2)
    except MidmsError as exc:
        if debug:
            traceback.print_exc()
        _error_line(str(exc))
        sys.exit(2)
    except OSError as exc:  # a full disk or missing permission the command did not catch itself
        reason = fixable_reason(exc)
        if reason is None:
            _internal_error(exc, debug)
        if debug:
            traceback.print_exc()
        _error_line(f"cannot use {exc.filename or 'a file'}: {reason}")
        sys.exit(2)
    except typer.Abort:
        err_console.print("interrupted", highlight=False)
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted", highlight=False)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # an internal error: say so, traceback only with --debug
        _internal_error(exc, debug)


def _internal_error(exc: Exception, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    else:
        err_console.print(
            f"[bold red]internal error:[/bold red] {type(exc).__name__}: {escape(str(exc))} "
            "(run with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
    sys.exit(1)
