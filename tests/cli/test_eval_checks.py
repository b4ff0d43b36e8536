"""`midms eval` on shards that cannot be evaluated: one clear line and exit 2, before any work;
`midms prepare` warns when a split comes out empty."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from midms_cli.cli.app import main
from midms_cli.data.shards import SHARD_FORMAT_VERSION


def _run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return (info.value.code or 0), out, err


def _index(root, split, kind, channels, count):
    (root / split).mkdir(parents=True)
    condition = {"kind": kind, "channels": channels}
    index = {"format_version": SHARD_FORMAT_VERSION, "shards": [], "count": count, "condition": condition}
    (root / split / "index.json").write_text(json.dumps(index))


def test_a_condition_mismatch_is_one_line(tmp_path, capsys):
    """The bundled model takes Canny edges (1 channel); 15-channel part maps are refused by name."""
    _index(tmp_path / "shards", "val", "celebahq-edges", 15, 3)
    code, out, err = _run(["eval", "--data", str(tmp_path / "shards"), "-o", str(tmp_path / "eval")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "takes 'canny' conditions (1 channels)" in err and "'celebahq-edges' (15 channels)" in err
    assert not (tmp_path / "eval").exists()


def test_an_empty_split_exits_2(tmp_path, capsys):
    _index(tmp_path / "shards", "val", "canny", 1, 0)
    code, out, err = _run(["eval", "--data", str(tmp_path / "shards"), "-o", str(tmp_path / "eval")], capsys)
    assert code == 2 and "split 'val' of" in err and "holds no samples" in err
    assert not (tmp_path / "eval").exists()


def test_prepare_warns_about_an_empty_split(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "photos" / "a.png")
    code, out, err = _run(["prepare", "folder", "--source", str(tmp_path / "photos"), "--out",
                           str(tmp_path / "shards"), "--size", "32"], capsys)
    assert code == 0, err
    counts = {split: json.loads((tmp_path / "shards" / split / "index.json").read_text())["count"]
              for split in ("train", "val")}
    assert sorted(counts.values()) == [0, 1]
    empty = next(split for split, count in counts.items() if count == 0)
    assert f"warning: split {empty!r} has 0 samples" in err
