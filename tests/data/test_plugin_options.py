"""Plugin options: typed resolution, choices and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_dataset import PLUGIN

from midms_cli.data.plugin import PluginOption, check_key, default_options, index_rng, resolve_options
from midms_cli.errors import MidmsError


def test_resolve_options_converts_types_and_keeps_defaults():
    resolved = resolve_options(PLUGIN, {"count": "7", "mode": "b"})
    assert resolved == {"channels": 2, "count": 7, "bad": "", "mode": "b"}
    assert default_options(PLUGIN)["count"] == 10


def test_resolve_options_errors_name_the_option():
    with pytest.raises(MidmsError, match="no option 'colour'.*--channels"):
        resolve_options(PLUGIN, {"colour": "red"})
    with pytest.raises(MidmsError, match="--mode must be one of a, b"):
        resolve_options(PLUGIN, {"mode": "c"})
    with pytest.raises(MidmsError, match="--count"):
        resolve_options(PLUGIN, {"count": "many"})


def test_bool_and_path_options():
    class P:
        name = "p"
        options = (PluginOption("flip", bool, False, "h"), PluginOption("list_file", Path, None, "h"))

    assert resolve_options(P, {"flip": "yes", "list_file": "~/x.txt"}) == {
        "flip": True, "list_file": Path("~/x.txt").expanduser(),
    }  # fmt: skip
    assert PluginOption("list_file", Path, None, "h").flag == "--list-file"


def test_keys_without_dots_and_index_rng_depends_only_on_seed_split_index():
    assert check_key("train0001") == "train0001"
    with pytest.raises(ValueError):
        check_key("a.b")
    assert index_rng(1, "train", 5).random() == index_rng(1, "train", 5).random()
    assert index_rng(1, "train", 5).random() != index_rng(1, "val", 5).random()
