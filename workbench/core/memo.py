"""What depends only on a base model's weights, computed once per process.

The base's scores and attributions (measurement) and MANSU's retain Fisher and null-space
projectors (unlearning) are the same for every run on one model: a paper table, an ablation table
or an app session would otherwise recompute them per run. Keys start with the model's weight
fingerprint; the memo is in-process, never on disk, so a cached value always comes from weights
this process holds. Small values are kept by :func:`base_memo` (the 64 latest); large ones by
:func:`latest_memo`, one per kind, so a session that tries many circuits holds one circuit's;
values taken ahead for one later use by :func:`hold_once` (given up by :func:`take_once`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

_BASE_MEMO: OrderedDict[tuple[Any, ...], object] = OrderedDict()
_BASE_MEMO_SIZE = 64
_BASE_MEMO_LOCK = threading.Lock()  # app sessions measure from several threads
T = TypeVar("T")


def base_memo(key: tuple[Any, ...], compute: Callable[[], T]) -> T:
    """``compute()`` once per ``key`` (least recently used entries are dropped). The value is
    shared: callers read it and never write into it.

    Two threads asking for a missing key may both compute it (the lock is not held while
    computing); the results are equal, so either may stay."""
    with _BASE_MEMO_LOCK:
        if key in _BASE_MEMO:
            _BASE_MEMO.move_to_end(key)
            return _BASE_MEMO[key]  # type: ignore[return-value]  # stored by compute() for this key
    value = compute()
    with _BASE_MEMO_LOCK:
        _BASE_MEMO[key] = value
        while len(_BASE_MEMO) > _BASE_MEMO_SIZE:
            _BASE_MEMO.popitem(last=False)
    return value


_LATEST: dict[str, tuple[tuple[Any, ...], object]] = {}


def latest_memo(kind: str, key: tuple[Any, ...], compute: Callable[[], T]) -> T:
    """``compute()`` unless the latest call of this ``kind`` had this ``key``: only that latest
    value is held (for values of tens of megabytes). Shared as :func:`base_memo`'s."""
    with _BASE_MEMO_LOCK:
        held = _LATEST.get(kind)
        if held is not None and held[0] == key:
            return held[1]  # type: ignore[return-value]  # stored by compute() for this key
        _LATEST.pop(kind, None)  # released before computing the next one
    value = compute()
    with _BASE_MEMO_LOCK:
        _LATEST[kind] = (key, value)
    return value


_ONCE: dict[str, tuple[tuple[Any, ...], object]] = {}
_ONCE_ASKED: dict[str, int] = {}  # per kind, how often a value was taken or let go


def once_asked(kind: str) -> int:
    """How often ``kind`` was taken or let go so far: pass it to :func:`hold_once` as ``since``."""
    with _BASE_MEMO_LOCK:
        return _ONCE_ASKED.get(kind, 0)


def hold_once(kind: str, key: tuple[Any, ...], compute: Callable[[], object | None], *,
              since: int | None = None) -> None:
    """Hold ``compute()`` until :func:`take_once` asks for it (one per kind): work done ahead of a
    click that the click uses once, and that is not worth its memory after. Nothing is computed
    or held when the kind was taken or let go since ``since`` (:func:`once_asked`, read when the
    work ahead began; default: now), or while it was computed: that click came first and made
    its own, or a run started. ``None`` is not held."""
    with _BASE_MEMO_LOCK:
        asked = _ONCE_ASKED.get(kind, 0)
    if since is not None and since != asked:
        return
    value = compute()
    with _BASE_MEMO_LOCK:
        if _ONCE_ASKED.get(kind, 0) == asked and value is not None:
            _ONCE[kind] = (key, value)


def take_once(kind: str, key: tuple[Any, ...], of: type[T]) -> T | None:
    """The value held for ``key`` (and no longer held), or ``None``. A held value of another key
    is let go too: it was taken ahead for a use that did not come."""
    with _BASE_MEMO_LOCK:
        _ONCE_ASKED[kind] = _ONCE_ASKED.get(kind, 0) + 1
        held = _ONCE.pop(kind, None)
    return held[1] if held is not None and held[0] == key and isinstance(held[1], of) else None


def drop_once(kind: str) -> None:
    """Let go of what is held for ``kind``, or being computed for it (its use will not come)."""
    with _BASE_MEMO_LOCK:
        _ONCE_ASKED[kind] = _ONCE_ASKED.get(kind, 0) + 1
        _ONCE.pop(kind, None)


def clear_base_memo() -> None:
    with _BASE_MEMO_LOCK:
        _BASE_MEMO.clear()
        _LATEST.clear()
        _ONCE.clear()
