"""Shipped text speaks for itself: no section numbers of documents that are not shipped."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["midms_cli", "plugins", "benchmarks", "examples", "README.md", "CHANGELOG.md", "pyproject.toml"]
CITATION = re.compile(r"\b[Ss]pec (\d|Appendix)|\barchitecture( section)? ?\d|architecture\.md|midms-spec")
# Still to reword (their owners are rewriting them): drop each entry once it is clean.
NOT_YET: set[str] = set()


def _files():
    for entry in SHIPPED:
        path = ROOT / entry
        yield from ([path] if path.is_file() else sorted(path.rglob("*")))


def test_no_citations_of_unshipped_documents():
    found = []
    for path in _files():
        name = path.relative_to(ROOT).as_posix()
        if path.suffix not in (".py", ".md", ".toml", ".txt") or name in NOT_YET:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if CITATION.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
