"""`midms weights list|add|fetch|path`: the pretrained networks only a user can supply.

Other modules add subcommands (`import-ldm`, `import-midms`) with `register(weights_app)`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from midms_cli import weights as registry
from midms_cli.cli.state import STATE, emit, out_console

weights_app = typer.Typer(
    name="weights",
    help="List, add, fetch, import, export and locate pretrained weights (stored as safetensors).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

NAMES = ", ".join(registry.REGISTRY)


def _report(result: dict, line: str) -> None:
    """The JSON result, or one unwrapped line (paths stay copyable)."""
    if STATE.json:
        emit(result)
    else:
        out_console.print(line, soft_wrap=True, highlight=False)


def _checksum_text(source: dict) -> str:
    if source["sha256"] != "not published":
        return source["sha256"]
    if source["sha256_prefix"]:
        return f"{source['sha256_prefix']}… (full sha256 not published; prefix from the file name)"
    return "not published"


@weights_app.command("list")
def list_weights() -> None:
    """Every known artefact: expected SHA-256, whether it is present, and where it was looked for.

    Example: midms weights list --json
    """
    rows = registry.weight_status()
    if STATE.json:
        emit({"weights": rows})
        return
    for row in rows:
        state = "[green]present[/green]" if row["present"] else "[red]missing[/red]"
        lines = [f"[bold]{row['name']}[/bold]  {state}  {row['description']} (used by: {row['used_by']})"]
        for source in row["sources"]:
            checksum = _checksum_text(source)
            lines.append(f"  file {source['file']}  layout {source['layout']}  sha256 {checksum}")
            lines.append(f"    url {source['url'] or 'none known'}")
        lines += [f"  looked for {path}" for path in row["looked_for"]]
        originals = row["originals_found"]
        lines += [f"  original at {path} (checked and stored on first use)" for path in originals]
        for line in lines:
            out_console.print(line, soft_wrap=True, highlight=False)


@weights_app.command("add")
def add(
    name: str = typer.Argument(..., help=f"Artefact name: {NAMES}."),
    file: Path = typer.Argument(..., help="The original file (.pth/.ckpt, or a release .zip)."),
) -> None:
    """Verify FILE (checksum where published) and store it as $MIDMS_HOME/weights/NAME.safetensors.

    Example: midms weights add vgg19 ~/Downloads/vgg19-dcbb9e9d.pth
    """
    result = registry.add_weight(name, file)
    _report(result, f"stored {name} ({result['layout']}, {result['tensors']} tensors) at {result['path']}")


@weights_app.command("fetch")
def fetch(
    name: str = typer.Argument(..., help=f"Artefact name: {NAMES}."),
    force: bool = typer.Option(False, "--force", help="Download again even if NAME is already stored."),
    url: str = typer.Option(None, "--url", help="Download from this mirror instead of the known URL."),
) -> None:
    """Download NAME (resumable, progress on stderr), verify its checksum and store it.

    Example: midms weights fetch alexnet
    """
    stored = registry.stored_path(name)
    if stored.is_file() and not force:
        _report({"name": name, "path": str(stored), "skipped": True}, f"{name} is already stored at {stored}")
        return
    result = registry.fetch_weight(name, url=url)
    _report(result, f"stored {name} ({result['layout']}, {result['tensors']} tensors) at {result['path']}")


@weights_app.command("path")
def path(name: str = typer.Argument(..., help=f"Artefact name: {NAMES}.")) -> None:
    """Print where NAME is stored (a user error if it has not been added).

    Example: midms weights path vgg19
    """
    stored = registry.require_weight(name)
    if STATE.json:
        emit({"name": name, "path": str(stored)})
    else:
        print(stored)  # plain, never wrapped: scripts use $(midms weights path NAME)


def register(app: typer.Typer) -> None:
    from midms_cli.cli import export_ldm, export_model, import_ldm, import_midms

    import_ldm.register(weights_app)
    import_midms.register(weights_app)
    export_model.register(weights_app)
    export_ldm.register(weights_app)
    app.add_typer(weights_app, name="weights")
