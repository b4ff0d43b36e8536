"""Where midms keeps its cache: $MIDMS_HOME, default ~/.cache/midms."""

from __future__ import annotations

import os
from pathlib import Path


def midms_home() -> Path:
    """The cache directory (not created here)."""
    env = os.environ.get("MIDMS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "midms"


def weights_dir() -> Path:
    return midms_home() / "weights"
