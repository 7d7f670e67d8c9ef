"""Handing the C allocator's freed memory back to the operating system.

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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # no C library by that name, or one without malloc_trim
        return None


def hand_back_freed_memory() -> bool:
    """Return the allocator's free pages to the OS; False where there is no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
