"""The HTML report of a model evaluation: a page to read, top to bottom.

First one table with a row per method (the model, its ablations, the baselines) and a column per
headline metric, mean ± sd over the noise seeds, the best of each column marked; then the same as
bar charts; then the sample grid with captions; per-part numbers folded away; the protocol last.
The page is one file with inline styles and SVG; the images are the PNGs beside it (relative
paths), so the evaluation folder can be moved as a whole.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from midms_cli.atomic import write_text


@dataclass(frozen=True)
class Headline:
    """A headline metric: its key in results.json, column title, and which direction is better."""

    key: str
    title: str
    higher_is_better: bool


HEADLINES = (
    Headline("oracle_output_psnr", "oracle PSNR (dB)", True),
    Headline("oracle_output_l1", "oracle L1", False),
    Headline("part_colour_error", "part colour error", False),
    Headline("swd_oracle", "SWD vs oracles (x1e3)", False),
    Headline("swd", "SWD vs sources (x1e3)", False),
    Headline("fid", "FID vs sources", False),
    Headline("kid", "KID vs sources", False),
    Headline("lpips_diversity", "LPIPS diversity", True),
    Headline("style_colour", "style: colour", True),
    Headline("style_texture", "style: texture", True),
)
# Rows that are bounds or references rather than competitors: never marked best.
NOT_COMPETING = ("ceiling",)
SAMPLE_COLUMNS = ("condition", "exemplar", "output", "initial warp", "oracle", "source")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.best { font-weight: bold; background: #e6f4e6; }
tr.bound td { color: #666; font-style: italic; }
.note { color: #555; font-size: 0.92em; max-width: 60em; }
.charts { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure { margin: 0; } figcaption { font-size: 0.9em; color: #444; text-align: center; }
img.sample { width: 96px; height: 96px; image-rendering: pixelated; display: block; }
details { margin: 0.6em 0; } summary { cursor: pointer; font-weight: bold; }
"""


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}" if abs(value) < 1000 else f"{value:.1f}"
    return html.escape(str(value))


def _cell(mean: Any, sd: Any) -> str:
    return _number(mean) if sd is None else f"{_number(mean)} &plusmn; {_number(sd)}"


def _headlines(methods: Mapping[str, Mapping[str, Any]]) -> list[Headline]:
    """The headline metrics present for at least one method, in HEADLINES order."""
    return [h for h in HEADLINES if any(isinstance(row.get(h.key), int | float) for row in methods.values())]


def best_methods(methods: Mapping[str, Mapping[str, Any]], headline: Headline) -> set[str]:
    """The competing methods with the best value of a headline metric (ties all marked)."""
    values = {
        name: row[headline.key]
        for name, row in methods.items()
        if name not in NOT_COMPETING and isinstance(row.get(headline.key), int | float)
    }
    if not values:
        return set()
    target = max(values.values()) if headline.higher_is_better else min(values.values())
    return {name for name, value in values.items() if value == target}


def summary_table(results: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    methods, spreads = results["methods"], results.get("sd", {})
    headlines = _headlines(methods)
    best = {h.key: best_methods(methods, h) for h in headlines}
    header = "<tr><th>method</th>" + "".join(
        f"<th>{html.escape(h.title)} {'&uarr;' if h.higher_is_better else '&darr;'}</th>" for h in headlines
    ) + "</tr>"  # fmt: skip
    rows = []
    for name, row in methods.items():
        cells = [f"<td>{html.escape(labels.get(name, name))}</td>"]
        for h in headlines:
            if not isinstance(row.get(h.key), int | float):
                cells.append('<td class="num">&ndash;</td>')
                continue
            css = "num best" if name in best[h.key] else "num"
            cells.append(f'<td class="{css}">{_cell(row[h.key], spreads.get(name, {}).get(h.key))}</td>')
        bound = ' class="bound"' if name in NOT_COMPETING else ""
        rows.append(f'<tr{bound} data-method="{html.escape(name)}">' + "".join(cells) + "</tr>")
    return '<table id="summary">\n' + header + "\n" + "\n".join(rows) + "\n</table>"


def bar_chart(results: Mapping[str, Any], headline: Headline, labels: Mapping[str, str]) -> str:
    """One horizontal bar per method (SVG), with a whisker of ± one sd when there are seeds."""
    methods, spreads = results["methods"], results.get("sd", {})
    values = {n: r[headline.key] for n, r in methods.items() if isinstance(r.get(headline.key), int | float)}
    if not values:
        return ""
    # The label column grows with the longest label (about 6 px per character at font size 11).
    longest = max(len(labels.get(name, name)) for name in values)
    bar, gap, left = 16, 6, max(230, 6 * longest + 12)
    width = left + 190
    top = max(max(values.values()), 1e-12)
    scale = (width - left - 60) / top
    height = len(values) * (bar + gap) + gap
    best = best_methods(methods, headline)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for i, (name, value) in enumerate(values.items()):
        y = gap + i * (bar + gap)
        length = max(value, 0.0) * scale
        colour = "#3a7d3a" if name in best else "#999" if name in NOT_COMPETING else "#5b7fb3"
        label = html.escape(labels.get(name, name))
        parts.append(
            f'<text x="{left - 6}" y="{y + bar - 4}" font-size="11" text-anchor="end">{label}</text>'
        )
        parts.append(f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar}" fill="{colour}"/>')
        sd = spreads.get(name, {}).get(headline.key)
        if sd:
            lo, hi = left + max(value - sd, 0.0) * scale, left + (value + sd) * scale
            parts.append(
                f'<line x1="{lo:.1f}" x2="{hi:.1f}" y1="{y + bar / 2}" y2="{y + bar / 2}" stroke="#222"/>'
            )
        parts.append(
            f'<text x="{left + length + 4:.1f}" y="{y + bar - 4}" font-size="11">{_number(value)}</text>'
        )
    parts.append("</svg>")
    arrow = "higher is better" if headline.higher_is_better else "lower is better"
    return (
        f"<figure>{''.join(parts)}<figcaption>{html.escape(headline.title)} ({arrow})</figcaption></figure>"
    )


def sample_grid(rows: Sequence[Mapping[str, str | None]]) -> str:
    columns = [c for c in SAMPLE_COLUMNS if any(row.get(c) for row in rows)]
    header = "<tr><th>pair</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    body = []
    for row in rows:
        cells = [f"<td>{html.escape(str(row.get('label', '')))}</td>"]
        for column in columns:
            path = row.get(column)
            cells.append(
                f'<td><img class="sample" src="{html.escape(quote(path))}" alt="{html.escape(column)}" '
                f'title="{html.escape(column)}"></td>'
                if path
                else "<td>&ndash;</td>"
            )
        body.append("<tr>" + "".join(cells) + "</tr>")
    return '<table id="samples">\n' + header + "\n" + "\n".join(body) + "\n</table>"


def per_part_tables(results: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """Per-region numbers (keys with a region suffix), one folded table per metric family."""
    methods = results["methods"]
    families = (
        ("oracle_output_psnr_", "oracle PSNR per part (dB)"),
        ("oracle_output_l1_", "oracle L1 per part"),
        ("part_colour_error_", "colour error per region"),
        ("swd_oracle_", "SWD vs oracles per level"),
        ("swd_", "SWD vs sources per level"),
    )
    out = []
    for prefix, title in families:
        keys = sorted(
            {
                k
                for row in methods.values()
                for k in row
                if k.startswith(prefix)
                and not any(k.startswith(p) for p, _ in families if p != prefix and p.startswith(prefix))
            }
        )
        if not keys:
            continue
        header = "<tr><th>region</th>" + "".join(
            f"<th>{html.escape(labels.get(n, n))}</th>" for n in methods) + "</tr>"  # fmt: skip
        body = [
            f"<tr><td>{html.escape(key[len(prefix) :])}</td>"
            + "".join(f'<td class="num">{_number(row.get(key, "-"))}</td>' for row in methods.values())
            + "</tr>"
            for key in keys
        ]
        out.append(
            f"<details><summary>{html.escape(title)}</summary><table>{header}{''.join(body)}</table></details>"
        )
    return "\n".join(out)


def _key_value_table(data: Mapping[str, Any]) -> str:
    rows = []
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        css = ' class="num"' if isinstance(value, int | float) else ""
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td{css}>{_number(value)}</td></tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def protocol_section(protocol: Mapping[str, Any]) -> str:
    flat = {k: v for k, v in protocol.items() if not isinstance(v, dict)}
    parts = [_key_value_table(flat)]
    weights = protocol.get("weights") or {}
    parts.append("<h3>weights</h3>")
    parts.append(
        _key_value_table(
            {"model file": protocol.get("model", "model"), "sha256": protocol.get("model_hash", "")}
        )
    )
    if weights:
        parts.append(_key_value_table({f"{name} sha256": digest for name, digest in weights.items()}))
    else:
        parts.append(
            '<p class="note">No metric network was used (FID, LPIPS and the VGG metrics need '
            "weights added with <code>midms weights add</code>; they were skipped).</p>"
        )
    for key, value in protocol.items():
        if isinstance(value, dict) and key != "weights" and value:
            parts += [f"<h3>{html.escape(key)}</h3>", _key_value_table(value)]
    return "\n".join(parts)


def render_report(
    title: str,
    results: Mapping[str, Any],
    protocol: Mapping[str, Any],
    rows: Sequence[Mapping[str, str | None]],
    notes: Sequence[str] = (),
) -> str:
    """The report page (see the module docstring); `results` as `evaluate_model` returns them."""
    labels = dict(protocol.get("methods") or {})
    seeds = results.get("seeds", [])
    spread = f"mean &plusmn; sd over {len(seeds)} noise seeds" if len(seeds) > 1 else "one noise seed"
    headlines = _headlines(results["methods"])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *[f'<p class="note"><strong>{html.escape(note)}</strong></p>' for note in notes],
        f'<h2>Results</h2><p class="note">{protocol.get("primary_pairs", "?")} pairs, {spread}. '
        "Best of each column in bold (the ceiling row is a bound, not a competitor). Oracle = the "
        "condition's geometry in the exemplar's appearance; part colour error = distance between the "
        "mean colours of each labelled region of the output and of the oracle.</p>",
        summary_table(results, labels),
        '<h2>Chart</h2><div class="charts" id="charts">',
        *[bar_chart(results, h, labels) for h in headlines],
        "</div>",
    ]
    if rows:
        parts += ["<h2>Samples</h2>", '<p class="note">Each row: the condition, the exemplar, the '
                  "model's output, the initial warp decoded without diffusion, the oracle (the right "
                  "answer) and the condition's own photo.</p>", sample_grid(rows)]  # fmt: skip
    parts += ["<h2>Per part</h2>", per_part_tables(results, labels) or '<p class="note">none</p>']
    parts += ["<h2>Protocol</h2>", protocol_section(protocol), "</body></html>"]
    return "\n".join(parts) + "\n"


def write_report(path: str | Path, **content: Any) -> None:
    """Render and write the report atomically (see `render_report` for the arguments)."""
    write_text(path, render_report(**content))
