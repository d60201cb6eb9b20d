"""Where mpsearch keeps data it downloads and artifacts it trains (overridable by environment)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """``$MPSEARCH_CACHE`` if set, else ``~/.cache/mpsearch``."""
    env = os.environ.get("MPSEARCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mpsearch"
