"""The evaluation report in a real headless browser: the summary table, the charts and every image load.

Skipped where no Chromium is installed (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from midms_cli.images import save_png
from midms_cli.report import write_report

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)  # fmt: skip

# A harness page: loads the report in an iframe, then writes what it found into its own DOM.
HARNESS = """<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="report" src="report.html" width="1200" height="800"></iframe>
<script>
document.getElementById("report").addEventListener("load", () => {
  const page = document.getElementById("report").contentDocument;
  const images = Array.from(page.querySelectorAll("img"));
  const report = {
    summary_rows: page.querySelectorAll("#summary tr[data-method]").length,
    best_cells: page.querySelectorAll("#summary td.best").length,
    charts: page.querySelectorAll("#charts svg rect").length,
    images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    first_section: page.querySelector("h2").textContent,
  };
  document.getElementById("result").textContent = JSON.stringify(report);
});
</script></body></html>"""


def _report(folder: Path) -> None:
    results = {
        "seeds": [0, 1],
        "methods": {
            "model": {"oracle_output_psnr": 21.0, "part_colour_error": 0.10, "swd_oracle": 20.0},
            "initial_warp": {"oracle_output_psnr": 21.5, "part_colour_error": 0.11, "swd_oracle": 30.0},
            "exemplar_copy": {"oracle_output_psnr": 17.0, "part_colour_error": 0.19, "swd_oracle": 15.0},
            "ceiling": {"oracle_output_psnr": 25.0, "part_colour_error": 0.05, "swd_oracle": 25.0},
        },
        "sd": {"model": {"oracle_output_psnr": 0.1}},
    }
    rows = []
    for i in range(3):
        row = {"label": f"pair {i}"}
        for column in ("condition", "exemplar", "output", "oracle"):
            path = f"images/{column}/{i}.png"
            save_png(torch.rand(3, 8, 8) * 2 - 1, folder / path)
            row[column] = path
        rows.append(row)
    protocol = {"primary_pairs": 3, "methods": {"model": "MIDMs", "ceiling": "ceiling"}, "weights": {}}
    write_report(folder / "report.html", title="test", results=results, protocol=protocol, rows=rows)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed")
def test_report_renders_its_table_charts_and_images_in_a_headless_browser(tmp_path):
    _report(tmp_path)
    (tmp_path / "harness.html").write_text(HARNESS)
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files",
        "--virtual-time-budget=5000", "--dump-dom", (tmp_path / "harness.html").as_uri(),
    ]  # fmt: skip
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    found = json.loads(dom.split('<pre id="result">', 1)[1].split("</pre>", 1)[0])
    assert found["first_section"] == "Results"  # the summary comes first
    assert found["summary_rows"] == 4
    # Best marked per column among competitors (the ceiling is a bound): PSNR (warp), colour (model),
    # SWD (copy).
    assert found["best_cells"] == 3
    assert found["charts"] == 4 * 3  # one bar per method and headline metric
    assert found["images"] == 12 and found["loaded"] == 12
