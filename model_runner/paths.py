"""Where kvproxy keeps files it builds or computes (the demo model, the fingerprint cache)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

CACHE_DIR_ENV = "KVPROXY_CACHE_DIR"


def default_cache_dir() -> Path:
    """The user cache dir (``~/.cache/kvproxy`` on Linux); ``KVPROXY_CACHE_DIR`` overrides it.

    Read at call time, never at import, so tests can point it at a temp dir per test.
    """
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("kvproxy", appauthor=False))
