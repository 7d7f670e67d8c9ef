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

from workbench.core.errors import WorkbenchError


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


MAX_JSON_DEPTH = 32
"""Nesting deeper than any file the workbench writes; deeper input is refused, not recursed into."""
MAX_INT_DIGITS = 30
"""Digits of the longest integer a workbench file holds (a run id's count, a seed); longer ones are refused."""


def parse_json(text: str, *, source: str, max_depth: int = MAX_JSON_DEPTH, allow_nan: bool = False) -> Any:
    """``json.loads`` with the limits a file from a user or a remote page needs.

    Refused with a :class:`WorkbenchError` naming ``source``: invalid JSON (with line and
    column), ``NaN``/``Infinity`` (not JSON), integers of more than :data:`MAX_INT_DIGITS`
    digits (Python would spend quadratic time on them, or raise past 4,300), and nesting
    deeper than ``max_depth`` (Python's parser would raise ``RecursionError``).
    ``allow_nan`` admits ``NaN``/``Infinity`` for the workbench's own files, where NaN means
    "not measured" (Python's ``json`` writes it so).
    """
    try:
        data = json.loads(text, parse_int=_bounded_int, parse_constant=float if allow_nan else _no_constant)
    except json.JSONDecodeError as exc:
        raise WorkbenchError(f"{source}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except _Refused as exc:
        raise WorkbenchError(f"{source}: {exc}") from None
    except RecursionError:
        raise WorkbenchError(f"{source}: JSON nested deeper than {max_depth} levels") from None
    if _depth(data) > max_depth:
        raise WorkbenchError(f"{source}: JSON nested deeper than {max_depth} levels")
    return data


class _Refused(ValueError):
    pass


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {digits} digits (at most {MAX_INT_DIGITS} are accepted)")
    return int(text)


def _no_constant(name: str) -> float:
    raise _Refused(f"{name} is not a JSON number")


def _depth(data: Any) -> int:
    """Nesting depth, without recursion (so a deep value cannot exhaust the stack here either)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


@contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) between processes, for the block.

    ``fcntl.flock`` locks are released by the kernel when the holder exits, also when it is
    killed, so a crashed builder never leaves a stale lock behind.
    """
    import fcntl  # POSIX only; imported here so that the rest of the module stays importable elsewhere

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
