"""Side-by-side comparison of saved runs: the table people cite, its figures, and the
one-command paper table (MANSU and every baseline on one split, one quantizer, one stopping rule).

A row per run (a plain dict, column name → value), built from ``metrics.json`` only:

==========================  ==================================================================
``forget base``             forget top-1 of the base in full precision (the starting point)
``forget fp``               forget top-1 of w+Δ (full precision)
``forget Q(w)+Δ``           the exact update on the quantized base (docs/SCIENCE.md §6.2 control)
``forget nf4/fp4/int8``     forget top-1 of Q(w+Δ) under each quantizer (the run's own one
                            from ``metrics.json``; the others only with :func:`quantizer_accuracies`)
``forget exact fp / Q``     greedy exact match of the whole answer, w+Δ / Q(w+Δ) (the run's
                            quantizer); only when the runs measured it (``metrics.json`` v3)
``forget MC fp / Q``        multiple-choice accuracy of w+Δ / Q(w+Δ), for a run whose forget set
                            is multiple choice (what its forgetting and PTQ properties judged)
``retain fp / nf4 / ...``   the same for the retain set
``PTQ gap``                 forget(Q(w+Δ)) − forget(w+Δ), the run's quantizer
``gap base shift``          forget(Q(w)+Δ) − forget(w+Δ): the base's own quantization noise
``gap rounding``            forget(Q(w+Δ)) − forget(Q(w)+Δ): the update rounded away
``bucket/code overlap``     fraction of weights whose code (and block scale) is unchanged
``codes changed``           weights whose quantized code changed
``median/p90 |Δw|/bin``     over changed quantized weights, in local bin widths
``params changed``          non-zero entries of the update
``CAD fp / CAD Q``          circuit attribution divergence, full precision / quantized
``CAD oracle``              CAD(base, retrain oracle) on the forget set: the calibration (when an oracle exists)
``CAD / oracle``            the weaker of CAD fp and CAD Q as a fraction of CAD oracle
``τ``                       the structural threshold the run was judged by
``forgetting ... structural``  the four properties: PASS / fail / – (not measured)
``seconds``                 wall time of the run (unlearn + measure)
==========================  ==================================================================
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from workbench.core.errors import WorkbenchError
from workbench.data.facts import FactSplit
from workbench.experiments.flow import model_and_split_for_run
from workbench.experiments.jobs import DEFAULT_CIRCUIT, circuit_digest, job_for
from workbench.experiments.store import Run, resolve_run
from workbench.experiments.sweep import ExecutorConfig, JobGroup, RunCallback, run_jobs
from workbench.experiments.sweep_config import ABLATIONS
from workbench.faces.plots import history_figure
from workbench.faces.tables import csv_table, html_table, markdown_table
from workbench.interpretability.circuit import Circuit
from workbench.measurement.evaluation import evaluate_facts
from workbench.measurement.metrics import quantized_states
from workbench.models.builtin_splits import builtin_split
from workbench.models.loaded import LoadedModel
from workbench.quant import QUANT_TYPES, QuantConfig, QuantType
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.readings import LoopReadings
from workbench.unlearning.registry import METHODS, MethodConfig, default_lr
from workbench.unlearning.task import OptimConfig, StopRule

FORMATS = {".md": "markdown", ".csv": "csv", ".html": "html"}
BIN_CROSSING_RATIO = 0.5
"""|Δw| / bin width at which a weight sitting at its bin's centre reaches a decision boundary."""

PROPERTY_COLUMNS = {"forgetting": "forgetting", "retain": "retain kept", "ptq": "PTQ gap ok",
                    "structural": "structural"}


def load_runs(refs: Iterable[str], *, root: str | None = None) -> list[Run]:
    """Saved runs by id (in ``root``) or by directory, in the order given (an unknown run
    raises :class:`WorkbenchError`)."""

    refs = list(refs)
    if not refs:
        raise WorkbenchError("no runs given to compare")
    return [resolve_run(ref, root=root) for ref in refs]


def run_labels(runs: Sequence[Run]) -> list[str]:
    """A unique display label per run: its method, plus the id's tail where a method repeats."""
    methods = [r.metrics.method for r in runs]
    return [m if methods.count(m) == 1 else f"{m} ({r.id[-4:]})" for m, r in zip(methods, runs)]


def quantizer_accuracies(
    run: Run,
    types: Sequence[QuantType] = QUANT_TYPES,
    *,
    model: LoadedModel | None = None,
    split: FactSplit | None = None,
) -> dict[str, dict[str, float]]:
    """Forget/retain top-1 of the run's Q(w+Δ) under other quantizers (same block size).

    Cheap: one fake quantization of the decoder weights and two top-1 evaluations per
    quantizer (no multiple choice, no CAD). The run's own quantizer is read from
    ``metrics.json`` rather than recomputed.
    """

    model, split = model_and_split_for_run(run, model=model, split=split)
    update = run.update()
    update.check_fits(model)
    q = run.metrics.quant
    out: dict[str, dict[str, float]] = {}
    if q.type in types:
        out[q.type] = {"forget": run.metrics.forget.after_q, "retain": run.metrics.retain.after_q}
    for t in types:
        if t in out:
            continue
        cfg = QuantConfig(t, blocksize=q.blocksize, double_quant=q.double_quant)
        after = model.with_state(quantized_states(model, update, cfg)["after_q"], f"{model.name}+Δ|{cfg.label}")
        out[t] = {"forget": evaluate_facts(after, split.forget, multiple_choice=False).top1,
                  "retain": evaluate_facts(after, split.retain, multiple_choice=False).top1}
    return out


def compare_row(run: Run, label: str | None = None,
                quantizers: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """One table row from a run's ``metrics.json`` (see the module docstring for the columns)."""
    m = run.metrics
    f, r = m.forget, m.retain
    accs: dict[str, Mapping[str, float]] = dict(quantizers or {})
    accs.setdefault(m.quant.type, {"forget": f.after_q, "retain": r.after_q})
    row: dict[str, Any] = {
        "method": label or m.method,
        "run": run.id,
        "quantizer": m.quant.type,
        "steps": m.steps,
        "stopped": m.stopped,
        "forget base": f.base_fp,
        "forget fp": f.after_fp,
        "forget Q(w)+Δ": f.after_qbase_delta,
    }
    for t in QUANT_TYPES:
        row[f"forget {t}"] = accs.get(t, {}).get("forget")
    # greedy exact match beside first-token top-1 (None for runs saved before it was measured)
    row["forget exact fp"] = m.exact.forget.after_fp if m.exact is not None else None
    row["forget exact Q"] = m.exact.forget.after_q if m.exact is not None else None
    # a multiple-choice forget set is judged on its choice accuracy (None: a top-1 run, no column)
    mc = m.multiple_choice if m.forgetting_basis == "mc" else None
    row["forget MC fp"] = mc.after_fp if mc is not None else None
    row["forget MC Q"] = mc.after_q if mc is not None else None
    row["retain base"] = r.base_fp
    row["retain fp"] = r.after_fp
    for t in QUANT_TYPES:
        row[f"retain {t}"] = accs.get(t, {}).get("retain")
    row.update({
        "PTQ gap": m.ptq_gap,
        "gap base shift": m.ptq_gap_decomposition.base_shift,
        "gap rounding": m.ptq_gap_decomposition.rounding,
        "bucket overlap": m.bucket_overlap,
        "code overlap": m.code_overlap,
        "codes changed": m.codes_changed,
        "median |Δw|/bin": m.update_to_bin_width.median,
        "p90 |Δw|/bin": m.update_to_bin_width.p90,
        "params changed": m.params_changed,
        "CAD fp": m.cad.fp if m.cad is not None else None,
        "CAD Q": m.cad.quantized if m.cad is not None else None,
        "CAD oracle": m.cad.calibration.forget if m.cad is not None and m.cad.calibration is not None else None,
        "CAD / oracle": m.cad.oracle_ratio if m.cad is not None else None,
        "τ": m.properties.structural.threshold if m.cad is not None else None,
    })
    for name, p in m.properties.items():
        row[PROPERTY_COLUMNS[name]] = p.verdict
    row["seconds"] = m.seconds
    return row


def compare_table(
    runs: Sequence[Run],
    *,
    all_quantizers: bool = False,
    progress: Callable[[float, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Rows for ``runs`` (in order). ``all_quantizers`` fills the FP4/NF4/int8 columns the runs
    did not measure by re-evaluating each run's after-model (one model load per base)."""
    from tqdm.auto import tqdm

    labels = run_labels(runs)
    rows = []
    bar = tqdm(total=len(runs), desc="comparing runs", disable=progress is not None or not all_quantizers, leave=False)
    try:
        for i, (run, label) in enumerate(zip(runs, labels)):
            accs = quantizer_accuracies(run) if all_quantizers else None
            rows.append(compare_row(run, label, accs))
            bar.update(1)
            if progress is not None:
                progress((i + 1) / len(runs), f"compared {label}")
    finally:
        bar.close()
    return rows


def sweep_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Rows for a sweep's runs: :func:`compare_table`'s, with the model and split beside the
    method (a sweep repeats each method across models, domains and quantizers)."""
    rows = []
    for run, row in zip(runs, compare_table(runs)):
        m = run.metrics
        rows.append({"method": m.method, "model": m.model, "split": m.split,
                     **{k: v for k, v in row.items() if k != "method"}})
    return rows


# --- writers ---------------------------------------------------------------------------------------


def _present_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every column, minus quantizer columns no row has a value for."""
    cols: dict[str, None] = {}
    for row in rows:
        for k in row:
            cols.setdefault(k, None)
    optional = {f"{s} {t}" for s in ("forget", "retain") for t in QUANT_TYPES} | {
        "CAD oracle", "CAD / oracle", "forget exact fp", "forget exact Q", "forget MC fp", "forget MC Q"}
    return [c for c in cols if c not in optional or any(r.get(c) is not None for r in rows)]


def comparison_markdown(rows: Sequence[Mapping[str, Any]]) -> str:

    return markdown_table(rows, _present_columns(rows))


def comparison_csv(rows: Sequence[Mapping[str, Any]]) -> str:

    return csv_table(rows, _present_columns(rows))


def comparison_html(rows: Sequence[Mapping[str, Any]], figures: Sequence[go.Figure] = (), *,
                    title: str = "Unlearning methods compared") -> str:
    """A self-contained HTML page: the table, then the figures (plotly.js embedded once, so
    the page works offline)."""

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}</style>",
             f"</head><body><h1>{html.escape(title)}</h1>", html_table(rows, _present_columns(rows))]
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    parts.append("</body></html>")
    return "\n".join(parts)


def output_format(path: str | Path) -> str:
    """``markdown`` / ``csv`` / ``html`` from a file name's extension."""
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise WorkbenchError(f"unsupported output extension {ext or '(none)'!r} for {path}: use .md, .csv or .html")
    return FORMATS[ext]


def write_comparison(rows: Sequence[Mapping[str, Any]], path: str | Path, runs: Sequence[Run] | None = None) -> Path:
    """Write the table by the extension of ``path`` (HTML also gets every figure)."""
    fmt = output_format(path)
    if fmt == "markdown":
        text = comparison_markdown(rows) + "\n"
    elif fmt == "csv":
        text = comparison_csv(rows)
    else:
        text = comparison_html(rows, comparison_figures(rows, runs))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # never a half-written table
    return path


# --- figures ----------------------------------------------------------------------------------------

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf", "#393b79", "#637939"]


def forget_fp_vs_quantized_figure(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Forget top-1 per method: full precision w+Δ, Q(w)+Δ, and Q(w+Δ) under each quantizer
    with values; the base's full-precision forget top-1 as a dashed line. A bar that rises
    from "full precision" to a quantizer is knowledge quantization brought back."""
    methods = [r["method"] for r in rows]
    series = [("full precision w+Δ", "forget fp"), ("Q(w)+Δ", "forget Q(w)+Δ")]
    series += [(f"{t.upper()} Q(w+Δ)", f"forget {t}") for t in QUANT_TYPES]
    fig = go.Figure()
    for i, (name, key) in enumerate(series):
        ys = [r.get(key) for r in rows]
        if all(y is None for y in ys):
            continue
        fig.add_trace(go.Bar(x=methods, y=ys, name=name, marker_color=_PALETTE[i % len(_PALETTE)],
                             hovertemplate=f"%{{x}}<br>{name}: %{{y:.3f}}<extra></extra>"))
    bases = {r.get("forget base") for r in rows if r.get("forget base") is not None}
    if len(bases) == 1:
        fig.add_hline(y=bases.pop(), line_dash="dash", line_color="#333333", annotation_text="base (full precision)")
    fig.update_yaxes(range=[0, 1.05], title="forget top-1 (lower = forgotten)", tickformat=".0%")
    fig.update_layout(title="Forget accuracy: full precision vs quantized, per method", barmode="group",
                      plot_bgcolor="white", height=400, margin=dict(l=60, r=20, t=60, b=80))
    return fig


def update_ratio_figure(runs: Sequence[Run], labels: Sequence[str] | None = None) -> go.Figure:
    """Distribution of ``|Δw| / local bin width`` over each run's changed quantized weights, log x.

    From ``run.metrics.quantization`` (histogram ``overall.ratio_counts`` over ``ratio_edges``;
    y = fraction of the run's changed weights per bin). The dotted line at 0.5 is the
    bin-crossing ratio: a weight at its bin's centre crosses a boundary there; below it a
    move crosses only if the weight already sat that close to the boundary.
    """
    labels = list(labels) if labels is not None else run_labels(runs)
    fig = go.Figure()
    for i, (run, label) in enumerate(zip(runs, labels)):
        q = run.metrics.quantization
        o = q.get("overall") or {}
        counts = list(o.get("ratio_counts") or [])
        edges = list(q.get("ratio_edges") or [])
        total = sum(counts) + int(o.get("ratio_below") or 0) + int(o.get("ratio_above") or 0)
        if not counts or total == 0 or len(edges) != len(counts) + 1:
            continue
        centres = [math.sqrt(a * b) for a, b in itertools.pairwise(edges)]
        fig.add_trace(go.Scatter(x=centres, y=[c / total for c in counts], mode="lines+markers", name=label,
                                 line=dict(shape="hvh", color=_PALETTE[i % len(_PALETTE)]),
                                 hovertemplate=f"{label}<br>|Δw|/bin ≈ %{{x:.3g}}<br>%{{y:.2%}}<extra></extra>"))
    fig.add_vline(x=BIN_CROSSING_RATIO, line_dash="dot", line_color="#333333",
                  annotation_text="½ bin: crosses from the bin centre", annotation_position="top left")
    fig.update_xaxes(type="log", title="|Δw| / local bin width (changed quantized weights)")
    fig.update_yaxes(title="fraction of changed weights", tickformat=".0%")
    fig.update_layout(title="Update size in quantization bins, per method", plot_bgcolor="white", height=400,
                      margin=dict(l=60, r=20, t=60, b=50))
    return fig


def bucket_overlap_figure(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Bucket overlap (code and block scale unchanged) and code overlap per method; 1.0 means
    the quantized model is the quantized base, whatever the update did in full precision."""
    methods = [r["method"] for r in rows]
    fig = go.Figure()
    for i, (name, key) in enumerate((("bucket overlap", "bucket overlap"), ("code overlap", "code overlap"))):
        ys = [r.get(key) for r in rows]
        fig.add_trace(go.Bar(x=methods, y=ys, name=name, marker_color=_PALETTE[i],
                             text=[None if y is None else f"{y:.4f}" for y in ys], textposition="outside",
                             hovertemplate=f"%{{x}}<br>{name}: %{{y:.6f}}<extra></extra>"))
    fig.update_yaxes(range=[0, 1.08], title="fraction of quantized weights unchanged", tickformat=".0%")
    fig.update_layout(title="Bucket overlap: quantized after-model vs quantized base", barmode="group",
                      plot_bgcolor="white", height=380, margin=dict(l=60, r=20, t=60, b=80))
    return fig


def ptq_decomposition_figure(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Each PTQ gap stacked from its two parts (docs/SCIENCE.md §6.2): the base's own quantization
    shift w+Δ → Q(w)+Δ and the rounding of the update Q(w)+Δ → Q(w+Δ); a diamond marks the
    total. Only the rounding part is quantization undoing the update."""
    methods = [r["method"] for r in rows]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=methods, y=[r.get("gap base shift") for r in rows], name="base shift: Q(w)+Δ − (w+Δ)",
                         marker_color="#7f7f7f", hovertemplate="%{x}<br>base shift %{y:+.3f}<extra></extra>"))
    fig.add_trace(go.Bar(x=methods, y=[r.get("gap rounding") for r in rows], name="rounding: Q(w+Δ) − (Q(w)+Δ)",
                         marker_color="#d62728", hovertemplate="%{x}<br>rounding %{y:+.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=methods, y=[r.get("PTQ gap") for r in rows], mode="markers", name="PTQ gap",
                             marker=dict(symbol="diamond", size=11, color="#000000"),
                             hovertemplate="%{x}<br>PTQ gap %{y:+.3f}<extra></extra>"))
    fig.add_hline(y=0.0, line_color="#333333", line_width=1)
    fig.update_yaxes(title="Δ forget top-1 (quantized − full precision)", tickformat="+.0%")
    fig.update_layout(title="PTQ gap decomposed: base quantization shift + rounding of the update",
                      barmode="relative", plot_bgcolor="white", height=400, margin=dict(l=70, r=20, t=60, b=80))
    return fig


def comparison_figures(rows: Sequence[Mapping[str, Any]], runs: Sequence[Run] | None = None) -> list[go.Figure]:
    """The comparison figures: three from the table's rows, and with the runs themselves also the
    |Δw| distribution and forget/retain over each run's steps (rounds) last."""
    figs = [forget_fp_vs_quantized_figure(rows), ptq_decomposition_figure(rows), bucket_overlap_figure(rows)]
    if runs is not None:
        labels = [r["method"] for r in rows]
        figs.insert(1, update_ratio_figure(runs, labels))
        # a method twice in the table (two seeds, two circuits) is told apart by its run id
        unique = [label if labels.count(label) == 1 else f"{label} · {run.id}" for label, run in zip(labels, runs)]
        figs.append(history_figure({label: run.history for label, run in zip(unique, runs)}))
    return figs


# --- the paper table ---------------------------------------------------------------------------------


def paper_table(
    model: LoadedModel,
    *,
    methods: Sequence[str] | None = None,
    split: FactSplit | None = None,
    stop: StopRule | None = None,
    quant: QuantConfig | None = None,
    measure_cad: bool = True,
    oracle: LoadedModel | None = None,
    runs_root: str | None = None,
    progress: Callable[[float, str], None] | None = None,
    executor: ExecutorConfig | None = None,
    on_run: RunCallback | None = None,
    readings: LoopReadings | None = None,
) -> list[Run]:
    """Run MANSU and every baseline on one split with one budget; return the saved runs.

    Shared across methods: the split (default the model's built-in one), the quantizer, the
    circuit (attributed once; MANSU edits inside it, baselines use it for CAD), the forget
    target and the step budget of :class:`~workbench.unlearning.StopRule` (MANSU stops when
    full-precision *and* quantized forget top-1 reach the same target, within its own round
    budget), and each method's default learning rate for this model.

    Each method is a :class:`~workbench.experiments.jobs.Job` saved as a run that records its
    key: a second call with the same arguments and ``runs_root`` skips the finished ones
    (resume), and ``executor`` runs the rest in worker processes or on Ray. ``on_run`` sees
    each newly finished run (experiment tracking). ``readings``: what the baselines' loop reads
    for progress and history besides (default :class:`LoopReadings`; it changes no result).
    """

    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise WorkbenchError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    stop = stop or StopRule()
    jobs: list[_Method] = []
    for method in methods:
        if method == "mansu":
            target = stop.forget_target if stop.forget_target is not None else 0.1
            jobs.append(_Method(method, method_config=MansuConfig(forget_target=target)))
        else:
            jobs.append(_Method(method, optim=OptimConfig(lr=default_lr(model)), stop=stop))
    return _table_runs(model, jobs, split=split, quant=quant, measure_cad=measure_cad,
                       needs_circuit="mansu" in methods, oracle=oracle, runs_root=runs_root, progress=progress,
                       executor=executor, on_run=on_run, readings=readings)


def check_ablations(ablations: Sequence[str]) -> list[str]:
    """``ablations`` as a list without repeats, each one of :data:`ABLATIONS` (else a clear error)."""
    names = list(dict.fromkeys(a.strip() for a in ablations if a.strip()))
    unknown = [a for a in names if a not in ABLATIONS]
    if not names or unknown:
        what = f"unknown ablation(s) {', '.join(unknown)}" if unknown else "no ablation named"
        raise WorkbenchError(f"{what}; choose from {', '.join(ABLATIONS)}")
    return names


def ablation_table(
    model: LoadedModel,
    *,
    ablations: Sequence[str] = ABLATIONS,
    config: MansuConfig | None = None,
    split: FactSplit | None = None,
    quant: QuantConfig | None = None,
    circuit: Circuit | None = None,
    measure_cad: bool = True,
    oracle: LoadedModel | None = None,
    runs_root: str | None = None,
    progress: Callable[[float, str], None] | None = None,
    executor: ExecutorConfig | None = None,
    on_run: RunCallback | None = None,
) -> list[Run]:
    """Run MANSU, then MANSU with each component in ``ablations`` switched off alone.

    Everything else is shared: ``config`` (default :class:`MansuConfig`), the split, the
    quantizer and the circuit (attributed once when not given). The first run is the full
    method; run labels (``mansu-no_floor`` …) name what was switched off. Which component
    carries which property is read off the resulting comparison. Resume, ``executor`` and
    ``on_run`` as in :func:`paper_table`.
    """
    config = config or MansuConfig()
    configs = [config] + [replace(config, **{f"use_{a}": False}) for a in check_ablations(ablations)]
    return _table_runs(model, [_Method("mansu", method_config=c) for c in configs], split=split, quant=quant,
                       measure_cad=measure_cad, needs_circuit=True, circuit=circuit, oracle=oracle,
                       runs_root=runs_root, progress=progress, executor=executor, on_run=on_run)


def ablation_findings(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """What switching each component off changed, read off :func:`compare_table` rows of an
    ablation table (first row: the full method). One line per ablated row: the properties
    whose verdict flipped, and the change in quantized forget accuracy, retain and weights moved.
    """
    if len(rows) < 2:
        return []
    full = rows[0]
    own = full.get("quantizer") or "nf4"
    lines = []
    for row in rows[1:]:
        flips = [f"{title} {full.get(title)} → {row.get(title)}" for title in PROPERTY_COLUMNS.values()
                 if full.get(title) != row.get(title)]
        changes = []
        for key, fmt in ((f"forget {own}", "{:+.3f}"), ("retain fp", "{:+.3f}"), ("params changed", "{:+,}")):
            a, b = full.get(key), row.get(key)
            if a is not None and b is not None:
                changes.append(f"{key} {fmt.format(b - a)}")
        what = "; ".join(flips) if flips else "no property flips"
        lines.append(f"{row.get('method')}: {what} ({', '.join(changes)})")
    return lines


@dataclass(frozen=True)
class _Method:
    """One row of a paper or ablation table: the method and the settings it gets."""

    method: str
    method_config: MethodConfig | None = None
    optim: OptimConfig | None = None
    stop: StopRule | None = None


def _table_runs(
    model: LoadedModel,
    jobs: Sequence[_Method],
    *,
    split: FactSplit | None,
    quant: QuantConfig | None,
    measure_cad: bool,
    needs_circuit: bool,
    circuit: Circuit | None = None,
    oracle: LoadedModel | None,
    runs_root: str | None,
    progress: Callable[[float, str], None] | None,
    executor: ExecutorConfig | None,
    on_run: RunCallback | None,
    readings: LoopReadings | None = None,
) -> list[Run]:
    """The table's runs as jobs on one split, quantizer and circuit (finished ones skipped).

    The circuit is attributed once, and only when a pending run reads it (MANSU edits inside
    it; with CAD every method is measured on it).
    """
    split = split or builtin_split(model)
    quant = quant or QuantConfig("nf4")
    uses_circuit = circuit is not None or needs_circuit or measure_cad
    named = (circuit_digest(circuit) if circuit is not None else DEFAULT_CIRCUIT) if uses_circuit else None
    table = [job_for(model, split, m.method, quant, method_config=m.method_config, optim=m.optim, stop=m.stop,
                     measure_cad=measure_cad, oracle=oracle, circuit=named, readings=readings)
             for m in jobs]
    group = JobGroup(model, split, circuit=circuit, oracle=oracle)
    return run_jobs(table, [group], runs_root=runs_root, executor=executor, progress=progress, on_run=on_run).runs
