"""``workbench bench flow``: the app's default flow, click by click, on the fast path and on the
reference path, timed in one process, with the two MANSU runs' metrics checked equal.

The steps are the app's own (:class:`~workbench.faces.session.Session`, which the Gradio app and
the HTTP API call), after the model is loaded:

===============  ==============================================================================
step             what is timed
===============  ==============================================================================
``setup``        "Load model and data" once the start model is preloaded (the app loads it, its
                 split, the base's accuracy and the rest of what a run's measurement takes from the
                 base alone in the background from its start: ``SharedModels.prepare_base``; untimed here)
``attribution``  "Run attribution": attribution patching of the forget set and the default circuit,
                 until its graph, heatmap and node table are drawn
``edit``         one circuit edit (top-k 10 → 9) until the graph, heatmap and node table are drawn
``readout``      the faithfulness readouts of both circuits, which follow the drawing
``mansu``        "Run MANSU" with its full measurement (five variants, CAD, the oracle if any)
===============  ==============================================================================

The **reference path** is the behaviour before the speed work, kept as a mode so the ratio is
measured in the same process on the same machine: the readout is measured inside the attribution
and the edit (the user waits for both), the MANSU run measures with cold caches (no score or attribution is
carried over from setup or attribution) and its rounds score every batch with full forwards
(:func:`~workbench.models.prefix.full_forwards`, no prefix cache), reading top-1 in one padded
forward per batch (:func:`~workbench.models.scoring.whole_batches`, no length chunks). Each
path starts from empty score caches; the fast path runs first and pays the process's one-time
costs, so the ratios err low. Ratios are reference ÷ fast per step; about 1.0 means the step
has no fast path yet.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from workbench.core.errors import WorkbenchError
from workbench.core.memo import clear_base_memo
from workbench.core.progress import silent
from workbench.data.facts import FactSplit
from workbench.faces.session import SHARED, Session
from workbench.interpretability.attribution import AttributionConfig, attribute
from workbench.measurement.evaluation import evaluate_facts
from workbench.measurement.results import RunMetrics
from workbench.models.loaded import LoadedModel
from workbench.models.prefix import full_forwards
from workbench.models.scoring import whole_batches
from workbench.quant import QuantConfig
from workbench.quant.model import quantized_copy

FLOW_STEPS = ("setup", "attribution", "edit", "readout", "mansu")

# Fields of metrics.json that are wall times or the run's name, not measurements.
_NOT_MEASURED = ("seconds", "unlearning_seconds", "run_id", "seconds_by_phase")


@dataclass(frozen=True)
class FlowPath:
    """One pass through the flow: seconds per step and the MANSU run's metrics."""

    name: str
    seconds: dict[str, float]
    metrics: RunMetrics


def _measured_only(value: Any) -> Any:
    """metrics.json without wall times and ids (what must be equal between the two paths)."""
    if isinstance(value, dict):
        return {k: _measured_only(v) for k, v in value.items() if k not in _NOT_MEASURED}
    if isinstance(value, list):
        return [_measured_only(v) for v in value]
    return value


def same_measurements(a: RunMetrics, b: RunMetrics) -> list[str]:
    """Top-level metrics.json keys whose measured values differ (empty: identical)."""
    ja, jb = _measured_only(json.loads(json.dumps(a.to_json()))), _measured_only(json.loads(json.dumps(b.to_json())))
    return sorted(k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k))


def _clock(seconds: dict[str, float], step: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    seconds[step] = time.perf_counter() - start
    return out


def run_flow(model: str, *, reference: bool, mansu: dict[str, Any], runs_root: str) -> FlowPath:
    """The default flow once, on the fast path or (``reference``) on the reference path."""
    clear_base_memo()
    SHARED.clear_scores()
    # What the app does in the background from its start (SharedModels.preload), before any click.
    loaded = SHARED.model(model)
    SHARED.prepare_base(loaded, SHARED.builtin_split(loaded), QuantConfig("nf4"))
    s = Session(runs_root=runs_root)
    seconds: dict[str, float] = {}
    _clock(seconds, "setup", lambda: s.setup(model))

    def redraw() -> None:
        s.circuit_figures()
        s.node_rows()

    # Until the user sees the circuit: on the fast path its faithfulness readout follows (as in
    # the app), on the reference path the click measured it first.
    readouts: dict[str, float] = {}
    if reference:
        clear_base_memo()  # the forget set's pairs and means the background start took: made in the click
    _clock(seconds, "attribution", lambda: (s.attribute("atp", measure=reference), redraw()))
    if not reference:
        _clock(readouts, "attribution", s.measure_faithfulness)
    _clock(seconds, "edit", lambda: (s.edit("top_k", 9, measure=reference), redraw()))
    if not reference:
        _clock(readouts, "edit", s.measure_faithfulness)
    seconds["readout"] = sum(readouts.values())  # both the fast path deferred (0 on the reference path)
    if reference:
        clear_base_memo()  # measured with cold caches: nothing carried over from setup or attribution
    with reference_forwards() if reference else nullcontext():
        view = _clock(seconds, "mansu", lambda: s.unlearn("mansu", mansu=mansu))
    return FlowPath("reference" if reference else "fast", seconds, view.metrics)


@contextmanager
def reference_forwards() -> Iterator[None]:
    """The forwards of a MANSU run before the speed work: every block every time (no prefix
    cache) and top-1 read in one padded forward per batch (no length chunks)."""
    with full_forwards(), whole_batches():
        yield


def _warm_up(model: LoadedModel, split: FactSplit) -> None:
    """The process's one-time costs (kernels, the quantizer's backend, the attribution bridge) on
    a few facts, so neither path pays them inside a timed step."""
    facts = split.forget[:4]
    evaluate_facts(model, facts, multiple_choice=False)
    evaluate_facts(quantized_copy(model.hf, QuantConfig("nf4"), progress=silent), facts, tokenizer=model.tokenizer,
                   multiple_choice=False)
    attribute(model, facts, AttributionConfig(), progress=silent)


@dataclass(frozen=True)
class FlowBench:
    """Both paths and what they say together."""

    model: str
    reference: FlowPath
    fast: FlowPath
    differing: list[str]  # metrics.json keys that differ between the paths (must be empty)

    def rows(self) -> list[dict[str, Any]]:
        """One row per step: reference s, fast s, ratio (reference ÷ fast)."""
        out = []
        for step in FLOW_STEPS:
            ref, fast = self.reference.seconds[step], self.fast.seconds[step]
            # "edit" is until the user sees the new graph (the reference edit includes the readout);
            # "readout" has no ratio: on the reference path it is inside the edit.
            ratio = ref / fast if step != "readout" and fast > 0 else float("nan")
            out.append({"model": self.model, "step": step, "reference_s": ref, "fast_s": fast, "ratio": ratio})
        total_ref, total_fast = sum(self.reference.seconds.values()), sum(self.fast.seconds.values())
        out.append({"model": self.model, "step": "total", "reference_s": total_ref, "fast_s": total_fast,
                    "ratio": total_ref / total_fast})
        return out


FLOW_COLUMNS = (
    ("model", "model", "{}"),
    ("step", "step", "{}"),
    ("reference_s", "reference s", "{:.2f}"),
    ("fast_s", "fast s", "{:.2f}"),
    ("ratio", "reference/fast", "{:.2f}"),
)


def bench_flow(model: str = "smollm2", *, max_rounds: int | None = None, threads: int = 1) -> FlowBench:
    """Load ``model`` and its split (untimed), run the flow on the fast path, then on the reference path.

    ``max_rounds`` caps MANSU's rounds (the quick bench and the tests); None keeps the app's default.
    ``threads``: torch threads for both paths (the app runs on torch's default, the machine's cores).
    Raises when the two MANSU runs' metrics differ: a faster path must measure the same numbers.
    """
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise WorkbenchError(f"bench flow: threads must be a positive integer, got {threads!r}")
    loaded = SHARED.model(model)
    _warm_up(loaded, SHARED.builtin_split(loaded))  # loading and the split are not steps of the flow
    mansu: dict[str, Any] = {} if max_rounds is None else {"max_rounds": max_rounds}
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-flow-") as runs:
            # The fast path first: it pays the process's one-time costs, so ratios err low.
            fast = run_flow(model, reference=False, mansu=mansu, runs_root=runs)
            reference = run_flow(model, reference=True, mansu=mansu, runs_root=runs)
    finally:
        torch.set_num_threads(saved)
    differing = same_measurements(reference.metrics, fast.metrics)
    if differing:
        raise WorkbenchError(f"bench flow: the fast path measured other numbers than the reference path in "
                             f"{', '.join(differing)}")
    return FlowBench(model, reference, fast, differing)
