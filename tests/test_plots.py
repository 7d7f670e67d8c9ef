"""Structure of the shared plotly figures."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest

from workbench.core.components import EMBED, LOGITS, head, mlp
from workbench.faces.plots import (
    agreement_scatter,
    circuit_diff_figure,
    circuit_figure,
    head_heatmap,
    node_positions,
    spearman,
)
from workbench.interpretability.attribution import Attribution
from workbench.interpretability.circuit import Circuit

N_LAYERS, N_HEADS = 3, 4


def _attribution(scale: float = 1.0) -> Attribution:
    scores = {EMBED: 2.0 * scale}
    for layer in range(N_LAYERS):
        for h in range(N_HEADS):
            scores[head(layer, h)] = scale * ((-1) ** h) * (layer + 1) * (h + 1) / 10
        scores[mlp(layer)] = scale * (layer - 1.0)
    edges = {
        (EMBED, head(0, 1), "q"): 0.5,
        (EMBED, head(0, 1), "v"): -0.25,
        (head(0, 1), mlp(0), "mlp"): 1.0,
        (mlp(0), head(2, 3), "k"): -0.75,
        (head(2, 3), LOGITS, "logits"): 1.5,
        (mlp(2), LOGITS, "logits"): 0.1,
    }
    return Attribution(scores=scores, method="atp", metric="logit_diff", n_pairs=4, prompts_hash="h",
                       model_fingerprint="fp", clean_metric=2.0, corrupt_metric=0.0,
                       n_layers=N_LAYERS, n_heads=N_HEADS, edge_scores=edges)


@pytest.fixture
def circuit() -> Circuit:
    c = Circuit.from_attribution(_attribution())
    return c.set_selection([EMBED, head(0, 1), mlp(0), head(2, 3), mlp(2)])


def _trace(fig: go.Figure, name: str):
    (trace,) = [t for t in fig.data if t.name == name]
    return trace


def test_circuit_figure_nodes(circuit):
    fig = circuit_figure(circuit)
    sel, unsel = _trace(fig, "selected"), _trace(fig, "unselected")
    assert sel.type == unsel.type == "scatter"
    assert set(sel.customdata) == {"embed", "L0.H1", "L0.MLP", "L2.H3", "L2.MLP"}
    n_writers = 1 + N_LAYERS * (N_HEADS + 1)
    assert len(sel.x) + len(unsel.x) == n_writers
    assert set(sel.customdata) | set(unsel.customdata) == {c.name for c in circuit.components}
    assert _trace(fig, "logits").customdata == ("logits",)
    # Selected and unselected look different: outline colour, width and opacity.
    assert sel.marker.line.color != unsel.marker.line.color
    assert sel.marker.opacity > unsel.marker.opacity
    assert sel.marker.line.width > unsel.marker.line.width
    # MLPs are squares, heads circles, embed a diamond.
    symbols = dict(zip(sel.customdata, sel.marker.symbol, strict=True))
    assert symbols == {"embed": "diamond", "L0.H1": "circle", "L0.MLP": "square", "L2.H3": "circle",
                       "L2.MLP": "square"}
    # Colour is the signed score on a scale centred at 0, size grows with |score|.
    assert list(sel.marker.color) == [circuit.scores[c] for c in (next(
        x for x in circuit.components if x.name == n) for n in sel.customdata)]
    assert sel.marker.cmid == 0 and sel.marker.cmin == -sel.marker.cmax
    sizes = dict(zip(sel.customdata, sel.marker.size, strict=True))
    assert sizes["embed"] > sizes["L0.H1"]  # |2.0| > |-0.2|
    # Layout: layers left to right, embed first and logits last.
    xs = dict(zip(sel.customdata, sel.x, strict=True))
    assert xs["embed"] < xs["L0.H1"] < xs["L0.MLP"] < xs["L2.H3"] < xs["L2.MLP"] < _trace(fig, "logits").x[0]
    assert "L0.H1" in sel.text[list(sel.customdata).index("L0.H1")]


def test_circuit_figure_edges(circuit):
    fig = circuit_figure(circuit)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert lines
    n_segments = sum(sum(1 for v in t.x if v is None) for t in lines)
    assert n_segments == len(circuit.edge_scores)
    widths = {t.line.width for t in lines}
    assert len(widths) > 1  # width grows with |score|
    assert {t.line.color for t in lines} == {"#b2182b", "#2166ac"}
    capped = circuit_figure(circuit, max_edges=2)
    assert sum(sum(1 for v in t.x if v is None) for t in capped.data if t.mode == "lines") == 2
    bare = circuit_figure(circuit, show_edges=False)
    assert not [t for t in bare.data if t.mode == "lines"]


def test_circuit_figure_follows_selection(circuit):
    circuit.clear_selection()
    fig = circuit_figure(circuit)
    assert len(_trace(fig, "selected").x) == 0
    assert len(_trace(fig, "unselected").x) == 1 + N_LAYERS * (N_HEADS + 1)
    pos = node_positions(N_LAYERS, N_HEADS)
    assert pos["L1.H0"][0] == pos["L1.H3"][0] and pos["L1.H0"][1] != pos["L1.H3"][1]


@pytest.mark.parametrize("source", ["attribution", "circuit"])
def test_head_heatmap(source, circuit):
    obj = _attribution() if source == "attribution" else circuit
    fig = head_heatmap(obj)
    (hm,) = fig.data
    assert hm.type == "heatmap"
    assert len(hm.z) == N_LAYERS and all(len(row) == N_HEADS + 1 for row in hm.z)
    assert list(hm.x) == ["H0", "H1", "H2", "H3", "MLP"]
    assert hm.customdata[2][3] == "L2.H3" and hm.customdata[1][N_HEADS] == "L1.MLP"
    assert hm.z[2][3] == pytest.approx(_attribution().scores[head(2, 3)])
    assert hm.z[0][N_HEADS] == -1.0
    assert hm.zmid == 0 and hm.zmin == -hm.zmax
    marks = [m for row in hm.text for m in row if m]
    assert len(marks) == (4 if source == "circuit" else 0)  # embed is not a cell


def test_agreement_scatter():
    a = _attribution().scores
    b = {c: 2 * v + 0.1 for c, v in a.items()}  # monotone -> rho = 1
    fig = agreement_scatter(a, b, labels=("atp", "exact"))
    assert "Spearman" in fig.layout.title.text and "1.000" in fig.layout.title.text
    line = _trace(fig, "y = x")
    assert line.x[0] == line.y[0] and line.x[-1] == line.y[-1]
    points = [t for t in fig.data if t.mode == "markers"]
    assert sum(len(t.x) for t in points) == len(a)
    assert {n for t in points for n in t.customdata} == {c.name for c in a}
    assert fig.layout.xaxis.title.text == "atp" and fig.layout.yaxis.title.text == "exact"
    # names work as keys too; reversed order -> rho = -1
    names = {c.name: -v for c, v in a.items()}
    assert spearman(list(a.values()), [names[c.name] for c in a]) == pytest.approx(-1.0)
    assert "-1.000" in agreement_scatter(a, names).layout.title.text
    assert math.isnan(spearman([1.0], [2.0]))
    assert "n/a" in agreement_scatter({EMBED: 1.0}, {EMBED: 1.0}).layout.title.text


def test_circuit_diff_figure():
    before = _attribution().scores
    after = {c: v * 0.5 for c, v in before.items()}
    after.pop(mlp(2))
    fig = circuit_diff_figure(before, after)
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 3
    n = len(before)
    assert all(len(t.y) == n and list(t.y) == list(bars[0].y) for t in bars)  # aligned rows
    assert list(bars[0].customdata) == [c.name for c in before]  # forward order
    i = list(bars[0].y).index("embed")
    assert (bars[0].x[i], bars[1].x[i], bars[2].x[i]) == (2.0, 1.0, -1.0)
    j = list(bars[0].y).index("L2.MLP")
    assert bars[1].x[j] == 0.0 and bars[2].x[j] == -1.0
    assert {t.xaxis for t in bars} == {"x", "x2", "x3"}
    assert fig.layout.xaxis2.matches == "x"  # before and after share a scale
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["before", "after", "after − before"]
    top = circuit_diff_figure(before, after, top=3)
    assert all(len(t.y) == 3 for t in top.data)
    # Circuits work as inputs too.
    c = Circuit.from_attribution(_attribution())
    assert len(circuit_diff_figure(c, c).data[2].x) == n


def test_faithfulness_curve_and_fact_figures():
    from workbench.faces.plots import faithfulness_curve_figure
    from workbench.interpretability.faithfulness import FaithfulnessCurve

    curve = FaithfulnessCurve(ranking=(head(0, 1), mlp(2), head(2, 3)), ks=(1, 2, 3), recovered=(0.2, 0.5, 0.9),
                              drop=(0.1, 0.4, 0.8), ablation="corrupt", metric="kl", clean_metric=0.0,
                              floor_metric=-3.0)
    fig = faithfulness_curve_figure(curve)
    rec, drop = fig.data
    assert list(rec.x) == [1, 2, 3] and list(rec.y) == [0.2, 0.5, 0.9] and list(drop.y) == [0.1, 0.4, 0.8]
    assert list(rec.customdata) == ["L0.H1", "L2.MLP", "L2.H3"] and "kl" in fig.layout.title.text


def test_history_figure_draws_only_the_points_each_run_measured():
    from workbench.faces.plots import history_figure

    # a baseline: forget every step, retain and the quantized model at steps 2 and 3 only
    baseline = [{"step": 1, "loss": 0.5, "forget_top1": 0.9},
                {"step": 2, "loss": 0.4, "forget_top1": 0.7, "forget_top1_q": 0.8, "retain_top1": 0.95,
                 "retain_top1_q": 0.9},
                {"step": 3, "loss": 0.3, "forget_top1": 0.5, "forget_top1_q": 0.6, "retain_top1": 0.93,
                 "retain_top1_q": 0.88}]
    # MANSU on a multiple-choice forget set: MC decides, so its panel plots MC
    mansu = [{"step": 1, "forget_mc": 0.6, "forget_mc_q": 0.7, "forget_top1": 0.5, "forget_top1_q": 0.5,
              "retain_top1": 1.0}]
    fig = history_figure({"ga": baseline, "mansu": mansu})
    traces = {(t.name, t.xaxis): (list(t.x), list(t.y)) for t in fig.data}
    assert traces == {
        ("ga, full precision", "x"): ([1, 2, 3], [0.9, 0.7, 0.5]),
        ("ga, quantized", "x"): ([2, 3], [0.8, 0.6]),
        ("ga, full precision", "x2"): ([2, 3], [0.95, 0.93]),
        ("ga, quantized", "x2"): ([2, 3], [0.9, 0.88]),
        ("mansu, full precision", "x"): ([1], [0.6]),
        ("mansu, quantized", "x"): ([1], [0.7]),
        ("mansu, full precision", "x2"): ([1], [1.0]),
    }
    assert {t.line.dash for t in fig.data if t.name.endswith("quantized")} == {"dash"}
    empty = history_figure({"old run": [{"step": 1, "loss": 0.1}]})
    assert not empty.data and any("no per-step record" in a.text for a in empty.layout.annotations)
