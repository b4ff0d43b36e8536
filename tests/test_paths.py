"""The cache directory: $MIDMS_HOME when set, else ~/.cache/midms; weights live in its weights/."""

from __future__ import annotations

from midms_cli.paths import midms_home, weights_dir


def test_default_is_dot_cache_midms_in_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MIDMS_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert midms_home() == tmp_path / ".cache" / "midms"
    monkeypatch.setenv("MIDMS_HOME", "")  # set but empty counts as unset
    assert midms_home() == tmp_path / ".cache" / "midms"


def test_midms_home_overrides_and_expands_the_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MIDMS_HOME", "~/store")
    assert midms_home() == tmp_path / "store"
    assert weights_dir() == tmp_path / "store" / "weights"
    assert not (tmp_path / "store").exists()  # looking a path up creates nothing
