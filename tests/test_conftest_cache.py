"""The test session's cache is its own (tests/conftest.py), with the built models shared."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import SESSION_CACHE

from workbench.core.paths import cache_dir


def test_the_cache_is_per_session_and_shares_only_built_models():
    user_cache = Path(os.path.expanduser("~/.cache/mansu-workbench")).resolve()
    assert cache_dir() == SESSION_CACHE and cache_dir().resolve() != user_cache
    assert (cache_dir() / "models").is_symlink()
    assert not (cache_dir() / "models").resolve().is_relative_to(cache_dir().resolve())
