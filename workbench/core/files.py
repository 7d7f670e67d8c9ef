"""Crash-safe writes: a file or directory appears complete under its name, or not at all.

Every write goes to a uniquely named temporary sibling (``mkstemp``/``mkdtemp``, so two
writers never share one), is flushed to disk (``fsync``), and is renamed into place with
``os.replace``, which is atomic on POSIX file systems. A writer killed half-way leaves a
hidden temporary (``.<name>.*``) that readers ignore, never a half-written file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike[str], content: bytes | str | Callable[[Path], None]) -> Path:
    """Write ``content`` to ``path`` atomically and return the path.

    ``content`` is bytes, text (UTF-8, ``\\n`` line ends), or a function that writes the
    temporary file it is given (e.g. ``safetensors.torch.save_file``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
            _fsync_file(tmp)
        else:
            data = content.encode("utf-8") if isinstance(content, str) else content
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None) -> Path:
    """:func:`atomic_write` of ``data`` as JSON."""
    return atomic_write(path, json.dumps(data, indent=indent, default=default, ensure_ascii=False))


@contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Fill a temporary sibling directory, then rename it to ``target`` when the block ends.

    Raises ``FileExistsError`` (and keeps the existing directory) when ``target`` exists by
    then. On an exception the temporary directory is removed and ``target`` never appears.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                _fsync_file(child)
        if target.exists():
            raise FileExistsError(f"{target} already exists")
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: fsync the directory that holds it (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
