"""The HTML report: valid structure, escaped text, relative image paths."""

from __future__ import annotations

from html.parser import HTMLParser

from midms_cli.report import HEADLINES, best_methods, render_report, write_report


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in ("meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_report_is_balanced_html_with_relative_images_and_escaped_text(tmp_path):
    rows = [{"label": "a<b", "output": "images/output/a b.png", "oracle": None}]
    results = {"seeds": [0], "methods": {"model": {"oracle_output_psnr": 12.3456, "note": "x&y"}}, "sd": {}}
    page = render_report(
        title="eval <1>",
        results=results,
        protocol={"protocol_version": 2, "methods": {"model": "M<i>"}, "weights": {"inception-fid": "abc"}},
        rows=rows,
    )
    parser = _Collector()
    parser.feed(page)
    assert parser.errors == [] and parser.stack == []
    assert parser.images == ["images/output/a%20b.png"]
    assert "a&lt;b" in page and "eval &lt;1&gt;" in page and "M&lt;i&gt;" in page and "12.35" in page
    assert "inception-fid sha256" in page and "abc" in page  # the weights with their hashes
    assert page.startswith("<!DOCTYPE html>")
    # The summary comes before the samples, the protocol last.
    assert page.index('id="summary"') < page.index('id="samples"') < page.index("<h2>Protocol</h2>")
    empty = {"seeds": [0], "methods": {"model": {}}, "sd": {}}
    write_report(tmp_path / "report.html", title="t", results=empty, protocol={}, rows=[])
    assert (tmp_path / "report.html").read_text().rstrip().endswith("</html>")


def test_best_of_a_column_skips_the_ceiling_and_follows_the_metric_direction():
    methods = {
        "model": {"oracle_output_psnr": 20.0, "swd_oracle": 30.0},
        "exemplar_copy": {"oracle_output_psnr": 18.0, "swd_oracle": 20.0},
        "ceiling": {"oracle_output_psnr": 25.0, "swd_oracle": 10.0},
    }
    psnr, swd = (next(h for h in HEADLINES if h.key == key) for key in ("oracle_output_psnr", "swd_oracle"))
    assert best_methods(methods, psnr) == {"model"}  # higher is better; the ceiling is a bound
    assert best_methods(methods, swd) == {"exemplar_copy"}  # lower is better


def test_bar_chart_label_column_grows_with_the_longest_label():
    import re

    from midms_cli.report import _headlines, bar_chart

    results = {"methods": {"model": {"oracle_output_psnr": 19.0}, "no_mask": {"oracle_output_psnr": 18.0}}}
    headline = next(h for h in _headlines(results["methods"]) if h.key == "oracle_output_psnr")
    short = bar_chart(results, headline, {"model": "model", "no_mask": "no mask"})
    long_label = "- confidence mask (= the model's sampler: it has no re-warp to take out)"
    wide = bar_chart(results, headline, {"model": "model", "no_mask": long_label})
    left = [float(re.search(r'<rect x="([0-9.]+)"', svg).group(1)) for svg in (short, wide)]
    assert left[0] == 230 and left[1] >= 6 * len(long_label)
    assert f'width="{left[1] + 190:g}"' in wide
