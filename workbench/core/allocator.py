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

Where Debian's ``libjemalloc2`` (or another ``libjemalloc.so.2``) is installed, the app runs under
jemalloc instead (:func:`app_allocator_environment`; ``$WORKBENCH_MALLOC=system`` keeps the C
library's): glibc's heap kept 300–600 MiB of freed fragments resident at every peak of SmolLM2's
default flow, which trims between steps did not prevent, and under jemalloc, set to hand freed
pages back after a second, the flow's peak was 0.4–0.6× the model lower (docs/results/bench.md).
A preloaded allocator cannot be switched in a running process, so the app's entry points start
(or restart) Python with it; the library itself and the tests run under whatever they were given.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import ParamSpec, TypeVar

from workbench.core.errors import WorkbenchError

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


MALLOC_ENV = "WORKBENCH_MALLOC"
"""The app's allocator: ``jemalloc`` (required), ``system`` (the C library's), or unset: jemalloc
where its library is installed, else the C library's."""
MALLOC_CHOICES = ("jemalloc", "system")
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"
"""jemalloc's settings for the app (unless ``$MALLOC_CONF`` is set): a background thread returns
freed pages a second after they were last used, and none are kept "muzzy" (lazily freed, still
counted as resident) after that."""
_PRELOADED = "WORKBENCH_MALLOC_PRELOADED"
"""Set in the environment the app restarts in: it is not restarted twice, even when the
preload failed (the dynamic loader then only warns)."""
JEMALLOC_NAME = "libjemalloc.so.2"
_JEMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                  "/usr/local/lib", "/opt/homebrew/lib")


def jemalloc_library() -> str | None:
    """The path of an installed ``libjemalloc.so.2``: from the dynamic loader's cache, else the usual
    library folders; ``None`` when there is none."""
    try:
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):  # no ldconfig (not Linux, or a minimal image)
        cache = ""
    for line in cache.splitlines():
        name, _, path = line.partition("=>")
        if name.strip().startswith(JEMALLOC_NAME) and os.path.isfile(path.strip()):
            return path.strip()
    found = (os.path.join(d, JEMALLOC_NAME) for d in _JEMALLOC_DIRS)
    return next((path for path in found if os.path.isfile(path)), None)


def malloc_choice(env: Mapping[str, str]) -> str | None:
    """``$WORKBENCH_MALLOC`` as written: one of :data:`MALLOC_CHOICES`, or ``None`` when unset."""
    choice = env.get(MALLOC_ENV, "").strip().lower()
    if choice and choice not in MALLOC_CHOICES:
        raise WorkbenchError(f"${MALLOC_ENV} must be one of {', '.join(MALLOC_CHOICES)} (or unset), got {choice!r}")
    return choice or None


def app_allocator_environment(env: Mapping[str, str]) -> dict[str, str] | None:
    """``env`` with jemalloc preloaded for the app, or ``None`` to start it in ``env`` as it is: with
    ``$WORKBENCH_MALLOC=system``, without an installed jemalloc (unless it was asked for: an
    error), or when ``env`` already is such an environment. The user's ``$LD_PRELOAD`` entries stay
    after jemalloc's; their ``$MALLOC_CONF`` stands."""
    choice = malloc_choice(env)
    if choice == "system" or env.get(_PRELOADED):
        return None
    library = jemalloc_library()
    if library is None:
        if choice == "jemalloc":
            raise WorkbenchError(f"${MALLOC_ENV}=jemalloc but no {JEMALLOC_NAME} is installed: install Debian's "
                                 f"libjemalloc2 (make install does), or set ${MALLOC_ENV}=system")
        return None
    preload = ":".join(entry for entry in (library, env.get("LD_PRELOAD", "")) if entry)
    return {**env, "LD_PRELOAD": preload, "MALLOC_CONF": env.get("MALLOC_CONF") or JEMALLOC_CONF,
            _PRELOADED: library}


def restart_under_app_allocator() -> None:
    """Re-run this very command (``sys.orig_argv``) under jemalloc when
    :func:`app_allocator_environment` asks for it; return otherwise. Call it first, before the
    imports that take seconds: they would be paid twice."""
    env = app_allocator_environment(os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)


def allocator_in_use() -> str:
    """Which malloc this process runs on: ``jemalloc`` when its library is mapped, else ``system``."""
    try:
        with open("/proc/self/maps") as fh:
            return "jemalloc" if any("libjemalloc" in line for line in fh) else "system"
    except OSError:  # no /proc: nothing here preloads anything there
        return "system"


MALLCTL_ARENAS_ALL = 4096
"""jemalloc's index for "every arena" in ``mallctl`` names (``MALLCTL_ARENAS_ALL``)."""


@functools.cache
def _mallctl() -> Callable[..., int] | None:
    """jemalloc's ``mallctl`` when jemalloc is this process's malloc (it is then among the
    process's symbols), else ``None``."""
    try:
        mallctl = ctypes.CDLL(None).mallctl
    except (OSError, AttributeError):
        return None
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return mallctl


def _jemalloc_purge() -> bool:
    """Return jemalloc's unused dirty pages to the OS now; False where jemalloc is not this
    process's malloc."""
    mallctl = _mallctl()
    return mallctl is not None and mallctl(f"arena.{MALLCTL_ARENAS_ALL}.purge".encode(), None, None, None, 0) == 0


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


def hand_back_freed_memory(*, collect: bool = False) -> bool:
    """Return the allocator's free pages to the OS: jemalloc's (when it is this process's malloc)
    and glibc's; False where neither can (no jemalloc and no ``malloc_trim``).

    ``collect``: first free what only Python's cycle collector frees, where models were let go.
    TransformerLens' bridges over some families hold reference cycles (over GPT-2's joint QKV
    attention, in the census of docs/results/bench.md), so a variant model that was attributed
    (its bridge holding its copy of the tree and the variant's own tensors) is not freed when its
    last name goes but when the collector next runs, which in a process holding hundreds of
    thousands of objects can be many steps later. A full collection took 0.5–0.65 s in SmolLM2's
    flow: not for the calls inside a round's per-tensor loops."""
    if collect:
        gc.collect()
    purged = _jemalloc_purge()
    trim = _malloc_trim()
    if trim is None:
        return purged
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
            hand_back_freed_memory(collect=True)  # a click may have let go of models (some bridges are cyclic)

    return step_then_hand_back
