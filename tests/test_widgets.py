"""The notebook widget's callbacks, headless: clicks toggle the circuit and the figure follows."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
from plotly.callbacks import Points

from workbench.faces.widgets import Workbench
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.registry import METHODS
from workbench.unlearning.task import StopRule

SMALL = MansuConfig(params_per_round=16, max_rounds=3, fisher_samples=32)


def _trace(fig: go.FigureWidget, name: str):
    (trace,) = [t for t in fig.data if t.name == name]
    return trace


def _click(wb: Workbench, trace_name: str, index: int = 0) -> str:
    """Simulate a click on one node the way plotly's front end reports it."""
    fig = wb.circuit_fig
    i = next(i for i, t in enumerate(fig.data) if t.name == trace_name)
    trace = fig.data[i]
    name = trace.customdata[index]
    points = Points(point_inds=[index], xs=[trace.x[index]], ys=[trace.y[index]], trace_name=trace_name, trace_index=i)
    trace._dispatch_on_click(points, None)  # runs the handlers registered with trace.on_click
    return name


def _errors(wb: Workbench) -> str:
    return "".join(o["text"] for o in wb.output.outputs if o.get("name") == "stderr")


@pytest.fixture(scope="module")
def wb(facts_tiny, tmp_path_factory):
    w = Workbench(facts_tiny, top_k=4, mansu_config=SMALL, stop=StopRule(max_steps=15),
                  measure_cad=False, runs_root=tmp_path_factory.mktemp("runs"))
    assert w.model is facts_tiny and w.split is not None
    w.run_attribution()
    assert not _errors(w), _errors(w)
    return w


def test_method_dropdown_lists_every_method():
    w = Workbench("facts-tiny", load=False)
    assert tuple(w.method_dropdown.options) == METHODS
    w.method_dropdown.value = "graddiff"
    assert w.run_button.description == "Run GradDiff"  # the registry's label, as in the app
    w.method_dropdown.value = "ga_klr"
    assert w.run_button.description == "Run GA + KL retain"


def test_attribution_builds_circuit_and_figure(wb):
    assert len(wb.circuit.selected) == 4
    sel = _trace(wb.circuit_fig, "selected")
    assert set(sel.customdata) == {c.name for c in wb.circuit.selected}
    assert wb.top_k.max == len(wb.attribution.scores)
    assert len(wb.heatmap_fig.data) > 0


def test_clicking_an_unselected_node_adds_it_and_redraws(wb):
    before = {c.name for c in wb.circuit.selected}
    name = _click(wb, "unselected")
    assert name not in before
    after = {c.name for c in wb.circuit.selected}
    assert after == before | {name}
    sel, unsel = _trace(wb.circuit_fig, "selected"), _trace(wb.circuit_fig, "unselected")
    assert name in sel.customdata and name not in unsel.customdata
    # selected nodes are drawn opaque with a dark outline, unselected ones faded
    assert sel.marker.opacity == 1.0 and unsel.marker.opacity < 1.0
    assert name in wb.circuit_info.value


def test_clicking_a_selected_node_removes_it_and_undo_restores(wb):
    before = {c.name for c in wb.circuit.selected}
    name = _click(wb, "selected")
    assert {c.name for c in wb.circuit.selected} == before - {name}
    assert name in _trace(wb.circuit_fig, "unselected").customdata
    assert not wb.undo_button.disabled
    wb.undo()
    assert {c.name for c in wb.circuit.selected} == before
    assert name in _trace(wb.circuit_fig, "selected").customdata
    wb.redo()
    assert {c.name for c in wb.circuit.selected} == before - {name}
    wb.toggle(name)  # back to where we were
    assert {c.name for c in wb.circuit.selected} == before


def test_logits_click_is_ignored(wb):
    before = set(wb.circuit.selected)
    _click(wb, "logits")
    assert set(wb.circuit.selected) == before


def test_top_k_slider_reselects(wb):
    wb.top_k.value = 2
    assert len(wb.circuit.selected) == 2
    assert len(_trace(wb.circuit_fig, "selected").customdata) == 2
    wb.top_k.value = 4
    assert len(wb.circuit.selected) == 4


def test_errors_are_messages_not_exceptions(wb, tmp_path):
    w = Workbench("facts-tiny", load=False)
    w.toggle("L0.H0")  # no model, no circuit: a message, no exception
    assert "load a model first" in _errors(w)
    w.model_dropdown.options = [*w.model_dropdown.options, str(tmp_path / "nowhere")]
    w.model_dropdown.value = str(tmp_path / "nowhere")
    w.load()
    assert "neither a built-in" in _errors(w) and "Traceback" not in _errors(w)
    assert w.status.value == "error"
    n = len(wb.output.outputs)
    wb.toggle("L9.H9")
    assert "not in this circuit" in _errors(wb) and len(wb.output.outputs) == n + 1


def test_run_baseline_and_mansu_fill_the_compare_tab(wb):
    m = wb.run_unlearning("ga")
    assert m is not None and m.method == "ga", _errors(wb)
    wb.method_dropdown.value = "mansu"
    wb.run_button.click()  # the real button path
    assert list(wb.runs) == ["ga #1", "mansu #2"], _errors(wb)
    assert wb.last_metrics.method == "mansu"
    assert set(wb.last_metrics.circuit) == {c.name for c in wb.circuit.selected}
    assert wb.progress.value == 1.0
    assert "report card" in wb.report_html.value and "PTQ gap" in wb.report_html.value
    # the headline numbers under the card, down to where the MANSU run's time went
    assert "time: unlearning " in wb.report_html.value and " s (setup " in wb.report_html.value
    titles = [f.layout.title.text for f in wb.compare_figs]
    assert any("Accuracy" in t for t in titles) and any("occupancy" in t for t in titles)
    ratio = next(f for f in wb.compare_figs if "bin widths" in f.layout.title.text)
    assert {t.name for t in ratio.data} == {"ga #1", "mansu #2"}
    steps = next(f for f in wb.compare_figs if "while unlearning" in f.layout.title.text)
    mansu_fp = next(t for t in steps.data if t.name == "mansu #2, full precision" and t.xaxis == "x")
    assert list(mansu_fp.y) == [r["forget_top1"] for r in wb.histories["mansu #2"]]
    # the unlearn tab's live plot ends as the last run's rounds, drawn as they came
    assert wb.live_records == wb.histories["mansu #2"]
    live_fp = next(t for t in wb.live_fig.data if t.name == "this run, full precision" and t.xaxis == "x")
    assert list(live_fp.y) == [r["forget_top1"] for r in wb.live_records]
    assert wb.tabs.selected_index == 3


def test_widget_per_fact_view_and_baseline(wb):
    assert len(wb.fact_dropdown.options) == wb.attribution.n_pairs
    wb.fact_dropdown.value = 3
    heat = wb.fact_fig.data[0]
    assert heat.type == "heatmap" and wb.attribution.pair_prompts[3] in wb.fact_fig.layout.title.text
    own = wb.attribution.for_fact(3)
    assert max(abs(v) for row in heat.z for v in row if v is not None) == pytest.approx(
        max(abs(v) for c, v in own.items() if c.kind.value != "embed"))
    wb.baseline_dropdown.value = "mean"
    wb.run_attribution()
    assert wb.attribution.baseline == "mean" and wb.attribution.pairing.mean == wb.attribution.n_pairs
    wb.baseline_dropdown.value = "paired"
    wb.run_attribution()
