"""The memory bench's libraries child: import the modules a flow imported besides the workbench's,
alone, and print the resident size they leave (one JSON line).

Run as a script by :func:`workbench.faces.bench_memory.run_libraries` with the path of a JSON list
of module names. It imports nothing of the workbench's (the standard library only, then the named
modules), so what it reports is the libraries' floor under a flow's phases: their code's pages,
their Python objects and what they allocate at import, with no model and no data.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import importlib
import json
import sys


def resident_bytes() -> int:
    """This process's resident size (``VmRSS``), 0 where there is no ``/proc``."""
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def import_all(names: list[str]) -> int:
    """Import ``names`` in order; how many failed to import alone (counted and skipped: a module
    some other import set up first, a script's own module)."""
    failed = 0
    for name in names:
        if name in sys.modules:  # a package's import brought it already
            continue
        try:
            importlib.import_module(name)
        except Exception:  # any module's own import error: counted, the rest go on
            failed += 1
    return failed


def main(names_file: str) -> dict[str, int]:
    with open(names_file) as fh:
        names = json.load(fh)
    failed = import_all(names)
    gc.collect()
    # freed import-time memory handed back first, as the memory bench does before each phase
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    return {"modules": len(names), "failed": failed, "rss_bytes": resident_bytes()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
