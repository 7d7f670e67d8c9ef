"""Handing the C allocator's freed memory back to the operating system, and keeping its heaps few.

glibc keeps the memory of freed blocks below its mmap threshold (which rises to 32 MiB once
large blocks have come and gone) for its next allocations instead of returning it. A MANSU
round's backward passes and its scoring free hundreds of such tensors, the next phase does not
reuse all of that memory, and the process's resident size climbs: on the scale bench's 1B model
0.8–1.6 GB above what a trim leaves, at each round (docs/results/bench.md). ``malloc_trim``
gives the free pages back: no tensor moves and no number changes, in tens of milliseconds.

Only host memory, and only glibc's: elsewhere (macOS, musl) this does nothing. GPU memory is left
to PyTorch's caching allocator, which keeps it on purpose. The trim locks each of glibc's arenas
in turn, so another thread allocating meanwhile (an app session's) waits those milliseconds, and
the returned pages are faulted in again when next used: a cost in time, never in numbers.

The app also limits glibc to two arenas (:func:`limit_arenas`), so that what one click's thread
frees is there for the next click's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

M_ARENA_MAX = -8
"""glibc's ``mallopt`` parameter for the most arenas (``malloc.h``)."""
APP_ARENAS = 2
"""Arenas the app lets glibc keep (:func:`limit_arenas`)."""


@functools.cache
def _libc_function(name: str) -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return getattr(libc, name)
    except (OSError, AttributeError):  # no C library by that name, or one without that function
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    return _libc_function("malloc_trim")


def limit_arenas(count: int = APP_ARENAS) -> bool:
    """Let glibc keep at most ``count`` malloc arenas; False where it cannot (not glibc) or when
    ``$MALLOC_ARENA_MAX`` or ``glibc.malloc.arena_max`` in ``$GLIBC_TUNABLES`` is set (the user's
    choice stands).

    glibc gives each new thread an arena of its own, up to eight per core, and keeps a freed
    block in the arena of the thread that took it: in the app, whose clicks run in a pool of
    worker threads, memory one click freed need not be reused by the next click's thread, and the
    process's peak can climb (docs/results/bench.md: "Run MANSU" on SmolLM2's default flow peaked
    128–191 MiB lower with two arenas, two runs each way, in the same time, within a spread of
    ~240 MiB between runs of the same code: suggestive, not established). Call it before the
    threads start; it changes no number, only which arena a thread allocates from."""
    mallopt = _libc_function("mallopt")
    if (mallopt is None or os.environ.get("MALLOC_ARENA_MAX")
            or "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    return bool(mallopt(M_ARENA_MAX, count))


def hand_back_freed_memory() -> bool:
    """Return the allocator's free pages to the OS; False where there is no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def hands_back_memory(step: Callable[P, R]) -> Callable[P, R]:
    """``step``, then :func:`hand_back_freed_memory`, however it ends.

    For the app's clicks: each frees its transients when it ends, and what glibc keeps of them
    would stay resident under the server until the next click (docs/results/bench.md: 360–500 MiB
    on SmolLM2 after each of setup, attribution and "Run MANSU"). The next click's peak is not
    lowered by it: that click would have reused the kept memory."""

    @functools.wraps(step)
    def step_then_hand_back(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return step(*args, **kwargs)
        finally:
            hand_back_freed_memory()

    return step_then_hand_back
