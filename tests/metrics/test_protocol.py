"""Pair lists, protocol records and the metric registry's selection rules."""

from __future__ import annotations

import pytest

from midms_cli.errors import MidmsError
from midms_cli.metrics import METRICS, select_metrics
from midms_cli.metrics.protocol import (
    PROTOCOL_VERSION,
    Pair,
    default_pairs,
    format_pairs,
    parse_pairs,
    protocol_record,
)


def test_default_pairs_group_own_pair_and_next_exemplars_by_condition():
    pairs = default_pairs(["a", "b", "c"], diversity_exemplars=2)
    assert pairs == [
        Pair("a", "a"),
        Pair("a", "b"),
        Pair("a", "c"),
        Pair("b", "b"),
        Pair("b", "c"),
        Pair("b", "a"),
        Pair("c", "c"),
        Pair("c", "a"),
        Pair("c", "b"),
    ]
    assert [p.primary for p in pairs].count(True) == 3
    assert default_pairs(["a", "b"], diversity_exemplars=5) == [
        Pair("a", "a"),
        Pair("a", "b"),
        Pair("b", "b"),
        Pair("b", "a"),
    ]
    assert default_pairs(["a"], diversity_exemplars=2) == [Pair("a", "a")]
    # --limit keeps the first conditions; their diversity exemplars still come from the whole split.
    assert default_pairs(["a", "b", "c"], 1, limit=1) == [Pair("a", "a"), Pair("a", "b")]


def test_pair_list_round_trip_and_errors():
    pairs = [Pair("x1", "x1"), Pair("x1", "y2")]
    assert parse_pairs("# header\n" + format_pairs(pairs) + "\n") == pairs
    with pytest.raises(MidmsError, match="line 2: expected `CONDITION_KEY EXEMPLAR_KEY`"):
        parse_pairs("a b\nc\n", "pairs.txt")
    with pytest.raises(MidmsError, match="holds no pairs"):
        parse_pairs("# nothing\n")


def test_protocol_record_carries_versions():
    record = protocol_record(size=64)
    assert record["protocol_version"] == PROTOCOL_VERSION == 2 and record["size"] == 64
    assert "package_version" in record


def test_selection_follows_registry_order_and_skips_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDMS_HOME", str(tmp_path))
    lines = []
    chosen = select_metrics(None, report=lines.append)
    assert chosen == ["swd", "oracle"]  # nothing else has its weights
    assert len(lines) == len(METRICS) - 2
    assert all("`midms weights add" in line for line in lines)
    assert select_metrics(None, has_oracle=False, report=lines.append) == ["swd"]
    assert select_metrics(["oracle", "swd"]) == ["swd", "oracle"]
    with pytest.raises(MidmsError, match="needs oracle images"):
        select_metrics(["oracle"], has_oracle=False)
    with pytest.raises(MidmsError, match="`midms weights add vgg19 FILE`"):
        select_metrics(["style"])
