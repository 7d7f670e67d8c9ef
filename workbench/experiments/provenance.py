"""Where a run's numbers came from: library versions, the workbench's commit, device and dtype.

Recorded in every run's ``config.json`` (``provenance``) so a table that mixes runs made with
different library versions can say so (:func:`version_differences`): bitsandbytes decides the
codes, torch the arithmetic, transformers and TransformerLens the forward passes.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from workbench import __version__
from workbench.core.device import module_device
from workbench.models.loaded import LoadedModel

LIBRARIES = ("torch", "transformers", "transformer-lens", "bitsandbytes")
"""The libraries whose versions can change a run's numbers."""


@dataclass(frozen=True)
class Provenance:
    """What produced a run (``config.json``: ``provenance``).

    Attributes:
        versions: library name → installed version (``LIBRARIES``, plus the workbench's own).
        commit: the workbench's git commit when it runs from a checkout (``+dirty`` with local
            changes), else ``None`` (an installed package).
        device: where the model ran (``cpu``, ``cuda:0``, …).
        dtype: the model's weights' storage dtype.
    """

    versions: dict[str, str]
    commit: str | None
    device: str
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def provenance(model: LoadedModel) -> Provenance:
    """The provenance of a run made now on ``model``."""
    weights = next(model.hf.parameters())
    return Provenance(versions={**library_versions(), "mansu-workbench": __version__}, commit=source_commit(),
                      device=str(module_device(model.hf)), dtype=str(weights.dtype).removeprefix("torch."))


@cache
def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@cache
def source_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` for local changes) when this module was first imported,
    or ``None`` outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


# Read when the code is imported, not when a run is saved: a run saved an hour after its process
# started (or by an app server that outlived several commits) ran the code of the launch commit.
source_commit()


def version_differences(configs: Iterable[Mapping[str, Any]], labels: Iterable[str]) -> list[str]:
    """One line per library whose version differs between runs (runs saved before provenance was
    recorded count as "unknown"), e.g. ``bitsandbytes: 0.50.2 (mansu, ga), 0.49.0 (npo)``."""
    seen: dict[str, dict[str, list[str]]] = {}
    for config, label in zip(configs, labels):
        versions = (config.get("provenance") or {}).get("versions") or {}
        for lib in (*LIBRARIES, "mansu-workbench"):
            seen.setdefault(lib, {}).setdefault(str(versions.get(lib, "unknown")), []).append(label)
    return [f"{lib}: " + ", ".join(f"{v} ({', '.join(who)})" for v, who in by_version.items())
            for lib, by_version in seen.items() if len(by_version) > 1]
