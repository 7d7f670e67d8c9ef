"""Where the workbench keeps built models (outside the repo) and saved runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Built models and filtered fact sets: ``$WORKBENCH_CACHE`` or ``~/.cache/mansu-workbench``."""
    root = os.environ.get("WORKBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mansu-workbench"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    """Saved unlearning runs: ``$WORKBENCH_RUNS`` or ``./runs``."""
    path = Path(os.environ.get("WORKBENCH_RUNS") or "runs")
    path.mkdir(parents=True, exist_ok=True)
    return path
