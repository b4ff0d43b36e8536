"""A self-contained HTML report of an evaluation: the numbers, the protocol, and image grids.

Images are referenced by relative path (the PNGs beside the report), never embedded, so the
report stays small and the directory can be moved as a whole.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from midms_cli.atomic import write_text

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { width: 128px; height: 128px; image-rendering: pixelated; display: block; }
"""


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def _key_value_table(data: Mapping[str, Any]) -> str:
    rows = []
    for key, value in data.items():
        cell_class = ' class="num"' if isinstance(value, int | float) else ""
        rows.append(
            f"<tr><th>{html.escape(str(key))}</th><td{cell_class}>{html.escape(_format(value))}</td></tr>"
        )
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _image_grid(columns: Sequence[str], rows: Sequence[Mapping[str, str | None]]) -> str:
    header = "<tr><th>pair</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    body = []
    for row in rows:
        cells = [f"<td>{html.escape(str(row.get('label', '')))}</td>"]
        for column in columns:
            path = row.get(column)
            cells.append(
                f'<td><img src="{html.escape(quote(path))}" alt="{html.escape(column)}"></td>'
                if path
                else "<td>&ndash;</td>"
            )
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>\n" + header + "\n" + "\n".join(body) + "\n</table>"


def render_report(
    title: str,
    results: Mapping[str, Any],
    protocol: Mapping[str, Any],
    columns: Sequence[str],
    rows: Sequence[Mapping[str, str | None]],
) -> str:
    """The report page: results, image grid (one row per pair; paths relative to the report), protocol."""
    flat_protocol = {key: value for key, value in protocol.items() if not isinstance(value, dict | list)}
    nested = {key: value for key, value in protocol.items() if isinstance(value, dict)}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Results</h2>",
        _key_value_table(results),
    ]
    if rows:
        parts += ["<h2>Samples</h2>", _image_grid(columns, rows)]
    parts += ["<h2>Protocol</h2>", _key_value_table(flat_protocol)]
    for key, value in nested.items():
        parts += [f"<h3>{html.escape(key)}</h3>", _key_value_table(value)]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(path: str | Path, **content: Any) -> None:
    """Render and write the report atomically (see `render_report` for the arguments)."""
    write_text(path, render_report(**content))
