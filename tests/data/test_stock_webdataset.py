"""Our shards are standard WebDataset: the README's three lines read them with stock webdataset."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from midms_cli.cli.app import main
from midms_cli.data.shards import decoded_shard

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_lines() -> str:
    """The Python block after the `stock-webdataset` marker, unindented."""
    text = README.read_text()
    block = re.search(r"<!-- stock-webdataset -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert block, "README lost its stock-webdataset example"
    return "\n".join(line.strip() for line in block.group(1).splitlines())


def test_the_readme_lines_read_our_shards(tmp_path, monkeypatch):
    pytest.importorskip("webdataset")
    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for index in range(40):  # enough that the hashed split puts some in val
        photo = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(photo).save(tmp_path / "photos" / f"{index:02d}.png")
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "folder", "--source", str(tmp_path / "photos"), "--out",
              str(tmp_path / "shards/synth"), "--size", "32", "--split", "val", "--limit", "2"])
    assert exit_info.value.code in (0, None)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(readme_lines(), scope)  # exactly the README's lines
    sample = scope["sample"]
    ours = next(decoded_shard(tmp_path / "shards/synth/val/shard-000000.tar"))
    assert sample["__key__"] == ours["meta"]["key"]
    image = ((ours["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    np.testing.assert_array_equal(sample["image.png"], image)
    levels = np.round(ours["cond"].numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(sample["cond.npy.gz"], levels)
