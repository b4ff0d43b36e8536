"""The HTML report: valid structure, escaped text, relative image paths."""

from __future__ import annotations

from html.parser import HTMLParser

from midms_cli.report import render_report, write_report


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
    page = render_report(
        title="eval <1>",
        results={"fid": 12.3456, "note": "x&y"},
        protocol={"protocol_version": 1, "weights": {"inception-fid": "abc"}},
        columns=["output", "oracle"],
        rows=rows,
    )
    parser = _Collector()
    parser.feed(page)
    assert parser.errors == [] and parser.stack == []
    assert parser.images == ["images/output/a%20b.png"]
    assert "a&lt;b" in page and "eval &lt;1&gt;" in page and "x&amp;y" in page and "12.3456" in page
    assert page.startswith("<!DOCTYPE html>")
    write_report(tmp_path / "report.html", title="t", results={}, protocol={}, columns=[], rows=[])
    assert (tmp_path / "report.html").read_text().rstrip().endswith("</html>")
