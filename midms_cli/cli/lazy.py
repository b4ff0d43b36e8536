"""The top-level command group, importing each command's module only when that command runs.

Importing every command module up front pulls in torch and the whole model stack (about two
seconds) before `midms --help` can print a line; here the command list and its one-line help
come from the table below, and `midms NAME ...` imports the one module that defines NAME.
tests/test_cli_help.py checks that the table's help matches each command's own docstring.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer
from typer.core import TyperGroup

# name -> (module whose `register(app)` defines it, one-line help shown by `midms --help`).
# Listed in the order `midms --help` shows them.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": (
        "midms_cli.cli.info",
        "Versions, device, CPU threads, cache directory, dataset plugins, models and weights found.",
    ),
    "datasets": (
        "midms_cli.cli.info",
        "List the installed dataset plugins (entry-point group `midms.datasets`).",
    ),
    "demo": (
        "midms_cli.cli.demo",
        "Show MIDMs translating: the bundled model on freshly generated synthetic face pairs.",
    ),
    "prepare": ("midms_cli.cli.prepare", "Turn a raw dataset into WebDataset shards."),
    "pretrain": (
        "midms_cli.cli.train",
        "Pretrain the first stage or the latent diffusion model (when no LDM weights exist).",
    ),
    "warmup": (
        "midms_cli.cli.train",
        "Warm up the correspondence networks with the diffusion UNet frozen (the paper's first phase).",
    ),
    "train": (
        "midms_cli.cli.train",
        "Train MIDMs end to end: the interleaved loop unrolled with gradients (the paper's second phase).",
    ),
    "translate": (
        "midms_cli.cli.translate",
        "Translate a condition into an image in the style of an exemplar (MIDMs, Algorithm 1).",
    ),
    "eval": ("midms_cli.cli.eval", "Evaluate a model on a fixed pair list, or compare two image folders."),
    "weights": (
        "midms_cli.cli.weights",
        "List, add, fetch, import, export and locate pretrained weights (stored as safetensors).",
    ),
}


def load_command(name: str) -> Any:
    """The click command `name`, built from its module's `register(app)`."""
    module = importlib.import_module(COMMANDS[name][0])
    host = typer.Typer(add_completion=False, rich_markup_mode=None)
    host.callback()(lambda: None)  # a callback makes typer build a group even for one command
    module.register(host)
    group = typer.main.get_command(host)
    return group.commands[name]


def short_help(text: str, limit: int) -> str:
    """The first sentence of `text`, cut at a word with "..." when longer than `limit` (as click does)."""
    sentence = text.split(". ", 1)[0]
    if len(sentence) <= limit:
        return sentence
    return sentence[: limit - 3].rsplit(" ", 1)[0] + "..."


class LazyGroup(TyperGroup):
    """A typer group whose commands in COMMANDS are loaded on first use."""

    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *(name for name in COMMANDS if name not in self.commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            self.commands[cmd_name] = load_command(cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """The command list from the table: listing must not import the commands."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            if name in COMMANDS and name not in self.commands:
                rows.append((name, short_help(COMMANDS[name][1], limit)))
            else:
                rows.append((name, self.commands[name].get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)
