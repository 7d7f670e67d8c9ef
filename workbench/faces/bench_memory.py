"""``workbench bench memory``: peak resident memory ÷ model bytes, per phase, in a child process.

Each flow runs in its own Python process (this module run as a script), so flows never see
each other's allocations; inside it, before each phase the C allocator hands freed memory
back (``malloc_trim``) and the kernel's high-water mark is reset (``/proc/self/clear_refs``),
so a phase's peak is the most the process held *during that phase* — including what earlier
phases left alive, as in the app. ``ru_maxrss`` of the child is the flow's overall peak.

Flows:

- ``flow``: the app's default path through :class:`~workbench.faces.session.Session` —
  ``load`` (setup: load, built-in split, base accuracy full precision and quantized),
  ``attribution`` (Run attribution), ``mansu`` (Run MANSU with its whole measurement).
- ``mansu-no-circuit``: load, then MANSU over every quantized weight (``use_circuit=False``)
  for ``rounds`` rounds, without the measurement.

The child prints one JSON line; :func:`run_flow` starts it and parses that line. The script
only uses interfaces that predate issue 17, so the same file measures an older checkout
(``PYTHONPATH=<old checkout> python workbench/faces/bench_memory.py flow smollm2``).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FLOWS = ("flow", "mansu-no-circuit")


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _trim() -> None:
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _phase(rows: list[dict[str, Any]], name: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` as phase ``name``: its seconds and the process's peak RSS while it ran."""
    import torch

    _trim()
    exact = True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := current RSS
    except OSError:
        exact = False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _rss_bytes("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows.append({"phase": name, "seconds": seconds, "peak_rss_bytes": peak, "exact": exact,
                 "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None})
    return out


def _model_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.hf.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def child(flow: str, model_name: str, rounds: int) -> dict[str, Any]:
    """Run one flow in this process (see the module docstring); a JSON-ready report."""
    import torch

    torch.set_num_threads(1)
    from workbench.faces.session import Session

    baseline = _rss_bytes("VmRSS")  # the interpreter and the workbench's imports
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as runs:
        session = Session(runs_root=runs)
        _phase(rows, "load", lambda: session.setup(model_name))
        assert session.model is not None and session.split is not None and session.quant is not None
        model_bytes = _model_bytes(session.model)
        if flow == "flow":
            _phase(rows, "attribution", session.attribute)
            _phase(rows, "mansu", lambda: session.unlearn("mansu"))
        elif flow == "mansu-no-circuit":
            from workbench.unlearning.mansu import MansuConfig
            from workbench.unlearning.registry import unlearn

            config = MansuConfig(use_circuit=False, max_rounds=rounds)
            model, split, quant = session.model, session.split, session.quant
            _phase(rows, "mansu", lambda: unlearn(model, split, method="mansu", quant=quant,
                                                  method_config=config, progress=lambda f, m: None))
        else:
            raise SystemExit(f"unknown flow {flow!r}; choose from {', '.join(FLOWS)}")
    for row in rows:
        row["peak_over_model"] = row["peak_rss_bytes"] / model_bytes
        row["above_imports_over_model"] = (row["peak_rss_bytes"] - baseline) / model_bytes
    return {"flow": flow, "model": model_name, "model_bytes": model_bytes, "imports_rss_bytes": baseline,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "phases": rows}


def run_flow(flow: str, model_name: str, *, rounds: int = 2, pythonpath: str | None = None) -> dict[str, Any]:
    """Run ``flow`` on ``model_name`` in a child process and return its report.

    ``pythonpath``: the checkout whose ``workbench`` the child imports (default: this one)."""
    from workbench.core.errors import WorkbenchError

    if flow not in FLOWS:
        raise WorkbenchError(f"unknown memory flow {flow!r}; choose from {', '.join(FLOWS)}")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=pythonpath or str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), flow, model_name, str(rounds)],
                          env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise WorkbenchError(f"memory bench child ({flow}, {model_name}) failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


MEMORY_COLUMNS = (
    ("flow", "flow", "{}"), ("phase", "phase", "{}"), ("seconds", "s", "{:.1f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"), ("peak_over_model", "peak/model", "{:.2f}"),
    ("above_imports_over_model", "(peak-imports)/model", "{:.2f}"),
)


def memory_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per phase of a child's report."""
    return [{"flow": report["flow"], **row, "peak_rss_mib": row["peak_rss_bytes"] / 2**20}
            for row in report["phases"]]


if __name__ == "__main__":
    flow_arg, model_arg, rounds_arg = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2
    print(json.dumps(child(flow_arg, model_arg, rounds_arg)))
