"""Allocator settings: fixing glibc's mmap threshold is accepted where glibc is the C library."""

from __future__ import annotations

import platform
import sys

import pytest

from midms_cli.memory import map_large_blocks


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc only")
def test_map_large_blocks_is_accepted_by_glibc():
    assert map_large_blocks() is True


def test_map_large_blocks_leaves_other_platforms_alone(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert map_large_blocks() is False
