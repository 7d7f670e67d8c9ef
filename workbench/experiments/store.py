"""The run store: every unlearning run saved atomically, listable and reopenable.

A run is a directory ``<root>/<run id>/`` holding

- ``config.json``   what was asked (model, split, method, hyper-parameters, quantizer),
- ``circuit.json``  the circuit the method used (if any),
- ``metrics.json``  everything measured (:class:`~workbench.measurement.results.RunMetrics`),
- ``history.json``  per-step records (for live and replayed plots),
- ``update.safetensors`` the update itself (sparse where sparse).

It is written into a hidden temporary directory and renamed into place in one step, so a
run killed mid-way never leaves a directory that :func:`list_runs` shows as complete.
Run ids are checked so that no id from a user or the UI can point outside the root.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.core.errors import WorkbenchError
from workbench.core.files import parse_json
from workbench.core.paths import runs_dir
from workbench.measurement.results import RunMetrics
from workbench.models.update import Update

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")  # \Z: "$" would accept a trailing newline
REQUIRED = ("config.json", "metrics.json", "update.safetensors")


@dataclass
class Run:
    """A saved run, as read back from disk (the update is loaded lazily)."""

    id: str
    path: Path
    config: dict[str, Any]
    metrics: RunMetrics
    history: list[dict[str, Any]]

    @property
    def circuit_path(self) -> Path | None:
        p = self.path / "circuit.json"
        return p if p.exists() else None

    def update(self) -> Update:
        return Update.load(self.path / "update.safetensors")


def _root(root: str | os.PathLike[str] | None) -> Path:
    path = Path(root) if root is not None else runs_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_run_id(run_id: str) -> str:
    """Refuse ids that are not plain names (no separators, no ``..``, no hidden files)."""
    if not isinstance(run_id, str) or not _ID_RE.match(run_id) or ".." in run_id:
        raise WorkbenchError(f"invalid run id {run_id!r}: use letters, digits, '.', '_' and '-' only")
    return run_id


def new_run_id(method: str, model: str) -> str:
    model_tag = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(model).name or model)[:32].strip("-") or "model"
    method_tag = re.sub(r"[^A-Za-z0-9_-]+", "-", method)[:32]
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{method_tag}-{model_tag}-{secrets.token_hex(2)}"


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def save_run(
    *,
    config: dict[str, Any],
    metrics: RunMetrics,
    update: Update,
    history: list[dict[str, Any]] | None = None,
    circuit_json: str | None = None,
    run_id: str | None = None,
    root: str | os.PathLike[str] | None = None,
) -> Run:
    """Write a run atomically and return it."""
    base = _root(root)
    run_id = check_run_id(run_id or new_run_id(str(config.get("method", "run")), str(config.get("model", "model"))))
    target = base / run_id
    if target.exists():
        raise WorkbenchError(f"run {run_id} already exists in {base}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_id}.", dir=base))
    try:
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "history.json", history or [])
        if circuit_json is not None:
            (tmp / "circuit.json").write_text(circuit_json)
        update.save(tmp / "update.safetensors")
        # metrics.json last: its presence in a finished directory is what "complete" means.
        _write_json(tmp / "metrics.json", metrics.saved_as(run_id).to_json())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_run(run_id, root=base)


def load_run(run_id: str, *, root: str | os.PathLike[str] | None = None) -> Run:
    base = _root(root)
    path = base / check_run_id(run_id)
    if not path.is_dir():
        raise WorkbenchError(f"no run {run_id!r} in {base}")
    missing = [f for f in REQUIRED if not (path / f).exists()]
    if missing:
        raise WorkbenchError(f"run {run_id} is incomplete (missing {', '.join(missing)})")
    # parse_json: a damaged or hostile file (deep nesting, a 5,000-digit integer) is refused with a
    # message naming it, never a RecursionError or ValueError out of the json module.
    config = _read_json(path / "config.json", run_id)
    metrics = _read_json(path / "metrics.json", run_id)
    history_file = path / "history.json"
    history = _read_json(history_file, run_id) if history_file.exists() else []
    if not isinstance(config, dict):
        raise WorkbenchError(f"run {run_id}: config.json must hold a JSON object")
    if not isinstance(history, list):
        raise WorkbenchError(f"run {run_id}: history.json must hold a JSON list")
    source = f"run {run_id} ({path / 'metrics.json'})"
    return Run(id=run_id, path=path, config=config, metrics=RunMetrics.from_json(metrics, source=source),
               history=history)


def _read_json(path: Path, run_id: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise WorkbenchError(f"run {run_id}: damaged JSON in {path.name} (not UTF-8: {exc.reason})") from None
    # allow_nan: metrics.json says "not measured" with NaN (e.g. paraphrase top-1 without paraphrases)
    return parse_json(text, source=f"run {run_id}: damaged JSON in {path.name}", allow_nan=True)


def resolve_run(ref: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None) -> Run:
    """A saved run named by its id (looked up in ``root``) or by its directory (the path
    ``unlearn`` and :func:`save_run` report), so runs from different roots can be opened together.

    An id is tried first; a directory is read from its own parent. Neither is a clear error."""
    text = os.fspath(ref)
    base = _root(root)
    if _ID_RE.match(text) and ".." not in text and (base / text).is_dir():
        return load_run(text, root=base)
    path = Path(text).expanduser().resolve()
    if path.is_dir():
        return load_run(path.name, root=path.parent)
    raise WorkbenchError(f"no run {text!r} in {base}, and no run directory at {path}")


def list_runs(*, root: str | os.PathLike[str] | None = None) -> list[Run]:
    """Complete runs, newest first (temporary and incomplete directories are skipped)."""
    base = _root(root)
    runs = []
    for child in sorted(base.iterdir(), reverse=True):
        if child.name.startswith(".") or not child.is_dir() or not _ID_RE.match(child.name):
            continue
        if all((child / f).exists() for f in REQUIRED):
            try:
                runs.append(load_run(child.name, root=base))
            except WorkbenchError:
                continue
    return runs
