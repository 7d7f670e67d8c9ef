"""Plotly figures shared by every face (Gradio, notebooks, CLI exports). No UI knowledge here.

Conventions: signed scores use one diverging scale (:data:`DIVERGING`, red = positive,
blue = negative) centred at 0; every trace whose points stand for components carries
the component name in ``customdata`` so a face can map a click to a node.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.core.components import LOGITS, Component, ComponentKind
from workbench.core.errors import WorkbenchError
from workbench.interpretability.attribution import Attribution
from workbench.interpretability.circuit import Circuit, component_order
from workbench.interpretability.faithfulness import FaithfulnessCurve
from workbench.measurement.results import UpdateMetrics
from workbench.quant import QuantConfig, code_order, code_table

DIVERGING = "RdBu_r"
"""Colour scale for signed scores (blue < 0 < red), always with its midpoint at 0."""

POSITIVE, NEGATIVE = "#b2182b", "#2166ac"
SELECTED_OUTLINE = "#111111"
UNSELECTED_OUTLINE = "#bbbbbb"
UNSELECTED_OPACITY = 0.3

_SYMBOL = {ComponentKind.HEAD: "circle", ComponentKind.MLP: "square", ComponentKind.EMBED: "diamond",
           ComponentKind.LOGITS: "diamond"}

ScoresLike = Mapping[Component | str, float] | Circuit | Any


def _scores(obj: ScoresLike) -> dict[Component, float]:
    """Scores from a Circuit, an Attribution, or a mapping keyed by Component or name."""
    if isinstance(obj, Circuit):
        return obj.scores
    scores = getattr(obj, "scores", None)  # an Attribution (or any object with scores)
    if isinstance(scores, Mapping):
        obj = scores
    out: dict[Component, float] = {}
    for key, value in obj.items():
        comp = key if isinstance(key, Component) else Component.parse(str(key))
        out[comp] = float(value)
    return out


def _ordered(comps) -> list[Component]:
    return sorted(comps, key=component_order)


def _abs_max(values) -> float:
    finite = [abs(v) for v in values if math.isfinite(v)]
    m = max(finite, default=0.0)
    return m if m > 0 else 1.0


# --- the circuit graph ------------------------------------------------------------------


def node_positions(n_layers: int, n_heads: int) -> dict[str, tuple[float, float]]:
    """Layout of :func:`circuit_figure`: x = layer column, y = head row (MLP centred, right of heads)."""
    mid = (n_heads - 1) / 2
    pos: dict[str, tuple[float, float]] = {"embed": (-1.0, mid), "logits": (float(n_layers), mid)}
    for layer in range(n_layers):
        for h in range(n_heads):
            pos[f"L{layer}.H{h}"] = (float(layer), float(n_heads - 1 - h))
        pos[f"L{layer}.MLP"] = (layer + 0.5, mid)
    return pos


def circuit_figure(circuit: Circuit, *, show_edges: bool = True, max_edges: int = 200) -> go.Figure:
    """The circuit as a layered graph.

    Layers run left to right (embed first, logits last); heads are circles stacked in
    their layer's column, each MLP a square half a column to the right. Colour = signed
    score (diverging, centred at 0), size ∝ |score|. Selected nodes are opaque with a
    dark outline, unselected ones faded with a light outline (two traces, ``selected``
    and ``unselected``). Edges (the ``max_edges`` of largest |score|) have width
    ∝ |score|, red/blue by sign, faded unless both ends are selected.
    ``customdata`` of every node trace holds the component names.
    """
    pos = node_positions(circuit.n_layers, circuit.n_heads)
    scores = circuit.scores
    vmax = _abs_max(scores.values())
    fig = go.Figure()

    if show_edges and max_edges > 0:
        _add_edges(fig, circuit, pos, max_edges)

    selected = circuit.selected
    for is_sel in (False, True):
        comps = [c for c in scores if (c in selected) == is_sel]
        xs = [pos[c.name][0] for c in comps]
        ys = [pos[c.name][1] for c in comps]
        vals = [scores[c] for c in comps]
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers",
            name="selected" if is_sel else "unselected",
            customdata=[c.name for c in comps],
            text=[f"<b>{c.name}</b><br>score {scores[c]:+.4g}<br>{'in' if is_sel else 'not in'} circuit"
                  for c in comps],
            hovertemplate="%{text}<extra></extra>",
            marker=dict(
                symbol=[_SYMBOL[c.kind] for c in comps],
                size=[10 + 26 * min(1.0, abs(v) / vmax) if math.isfinite(v) else 10 for v in vals],
                color=vals, colorscale=DIVERGING, cmin=-vmax, cmax=vmax, cmid=0.0,
                opacity=1.0 if is_sel else UNSELECTED_OPACITY,
                line=dict(color=SELECTED_OUTLINE if is_sel else UNSELECTED_OUTLINE, width=2.5 if is_sel else 0.8),
                showscale=is_sel,
                colorbar=dict(title="score", thickness=12) if is_sel else None,
            ),
        ))
    fig.add_trace(go.Scatter(
        x=[pos["logits"][0]], y=[pos["logits"][1]], mode="markers+text", name="logits",
        customdata=[LOGITS.name], text=["logits"], textposition="middle right",
        hovertemplate="<b>logits</b> (readout; always in the circuit)<extra></extra>",
        marker=dict(symbol="diamond", size=16, color="#444444", line=dict(color=SELECTED_OUTLINE, width=2)),
        showlegend=False,
    ))
    ticks = [-1.0, *range(circuit.n_layers), float(circuit.n_layers)]
    labels = ["embed", *(f"L{layer}" for layer in range(circuit.n_layers)), "logits"]
    fig.update_layout(
        title=f"Circuit: {len(selected)} of {len(circuit)} components selected "
              f"({circuit.method}, {circuit.metric})",
        xaxis=dict(tickvals=ticks, ticktext=labels, showgrid=False, zeroline=False, title="layer"),
        yaxis=dict(tickvals=list(range(circuit.n_heads)),
                   ticktext=[f"H{circuit.n_heads - 1 - i}" for i in range(circuit.n_heads)],
                   showgrid=False, zeroline=False),
        plot_bgcolor="white", hovermode="closest", clickmode="event",
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0),
        margin=dict(l=40, r=20, t=70, b=40),
    )
    return fig


def _add_edges(fig: go.Figure, circuit: Circuit, pos: dict[str, tuple[float, float]], max_edges: int) -> None:
    edges = circuit.strongest_edges(max_edges)
    if not edges:
        return
    emax = _abs_max(v for _, v, _ in edges)
    # Plotly draws one width per trace: bucket edges by (sign, selected, width bin).
    n_bins = 4
    buckets: dict[tuple[bool, bool, int], list[tuple[Any, float]]] = {}
    for key, value, is_selected in edges:
        b = min(n_bins - 1, int(n_bins * abs(value) / emax)) if math.isfinite(value) else 0
        buckets.setdefault((value >= 0, is_selected, b), []).append((key, value))
    mid_x, mid_y, mid_text = [], [], []
    for (positive, is_sel, b), items in sorted(buckets.items()):
        xs: list[float | None] = []
        ys: list[float | None] = []
        for (writer, reader, inp), value in items:
            (x0, y0), (x1, y1) = pos[writer.name], pos[reader.name]
            xs += [x0, x1, None]
            ys += [y0, y1, None]
            mid_x.append((x0 + x1) / 2)
            mid_y.append((y0 + y1) / 2)
            mid_text.append(f"{writer.name} → {reader.name} ({inp})<br>score {value:+.4g}")
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
            name=f"edges {'+' if positive else '−'} {'selected' if is_sel else 'unselected'}",
            line=dict(color=POSITIVE if positive else NEGATIVE, width=0.8 + 1.6 * (b + 1)),
            opacity=0.75 if is_sel else 0.15,
        ))
    fig.add_trace(go.Scatter(
        x=mid_x, y=mid_y, mode="markers", name="edge info", showlegend=False,
        marker=dict(size=6, opacity=0.0), text=mid_text, hovertemplate="%{text}<extra></extra>",
    ))


# --- heatmap ------------------------------------------------------------------------------


def head_heatmap(source: Attribution | Circuit | Any, *, title: str | None = None) -> go.Figure:
    """Layer × head heatmap of signed scores, the layer's MLP as the last column.

    ``source`` is an ``Attribution`` or a ``Circuit`` (then selected cells are marked ●).
    ``customdata`` holds each cell's component name.
    """
    n_layers, n_heads = int(source.n_layers), int(source.n_heads)
    scores = _scores(source)
    selected = source.selected if isinstance(source, Circuit) else set()
    z: list[list[float | None]] = []
    names: list[list[str]] = []
    marks: list[list[str]] = []
    for layer in range(n_layers):
        row_comps = [Component(ComponentKind.HEAD, layer, h) for h in range(n_heads)]
        row_comps.append(Component(ComponentKind.MLP, layer))
        z.append([scores.get(c) for c in row_comps])
        names.append([c.name for c in row_comps])
        marks.append(["●" if c in selected else "" for c in row_comps])
    vmax = _abs_max(v for row in z for v in row if v is not None)
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"H{h}" for h in range(n_heads)] + ["MLP"], y=[f"L{layer}" for layer in range(n_layers)],
        customdata=names, text=marks, texttemplate="%{text}", textfont=dict(size=16),
        colorscale=DIVERGING, zmin=-vmax, zmax=vmax, zmid=0.0,
        hovertemplate="<b>%{customdata}</b><br>score %{z:+.4g}<extra></extra>",
        colorbar=dict(title="score", thickness=12), xgap=1, ygap=1,
    ))
    embed = scores.get(Component(ComponentKind.EMBED))
    default = "Attribution per head and MLP" + (f" (embed {embed:+.3g})" if embed is not None else "")
    fig.update_layout(
        title=title or default, plot_bgcolor="white",
        yaxis=dict(autorange="reversed", title="layer"), xaxis=dict(title="head", side="bottom"),
        margin=dict(l=50, r=20, t=60, b=40),
    )
    return fig


def fact_heatmap(attribution: Attribution, index: int) -> go.Figure:
    """Layer × head heatmap of one fact's scores (:meth:`Attribution.for_fact`)."""
    scores = attribution.for_fact(index)
    prompt = attribution.pair_prompts[index] if index < len(attribution.pair_prompts) else ""
    kind = attribution.pair_kinds[index] if index < len(attribution.pair_kinds) else ""
    source = _FactScores(scores, attribution.n_layers, attribution.n_heads)
    return head_heatmap(source, title=f"Fact {index}: {prompt!r} ({kind} baseline)")


class _FactScores:
    """What :func:`head_heatmap` reads: ``n_layers``, ``n_heads`` and ``scores``."""

    def __init__(self, scores: dict[Component, float], n_layers: int, n_heads: int):
        self.scores, self.n_layers, self.n_heads = scores, n_layers, n_heads


def faithfulness_curve_figure(curve: FaithfulnessCurve, *, title: str | None = None) -> go.Figure:
    """Recovered and drop against circuit size k (top-k heads/MLPs), the added component on hover."""
    added = [c.name for c in curve.ranking]
    fig = go.Figure()
    for name, values, dash in (("recovered (circuit alone)", curve.recovered, "solid"),
                               ("drop (circuit ablated)", curve.drop, "dash")):
        fig.add_trace(go.Scatter(
            x=list(curve.ks), y=list(values), mode="lines+markers", name=name, customdata=added,
            line=dict(dash=dash), hovertemplate="k=%{x} (+%{customdata})<br>%{y:.3f}<extra>" + name + "</extra>",
        ))
    fig.add_hline(y=1.0, line=dict(color="grey", width=1, dash="dot"))
    fig.add_hline(y=0.0, line=dict(color="grey", width=1, dash="dot"))
    fig.update_layout(
        title=title or f"Faithfulness over circuit size ({curve.ablation} ablation, {curve.metric}; "
                       "embedding and unembedding always kept)",
        xaxis=dict(title="k (top-k heads and MLPs by |score|)"), yaxis=dict(title="fraction of clean − floor"),
        plot_bgcolor="white", margin=dict(l=50, r=20, t=60, b=40),
    )
    return fig


# --- method agreement ---------------------------------------------------------------------


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN if undefined."""
    if len(a) < 2:
        return float("nan")
    import warnings

    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input -> NaN, reported as "n/a"
        rho = spearmanr(a, b).statistic  # pyright: ignore[reportAttributeAccessIssue] -- scipy's result stub
    return float(rho) if rho is not None else float("nan")


def agreement_scatter(
    a_scores: ScoresLike, b_scores: ScoresLike, labels: tuple[str, str] = ("atp", "exact")
) -> go.Figure:
    """Scores of one method against another on their common components, with y = x and Spearman ρ."""
    a, b = _scores(a_scores), _scores(b_scores)
    comps = _ordered(a.keys() & b.keys())
    xs, ys = [a[c] for c in comps], [b[c] for c in comps]
    rho = spearman(xs, ys)
    fig = go.Figure()
    finite = [v for v in xs + ys if math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(finite), max(finite)
    pad = 0.05 * (hi - lo or 1.0)
    fig.add_trace(go.Scatter(
        x=[lo - pad, hi + pad], y=[lo - pad, hi + pad], mode="lines", name="y = x",
        line=dict(color="#888888", dash="dash", width=1), hoverinfo="skip",
    ))
    for kind, colour in ((ComponentKind.HEAD, "#1b9e77"), (ComponentKind.MLP, "#d95f02"),
                         (ComponentKind.EMBED, "#7570b3")):
        group = [c for c in comps if c.kind is kind]
        if not group:
            continue
        fig.add_trace(go.Scatter(
            x=[a[c] for c in group], y=[b[c] for c in group], mode="markers", name=kind.value,
            customdata=[c.name for c in group],
            marker=dict(color=colour, symbol=_SYMBOL[kind], size=9, line=dict(color="white", width=0.5)),
            hovertemplate=(
                f"<b>%{{customdata}}</b><br>{labels[0]} %{{x:+.4g}}<br>{labels[1]} %{{y:+.4g}}<extra></extra>"
            ),
        ))
    rho_text = f"{rho:.3f}" if math.isfinite(rho) else "n/a"
    fig.update_layout(
        title=f"{labels[0]} vs {labels[1]}: Spearman ρ = {rho_text} (n = {len(comps)})",
        xaxis=dict(title=labels[0], zeroline=True), yaxis=dict(title=labels[1], zeroline=True, scaleanchor="x"),
        plot_bgcolor="white", margin=dict(l=50, r=20, t=60, b=40),
    )
    return fig


# --- before / after -----------------------------------------------------------------------


def circuit_diff_figure(
    before_scores: ScoresLike,
    after_scores: ScoresLike,
    *,
    labels: tuple[str, str] = ("before", "after"),
    top: int | None = None,
) -> go.Figure:
    """Per-node bars in three aligned panels: before | after | difference (after − before).

    Nodes are rows (forward order, shared y axis); a node missing on one side counts as 0.
    The before and after panels share one x scale. ``top`` keeps the nodes with the
    largest max(|before|, |after|, |difference|).
    ``customdata`` of every bar trace holds the component names.
    """
    a, b = _scores(before_scores), _scores(after_scores)
    comps = _ordered(a.keys() | b.keys())
    if top is not None and len(comps) > top:
        def weight(c: Component) -> float:
            x, y = a.get(c, 0.0), b.get(c, 0.0)
            return max(abs(x), abs(y), abs(y - x))
        keep = set(sorted(comps, key=weight, reverse=True)[: max(0, top)])
        comps = [c for c in comps if c in keep]
    names = [c.name for c in comps]
    before = [a.get(c, 0.0) for c in comps]
    after = [b.get(c, 0.0) for c in comps]
    delta = [y - x for x, y in zip(before, after, strict=True)]
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=(labels[0], labels[1], f"{labels[1]} − {labels[0]}"))
    for col, (label, values) in enumerate(((labels[0], before), (labels[1], after), ("difference", delta)), start=1):
        fig.add_trace(go.Bar(
            x=values, y=names, orientation="h", name=label, customdata=names,
            marker=dict(color=[POSITIVE if v >= 0 else NEGATIVE for v in values]),
            hovertemplate=f"<b>%{{customdata}}</b><br>{label} %{{x:+.4g}}<extra></extra>",
            showlegend=False,
        ), row=1, col=col)
    fig.update_xaxes(matches="x", row=1, col=2)  # before and after on one scale
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(zeroline=True, zerolinecolor="#888888")
    fig.update_layout(
        title="Attribution per component, before and after",
        height=max(300, 18 * len(names) + 120), plot_bgcolor="white", bargap=0.25,
        margin=dict(l=70, r=20, t=70, b=40),
    )
    return fig


# --------------------------------------------------------------------------- before/after of an update
# These read a run's metrics (the quantization analysis, ``metrics.quantization``, is
# ``QuantComparison.to_dict()``), so a saved run draws the same figures as a live one.

BEFORE_COLOUR, AFTER_COLOUR = "#7f7f7f", "#d62728"
VARIANT_LABELS = {"base_fp": "base fp", "base_q": "base Q(w)", "after_fp": "after fp w+Δ",
                  "after_qbase_delta": "Q(w)+Δ", "after_q": "after Q(w+Δ)"}


def quantization_module(quantization: Mapping[str, Any], module: str = "overall") -> dict[str, Any]:
    """One module's comparison dict (``"overall"`` or an HF parameter name)."""

    if module == "overall":
        return dict(quantization["overall"])
    for m in quantization["modules"]:
        if m["name"] == module:
            return dict(m)
    raise WorkbenchError(f"no quantization analysis for module {module!r}")


def _code_labels(quantization: Mapping[str, Any], n: int) -> list[str]:

    cfg = QuantConfig.from_dict(quantization["config"])
    values = code_table(cfg)[code_order(cfg)].tolist()
    if len(values) != n:
        return [str(i) for i in range(n)]
    return [f"{v:+.3f}" for v in values] if n <= 16 else [f"{v:+.2f}" for v in values]


def occupancy_figure(quantization: Mapping[str, Any], module: str = "overall", *,
                     title: str | None = None) -> go.Figure:
    """Code occupancy of ``Q(w)`` | ``Q(w+Δ)`` | the difference, for one module or overall.

    Bars are codes in ascending value (x labels are the normalised code values); y is the
    number of weights per code. A sparse update that crosses bins shows as a visible
    difference panel; an update rounded away leaves it empty.
    """
    m = quantization_module(quantization, module)
    before, after = list(m.get("occupancy_before") or []), list(m.get("occupancy_after") or [])
    if not before:

        raise WorkbenchError("this run's metrics have no bin occupancy (saved by an older version)")
    labels = _code_labels(quantization, len(before))
    diff = [b - a for a, b in zip(before, after, strict=True)]
    label = quantization.get("label", "quantized")
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.06,
                        subplot_titles=(f"before: {label} of w", f"after: {label} of w+Δ", "after − before"))
    fig.add_trace(go.Bar(x=labels, y=before, name="before", marker_color=BEFORE_COLOUR,
                         hovertemplate="code %{x}<br>%{y:,} weights<extra>before</extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=labels, y=after, name="after", marker_color=AFTER_COLOUR,
                         hovertemplate="code %{x}<br>%{y:,} weights<extra>after</extra>"), row=1, col=2)
    fig.add_trace(go.Bar(x=labels, y=diff, name="after − before",
                         marker_color=[POSITIVE if d >= 0 else NEGATIVE for d in diff],
                         hovertemplate="code %{x}<br>%{y:+,} weights<extra>difference</extra>"), row=1, col=3)
    fig.update_yaxes(matches="y", row=1, col=2)
    fig.update_xaxes(type="category", tickangle=-60, tickfont=dict(size=9))
    flips = m.get("code_flips", 0)
    fig.update_layout(
        title=title or f"Bin occupancy, {module} ({flips:,} of {m['n_weights']:,} codes changed)",
        showlegend=False, plot_bgcolor="white", height=360, bargap=0.1, margin=dict(l=60, r=20, t=70, b=70),
    )
    return fig


def update_ratio_figure(runs: Mapping[str, Mapping[str, Any]], *, title: str | None = None) -> go.Figure:
    """Distribution of ``|Δw| / bin width`` over changed weights, one line per run, log x.

    ``runs`` maps a label to a run's ``metrics.quantization``. y is the fraction of the run's
    changed weights per histogram bin. The dashed line at 1 is one local bin width: a move
    that large always changes the code; a move of r < 1 bin crosses a boundary with
    probability ≈ r (the distance to the next boundary is spread over the bin).
    """
    fig = go.Figure()
    for label, q in runs.items():
        o = q["overall"]
        counts = list(o.get("ratio_counts") or [])
        edges = list(q.get("ratio_edges") or [])
        total = sum(counts) + o.get("ratio_below", 0) + o.get("ratio_above", 0)
        if not counts or total == 0:
            continue
        centres = [math.sqrt(a * b) for a, b in itertools.pairwise(edges)]
        fig.add_trace(go.Scatter(x=centres, y=[c / total for c in counts], mode="lines", name=label,
                                 line=dict(shape="hvh"),
                                 hovertemplate=f"{label}<br>|Δw|/bin ≈ %{{x:.3g}}<br>"
                                               "%{y:.2%} of changed weights<extra></extra>"))
    fig.add_vline(x=1.0, line_dash="dash", line_color="#333333",
                  annotation_text="one bin width: always crosses", annotation_position="top left")
    fig.update_xaxes(type="log", title="|Δw| / local bin width (changed weights)")
    fig.update_yaxes(title="fraction of changed weights", tickformat=".0%")
    fig.update_layout(title=title or "How far each changed weight moved, in bin widths",
                      plot_bgcolor="white", height=360, margin=dict(l=60, r=20, t=60, b=50))
    return fig


RUN_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
"""One colour per run, in order, in every figure that overlays runs."""


def accuracy_figure(metrics: UpdateMetrics | Mapping[str, UpdateMetrics], *, title: str | None = None) -> go.Figure:
    """Forget | retain top-1 for the five variants (base fp, Q(w), w+Δ, Q(w)+Δ, Q(w+Δ)).

    ``metrics`` is one run's metrics, or a mapping label → metrics for several runs (one
    bar series per run). The PTQ gap is the step from "after fp" to "after Q(w+Δ)";
    Q(w)+Δ splits it into the base's own quantization shift and the rounding of Δ.
    """
    runs = {"run": metrics} if isinstance(metrics, UpdateMetrics) else dict(metrics)
    variants = list(VARIANT_LABELS)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=("forget top-1 (lower = forgotten)",
                                                                          "retain top-1 (higher = kept)"))
    for i, (label, m) in enumerate(runs.items()):
        for col, key, accuracies in ((1, "forget", m.forget), (2, "retain", m.retain)):
            ys = [accuracies.by_variant()[v] for v in variants]
            fig.add_trace(go.Bar(x=[VARIANT_LABELS[v] for v in variants], y=ys, name=label,
                                 marker_color=RUN_COLOURS[i % len(RUN_COLOURS)],
                                 showlegend=(col == 1 and len(runs) > 1),
                                 text=[None if y is None else f"{y:.2f}" for y in ys], textposition="outside",
                                 hovertemplate=f"{label}<br>%{{x}}: %{{y:.3f}}<extra>{key}</extra>"),
                          row=1, col=col)
    gaps = ", ".join(f"{label} {m.ptq_gap:+.3f}" for label, m in runs.items())
    fig.update_yaxes(range=[0, 1.12], tickformat=".0%")
    fig.update_layout(title=title or f"Accuracy in full precision vs quantized (PTQ gap: {gaps})",
                      barmode="group", plot_bgcolor="white", height=380, margin=dict(l=60, r=20, t=70, b=60))
    return fig


HISTORY_PANELS = {"forget": ("forget_mc", "forget_top1"), "retain": ("retain_mc", "retain_top1")}
"""Per panel, the history keys it plots, the deciding one first (multiple choice where measured)."""


def _history_key(history: Sequence[Mapping[str, float]], panel: str) -> str | None:
    """The key a panel plots: the first of :data:`HISTORY_PANELS` any record carries."""
    return next((k for k in HISTORY_PANELS[panel] if any(k in r for r in history)), None)


def history_figure(histories: Mapping[str, Sequence[Mapping[str, float]]], *, title: str | None = None) -> go.Figure:
    """Forget | retain accuracy over each run's steps (gradient methods) or kept rounds (MANSU),
    full precision solid and quantized dashed, one colour per run. Only the points a run
    measured are drawn: a baseline reads retain and the quantized model every few steps
    (:class:`~workbench.unlearning.readings.LoopReadings`), MANSU's guard reads retain on its sample."""
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True,
                        subplot_titles=("forget (lower = forgotten)", "retain on a sample (higher = kept)"))
    for i, (label, history) in enumerate(histories.items()):
        for col, panel in ((1, "forget"), (2, "retain")):
            key = _history_key(history, panel)
            for suffix, dash, precision in (("", "solid", "full precision"), ("_q", "dash", "quantized")):
                points = [(r["step"], r[key + suffix]) for r in history if key and key + suffix in r and "step" in r]
                if not points:
                    continue
                xs, ys = zip(*points)
                fig.add_trace(go.Scatter(
                    x=list(xs), y=list(ys), mode="lines+markers", name=f"{label}, {precision}", legendgroup=label,
                    line=dict(color=RUN_COLOURS[i % len(RUN_COLOURS)], dash=dash), showlegend=col == 1,
                    # open and larger: visible around the full-precision point when the two agree
                    marker=dict(symbol="circle-open" if suffix else "circle", size=10 if suffix else 6),
                    hovertemplate=f"{label}<br>step %{{x}}: %{{y:.3f}}<extra>{key}{suffix}</extra>"), row=1, col=col)
    if not fig.data:
        fig.add_annotation(text="no per-step record in these runs", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
    fig.update_xaxes(title="step (gradient methods) or round (MANSU)")
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%")
    fig.update_layout(title=title or "Forget and retain while unlearning, full precision vs quantized",
                      plot_bgcolor="white", height=380, margin=dict(l=60, r=20, t=70, b=60))
    return fig


def live_history_figure(records: Sequence[Mapping[str, float]]) -> go.Figure:
    """:func:`history_figure` of the run going on: the app's and the widget's live plot."""
    return history_figure({"this run": records}, title="Forget and retain so far")


def cad_diff_figure(metrics: UpdateMetrics, which: str = "fp", *, top: int | None = 30) -> go.Figure:
    """Per-node attribution before | after | difference behind a run's CAD (``which``:
    ``"fp"`` = w vs w+Δ, ``"quantized"`` = Q(w) vs Q(w+Δ))."""

    cad = metrics.cad
    if cad is None:
        raise WorkbenchError("this run was measured without CAD (no attribution before/after)")
    per_node = cad.detail(quantized=which == "quantized")["per_node"]
    before = {name: v[0] for name, v in per_node.items()}
    after = {name: v[1] for name, v in per_node.items()}
    label = "full precision" if which == "fp" else "quantized"
    fig = circuit_diff_figure(before, after, labels=("before", "after"), top=top)
    score = cad.quantized if which == "quantized" else cad.fp
    fig.update_layout(title=f"Attribution per component, {label} (CAD {score:.3f})")
    return fig


__all__ = [
    "DIVERGING",
    "accuracy_figure",
    "agreement_scatter",
    "cad_diff_figure",
    "circuit_diff_figure",
    "circuit_figure",
    "head_heatmap",
    "history_figure",
    "live_history_figure",
    "node_positions",
    "occupancy_figure",
    "quantization_module",
    "spearman",
    "update_ratio_figure",
]
