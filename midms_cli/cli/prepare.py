"""`midms prepare NAME`: one sub-command per installed dataset plugin, its options built from the plugin.

The commands are derived from the `midms.datasets` entry points when the CLI runs, so
`midms prepare --help` lists exactly what is installed and `midms prepare NAME --help` shows that
plugin's own options next to the common ones.
"""

from __future__ import annotations

import enum
import inspect
from pathlib import Path
from typing import Any

import typer
import typer.main
from typer.core import TyperGroup

from midms_cli.cli.state import emit, err_console, progress_bar
from midms_cli.data.plugin import SPLITS, PluginOption
from midms_cli.data.registry import discover, get_plugin
from midms_cli.errors import MidmsError
from midms_cli.pipelines.prepare import PrepareConfig, prepare

COMMON_PANEL = "Preparation"
PLUGIN_PANEL = "Dataset options"
SplitChoice = enum.Enum("SplitChoice", {name: name for name in (*SPLITS, "all")}, type=str)


def _parameter(name: str, annotation: Any, option: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _common_parameters(needs_source: bool) -> list[inspect.Parameter]:
    """The options every `midms prepare NAME` command has."""
    source_help = "Folder of the raw dataset." if needs_source else "Not used: this dataset is generated."
    table: list[tuple[str, Any, Any, list[str], str, dict[str, Any]]] = [
        ("source", Path | None, None, ["--source"], source_help, {}),
        ("out", Path, ..., ["--out", "-o"], "Output folder: OUT/{train,val}/shard-*.tar + index.json.", {}),
        ("size", int, 256, ["--size"], "Image size in pixels (square).", {"min": 8}),
        ("split", SplitChoice, "all", ["--split"], "Which split to write.", {}),
        ("limit", int | None, None, ["--limit"], "At most this many samples per split.", {"min": 0}),
        ("shard_size", int, 256, ["--shard-size"], "Samples per shard.", {"min": 1}),
        ("workers", int, 1, ["--workers"], "Processes writing shards in parallel.", {"min": 1}),
        ("seed", int, 0, ["--seed"], "Seed of pairing and generation (same seed, same shards).", {}),
        ("strict", bool, False, ["--strict/--no-strict"], "Stop at the first bad source file.", {}),
    ]
    return [
        _parameter(name, annotation, typer.Option(default, *flags, help=text, show_default=True,
                                                  rich_help_panel=COMMON_PANEL, **extra))
        for name, annotation, default, flags, text, extra in table
    ]  # fmt: skip


def _plugin_parameter(option: PluginOption) -> inspect.Parameter:
    """A Typer option for one declared plugin option (underscores become dashes in the flag)."""
    panel = {"rich_help_panel": PLUGIN_PANEL, "show_default": True, "help": option.help}
    if option.type is bool:
        flag = f"{option.flag}/--no-{option.flag[2:]}"
        return _parameter(option.name, bool, typer.Option(bool(option.default), flag, **panel))
    if option.choices is not None:
        choices = enum.Enum(f"{option.name}_choice", {c: c for c in option.choices}, type=str)
        return _parameter(option.name, choices, typer.Option(option.default, option.flag, **panel))
    annotation = option.type if option.type in (int, float, str, Path) else str
    if option.default is None:
        annotation = annotation | None
    return _parameter(option.name, annotation, typer.Option(option.default, option.flag, **panel))


def _command_line(name: str, params: dict[str, Any]) -> str:
    """The resolved invocation, recorded in index.json so a preparation can be repeated exactly."""
    parts = ["midms", "prepare", name]
    for key, value in params.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag[2:]}")
        else:
            parts += [flag, str(value)]
    return " ".join(parts)


def _run(name: str, params: dict[str, Any]) -> None:
    plugin = get_plugin(name)
    options = {opt.name: params.pop(opt.name) for opt in plugin.options}
    common = params  # what is left: the options of `_common_parameters`
    config = PrepareConfig(
        dataset=name, out=common["out"], source=common["source"], size=common["size"],
        splits=SPLITS if common["split"] == "all" else (common["split"],), limit=common["limit"],
        shard_size=common["shard_size"], workers=common["workers"], seed=common["seed"],
        strict=common["strict"], options=options,
        command=_command_line(name, {**common, **options}),
    )  # fmt: skip
    with progress_bar() as bar:
        tasks: dict[str, Any] = {}

        def progress(split_name: str, done: int, total: int) -> None:
            if split_name not in tasks:
                tasks[split_name] = bar.add_task(f"{name} {split_name}", total=total)
            bar.advance(tasks[split_name], done)

        def report(line: str) -> None:  # warnings above the bar, one line each
            bar.console.print(line, soft_wrap=True, highlight=False)

        result = prepare(config, plugin, progress=progress, report=report)
    for split_name, s in result["splits"].items():
        if not s["count"]:  # e.g. a handful of photos, hashed into splits, leaves val empty
            err_console.print(
                f"warning: split {split_name!r} has 0 samples; `midms eval` and training need some: "
                "give more source items (or the plugin's split lists, see --help)",
                highlight=False, markup=False, soft_wrap=True,
            )
    lines = [f"{split_name}: {s['count']} samples in {s['shards']} shard(s)"
             + (f", {s['skipped']} skipped" if s["skipped"] else "")
             for split_name, s in result["splits"].items()]  # fmt: skip
    emit(result, "\n".join([f"wrote {config.out}", *lines]))


RESERVED = {"source", "out", "size", "split", "limit", "shard_size", "workers", "seed", "strict"}


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _typer_command(
    name: str, parameters: list[inspect.Parameter], callback: Any, help_text: str, lenient: bool = False
) -> Any:
    """A click command built by Typer from a function with the given (dynamic) signature."""

    def command(**kwargs: Any) -> None:
        callback({key: _plain(value) for key, value in kwargs.items()})

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__doc__ = help_text
    mini = typer.Typer(rich_markup_mode=None, add_completion=False)
    # A broken plugin's command accepts any arguments, so its error (not "no such option") is shown.
    settings = {"allow_extra_args": True, "ignore_unknown_options": True} if lenient else None
    mini.command(name=name, context_settings=settings)(command)
    return typer.main.get_command(mini)


def _plugin_command(name: str, plugin: Any) -> Any:
    clashes = [opt.name for opt in plugin.options if opt.name in RESERVED]
    if clashes:
        return _broken_command(name, f"its option(s) {', '.join(clashes)} clash with midms prepare's own")
    parameters = _common_parameters(plugin.needs_source) + [_plugin_parameter(opt) for opt in plugin.options]
    example = (
        f"midms prepare {name} " + ("--source DIR " if plugin.needs_source else "") + f"--out shards/{name}"
    )
    return _typer_command(name, parameters, lambda params: _run(name, params),
                          f"{plugin.description}\n\nExample: {example}")  # fmt: skip


def _broken_command(name: str, reason: str) -> Any:
    def fail(params: dict[str, Any]) -> None:
        raise MidmsError(f"dataset plugin {name!r} is installed but broken: {reason}")

    return _typer_command(name, [], fail, f"[broken] {reason}", lenient=True)


class PrepareGroup(TyperGroup):
    """A command group whose sub-commands are the installed dataset plugins, built on demand."""

    def list_commands(self, ctx: Any) -> list[str]:
        found = discover()
        return sorted([*found.plugins, *found.broken])

    def get_command(self, ctx: Any, name: str) -> Any:
        found = discover()
        if name in found.plugins:
            return _plugin_command(name, found.plugins[name])
        if name in found.broken:
            return _broken_command(name, found.broken[name])
        return None

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and not args[0].startswith("-") and self.get_command(ctx, args[0]) is None:
            get_plugin(args[0])  # raises the one-line "unknown dataset ...; installed plugins: ..." error
        return super().resolve_command(ctx, args)


prepare_app = typer.Typer(cls=PrepareGroup, no_args_is_help=True, rich_markup_mode=None)


@prepare_app.callback()
def _prepare_group() -> None:
    """Turn a raw dataset into WebDataset shards (OUT/{train,val}/shard-*.tar + index.json).

    One sub-command per installed dataset plugin (see `midms datasets`).
    Example: midms prepare synthfaces --out shards/synth --size 64 --limit 200
    """


def register(app: typer.Typer) -> None:
    app.add_typer(prepare_app, name="prepare", help="Turn a raw dataset into WebDataset shards.")
