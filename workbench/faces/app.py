"""The Gradio face of the MANSU workbench: one page, the whole flow, no science of its own.

Layout and wiring only. Every number and figure comes from the core library through
:class:`workbench.session.Session` (one per browser session, kept in a ``gr.State``); the
loaded base models are shared, read-only, by all sessions (:data:`workbench.session.SHARED`).

    python app.py [--model M] [--host 127.0.0.1] [--port 7860] [--heavy-jobs 1] [--models-dir DIR ...]

The start model can also come from ``WORKBENCH_MODEL`` and the port from Gradio's
``GRADIO_SERVER_PORT``. The server binds 127.0.0.1 unless ``--host`` says otherwise and
never creates a public share link.

The app is written to be shared by people who do not trust each other: it loads built-ins and
directories under the operator's ``--models-dir`` roots only, every numeric input has a range
checked on the server, every heavy job a wall-clock limit (``--job-timeout``), the queue a
size (``--queue-size``); each session sees only its own runs (kept in a directory of its own,
within a quota, ``--runs-quota-mb``) and gets their files through its own handlers, never
through a URL into the run store.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import html
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.themes import Default as DefaultTheme

from workbench.core.allocator import allocator_in_use, limit_arenas
from workbench.core.checks import Range
from workbench.core.device import working_budget_setting
from workbench.core.errors import WorkbenchError
from workbench.core.paths import cache_dir, runs_dir
from workbench.data.files import FILE_FORMATS
from workbench.faces.session import (
    ATTRIBUTION_METHODS,
    FACT_SUFFIXES,
    MAX_UPLOAD_BYTES,
    RUN_COLUMNS,
    SHARED,
    Limits,
    RunView,
    Session,
    compare_figures,
    method_settings,
    read_fact_upload,
    runs_table,
    shared_figures,
)
from workbench.models.builtins import BUILTINS, DEFAULT_MODEL
from workbench.models.loading import ModelRoots, set_max_loaded
from workbench.quant import QUANT_TYPES
from workbench.unlearning.registry import METHODS, REGISTRY

log = logging.getLogger("workbench.app")

NODE_HEADERS = ["in circuit", "component", "kind", "layer", "head", "score"]
MAX_FILE_SIZE = MAX_UPLOAD_BYTES

INPUTS = {
    # The numeric inputs' ranges, checked by the server (the widgets show the same bounds, but an
    # HTTP caller skips the widgets). Upper bounds are the method configs' own; 0 where it means
    # "default/auto/no cap". The per-job time limit bounds what these still allow.
    "ig_steps": Range(1, 64, integer=True),
    "top_k": Range(0, 10_000, integer=True),
    "threshold": Range(0, 10**6),
    "mass": Range(0, 1),
    "forget_target": Range(0, 1),
    "max_rounds": Range(1, 10_000, integer=True),
    "fisher_budget": Range(0, 10**6),
    "params_per_round": Range(0, 10**8, integer=True),
    "code_steps": Range(1, 255, integer=True),
    "lr": Range(0, 1),
    "max_steps": Range(1, 100_000, integer=True),
    "max_k": Range(1, 1_000, integer=True),  # two ablated runs per k
}
LABELS = {"ig_steps": "IG steps", "top_k": "k", "threshold": "threshold", "mass": "mass fraction",
          "forget_target": "forget target", "max_rounds": "max rounds", "fisher_budget": "Fisher budget",
          "params_per_round": "weights per round", "code_steps": "codes per weight", "lr": "learning rate",
          "max_steps": "max steps", "max_k": "largest k"}


def number(value: Any, name: str) -> Any:
    """An input's value checked against :data:`INPUTS` (a whole float becomes an int), or a message."""
    allowed = INPUTS[name]
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # not a number: refused below with the range
            value = float(value)
    if isinstance(value, float) and allowed.integer and value.is_integer():
        value = int(value)
    if not allowed.admits(value):
        raise WorkbenchError(f"{LABELS[name]} must be {allowed.describe()}, got {value!r}")
    return value


def number_box(value: float, name: str, label: str, scale: int | None = None, info: str | None = None) -> gr.Number:
    """A Number widget showing :data:`INPUTS`' bounds for ``name`` (whole numbers when it says so)."""
    allowed = INPUTS[name]
    return gr.Number(value, label=label, minimum=allowed.low, maximum=allowed.high, scale=scale,
                     precision=0 if allowed.integer else None, info=info)


# --------------------------------------------------------------------------------------------
# Errors: user-caused ones as messages, anything else logged on the server, never a trace in the page
# --------------------------------------------------------------------------------------------


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a WorkbenchError into a gr.Error with its message; log anything else, show a short note."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except WorkbenchError as exc:
            raise gr.Error(html.escape(str(exc), quote=False), duration=30, print_exception=False) from None
        except Exception as exc:
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(
                f"Something went wrong inside the workbench ({type(exc).__name__}). "
                "The details are in the server log; please report them.",
                duration=30, print_exception=False,
            ) from None

    return wrapper


def _progress(progress: gr.Progress) -> Callable[[float, str], None]:
    def report(f: float, message: str) -> None:
        progress(min(max(float(f), 0.0), 1.0), desc=message)

    return report


def _method_label(method: str) -> str:
    return REGISTRY[method].label if method in REGISTRY else method.upper()


def _methods() -> list[tuple[str, str]]:
    """The method picker's (label, name) pairs, from the registry (MANSU first)."""
    return [(f"{_method_label(m)} ({m})" if m != "mansu" else "MANSU", m) for m in METHODS]


# --------------------------------------------------------------------------------------------
# Output bundles (what several events refresh at once)
# --------------------------------------------------------------------------------------------


def circuit_outputs(s: Session) -> tuple[Any, ...]:
    """graph, heatmap, faithfulness readout, node table, component picker, circuit download."""
    graph, heat = s.circuit_figures()
    rows = [[r[h] for h in NODE_HEADERS] for r in s.node_rows()]
    names = s.component_names()
    path = s.save_circuit()
    return (graph, heat, s.faithfulness_text(), rows,
            gr.Dropdown(choices=names, value=None), gr.DownloadButton(value=str(path), interactive=True))


def _view_outputs(view: RunView | None, module: str, cad: str) -> tuple[Any, ...]:
    if view is None:
        return ("*Pin a run to compare it here.*", None, None, None)
    figs = compare_figures(view, module, cad)
    summary = figs.summary + ("".join(f"  \n*{n}*" for n in figs.notes))
    report = [[r["property"], r["verdict"], r["value"], r["threshold"], r["margin"]] for r in figs.report]
    return (summary, report, figs.occupancy, figs.cad)


def compare_outputs(s: Session, module: str | None, cad: str | None) -> tuple[Any, ...]:
    """module picker, current run (4), pinned run (4), accuracy, |Δw|/bin width, forget/retain over the steps."""
    if s.current is None:
        raise WorkbenchError("no run yet: run unlearning or open a saved run")
    module = module if module in s.current.modules else "overall"
    cad = cad or "fp"
    views = [s.current] + ([s.pinned] if s.pinned is not None and s.pinned is not s.current else [])
    accuracy, ratios, history = shared_figures(views)
    return (gr.Dropdown(choices=s.current.modules, value=module),
            *_view_outputs(s.current, module, cad), *_view_outputs(s.pinned, module, cad), accuracy, ratios, history)


def runs_outputs(s: Session) -> tuple[Any, ...]:
    rows = runs_table(s.runs_root)
    ids = [r["run"] for r in rows]
    current = s.current.run_id if s.current is not None and s.current.run_id in ids else (ids[0] if ids else None)
    return ([[r[h] for h in RUN_COLUMNS] for r in rows], gr.Dropdown(choices=ids, value=current))


# --------------------------------------------------------------------------------------------
# Event handlers (thin: parse widgets, call the session, format)
# --------------------------------------------------------------------------------------------


@friendly
def on_setup(s: Session, model: str, forget_file: str | None, retain_file: str | None, domain: str | None,
             quant_type: str, blocksize: Any, double_quant: bool, data_format: str | None = "auto",
             progress: gr.Progress = gr.Progress()):
    result = s.setup(model, forget_file=forget_file, retain_file=retain_file, forget_domain=domain or None,
                     quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                     progress=_progress(progress), data_format=_format(data_format))
    label = s.require()[2].label
    rows = [[r["set"], r["facts"], round(r["full precision"], 4), round(r[label], 4), round(r["difference"], 4)]
            for r in result.accuracy]
    accuracy = gr.Dataframe(value=rows, headers=["set", "facts", "full precision", label, "difference"])
    return (result.summary, accuracy,
            gr.Dropdown(choices=result.domains, value=result.domain, interactive=bool(result.domains)))


def _format(choice: str | None) -> str | None:
    """The file-format selector's value as ``load_fact_file``'s ``format`` (``auto``: None)."""
    return None if not choice or choice == "auto" else choice


@friendly
def on_check_file(s: Session, path: str | None, data_format: str | None, which: str) -> str:
    if not path:
        return ""
    try:
        facts = read_fact_upload(path, f"{which} file", s.model, _format(data_format))
    except WorkbenchError as exc:
        return f"⚠️ **Cannot use this {which} file:** {html.escape(str(exc), quote=False)}"
    checked = (f"answers checked against {s.model.name}'s tokenizer" if s.model
               else "tokens are checked when the model loads")
    kinds = ", ".join(f"{sum(f.kind == k for f in facts)} {k}" for k in FILE_FORMATS if any(f.kind == k for f in facts))
    return f"✓ {which} file: {len(facts)} facts ({kinds}; {checked})."


@friendly
def on_attribute(s: Session, method: str, ig_steps: Any, edges: bool, baseline: str = "paired",
                 progress: gr.Progress = gr.Progress()):
    # The circuit is drawn at once; its faithfulness readout follows (on_faithfulness), as after an edit.
    a = s.attribute(method, ig_steps=number(ig_steps, "ig_steps"), edges=edges, baseline=baseline,
                    progress=_progress(progress), measure=False)
    summary = (f"**{ATTRIBUTION_METHODS[a.method]}**{f' ({a.ig_steps} steps)' if a.method == 'ig' else ''} over "
               f"{a.n_pairs} prompt pairs · {html.escape(s.attribution_text(), quote=False)} · "
               f"{len(a.edge_scores)} edges scored. "
               f"The circuit starts as the core's default (top-{len(s.require_circuit().selected)} heads/MLPs).")
    assumed = "".join(f"*{html.escape(line, quote=False)}*\n\n" for line in s.assumed)
    return (assumed + summary, *circuit_outputs(s), gr.Dropdown(choices=s.fact_choices(), value=None))


@friendly
def on_fact(s: Session, index: Any):
    if index is None:
        return None, []
    figure, rows = s.fact_view(index)
    return figure, [[r["component"], r["score"]] for r in rows]


@friendly
def on_curve(s: Session, max_k: Any, ablation: str, metric: str, progress: gr.Progress = gr.Progress()):
    curve, figure = s.faithfulness_curve(number(max_k, "max_k"), ablation=ablation, metric=metric,
                                         progress=_progress(progress))
    text = " · ".join(f"k={k}: {r:.3f}" for k, r in zip(curve.ks, curve.recovered))
    return f"**Recovered by the top-k heads/MLPs** ({curve.ablation} ablation, {curve.metric}): {text}", figure


@friendly
def on_agreement(s: Session, reference: str, ig_steps: Any, progress: gr.Progress = gr.Progress()):
    numbers, figure = s.agreement(reference, ig_steps=number(ig_steps, "ig_steps"), progress=_progress(progress))
    text = (f"**{s.require_attribution().method} vs {reference}** over {int(numbers['n'])} components: "
            f"Spearman {numbers['spearman']:.3f} · Kendall {numbers['kendall']:.3f} · "
            f"Pearson {numbers['pearson']:.3f} · top-{int(numbers['top_k'])} overlap {numbers['top_k_overlap']:.2f} · "
            f"max |difference| {numbers['max_abs_diff']:.3g}")
    return text, figure


def _edit(action: str) -> Callable[..., tuple[Any, ...]]:
    @friendly
    def handler(s: Session, value: Any = None):
        # The graph and table redraw at once; the faithfulness readout follows (on_faithfulness).
        s.edit(action, number(value, action) if action in INPUTS else value, measure=False)
        return circuit_outputs(s)

    handler.__name__ = f"on_{action}"
    return handler


@friendly
def on_table(s: Session, table: Any):
    rows = table.values.tolist() if hasattr(table, "values") else list(table or [])
    s.apply_node_table(rows, measure=False)
    return circuit_outputs(s)


@friendly
def on_faithfulness(s: Session) -> str:
    """The readout after an edit: measured now unless it is already for this selection."""
    if s.circuit is not None and not s.faithfulness_is_current:
        s.measure_faithfulness()
    return s.faithfulness_text()


@friendly
def on_upload_circuit(s: Session, path: str | None):
    if not path:
        raise WorkbenchError("choose a circuit JSON file to upload")
    s.load_circuit(path)
    return circuit_outputs(s)


def on_method(method: str):
    mansu = method == "mansu"
    defaults = method_settings(method)
    settings = gr.Code(value=json.dumps(defaults, indent=1) if defaults else "", visible=bool(defaults))
    return (gr.Button(value=f"Run {_method_label(method)}"), gr.Group(visible=mansu), gr.Group(visible=not mansu),
            settings)


def on_run_start(s: Session):
    s.live, s.live_records = [], []
    return gr.Timer(active=True), "Starting…", None, 0


@friendly
def on_unlearn(s: Session, method: str, use_circuit: bool, use_projection: bool, use_fisher: bool, use_floor: bool,
               max_rounds: Any, fisher_budget: Any, params_per_round: Any, forget_target: Any, code_steps: Any,
               lr: Any, max_steps: Any, settings: str | None, measure_cad: bool, use_oracle: bool,
               module: str | None, cad: str | None,
               progress: gr.Progress = gr.Progress(), request: gr.Request | None = None):
    _sign_in(s, request)
    target = number(forget_target, "forget_target")
    mansu = {
        "use_circuit": bool(use_circuit), "use_projection": bool(use_projection), "use_fisher": bool(use_fisher),
        "use_floor": bool(use_floor), "max_rounds": number(max_rounds, "max_rounds"),
        "fisher_budget": number(fisher_budget, "fisher_budget") or None,
        "params_per_round": number(params_per_round, "params_per_round") or None,
        "forget_target": target, "code_steps": number(code_steps, "code_steps"),
    }
    optim = {"lr": number(lr, "lr") or None}
    stop = {"max_steps": number(max_steps, "max_steps"), "forget_target": target}
    try:
        s.unlearn(method, mansu=mansu, optim=optim, stop=stop, settings=settings, measure_cad=measure_cad,
                  use_oracle=use_oracle, progress=_progress(progress))
    except WorkbenchError as exc:
        if s.cancel_requested:  # the user asked for it: say so, not as a failure
            raise gr.Error(html.escape(str(exc), quote=False), title="Run cancelled", duration=15,
                           print_exception=False) from None
        raise
    return (s.live_text(), *compare_outputs(s, module, cad), *runs_outputs(s))


@friendly
def on_ablations(s: Session, progress: gr.Progress = gr.Progress(), request: gr.Request | None = None):
    _sign_in(s, request)
    s.try_ablations(progress=_progress(progress))
    lines = s.ablation_text().splitlines()
    return ("\n".join(f"- {html.escape(line, quote=False)}" for line in lines), *runs_outputs(s))


def on_run_end(s: Session):
    return gr.Timer(active=False), s.live_text(), s.live_figure(), len(s.live_records)


def on_live_tick(s: Session, drawn: int) -> tuple[Any, ...]:
    """The live text, and the live plot redrawn only when a record came since the last draw
    (``drawn``: how many records it shows)."""
    records = len(s.live_records)
    if records == drawn:
        return s.live_text(), gr.skip(), drawn
    return s.live_text(), s.live_figure(), records


def on_cancel(s: Session) -> str:
    return "Cancelling at the next step…" if s.cancel() else "Nothing is running."


@friendly
def on_compare(s: Session, module: str | None, cad: str | None):
    return compare_outputs(s, module, cad)


@friendly
def on_pin(s: Session, module: str | None, cad: str | None):
    s.pin()
    return compare_outputs(s, module, cad)


@friendly
def on_unpin(s: Session, module: str | None, cad: str | None):
    s.unpin()
    return compare_outputs(s, module, cad)


def _sign_in(s: Session, request: gr.Request | None) -> None:
    """With ``--auth-file``, the session's runs are its signed-in user's (Gradio checked the password)."""
    s.sign_in(getattr(request, "username", None) if request is not None else None)


@friendly
def on_runs(s: Session, request: gr.Request | None = None):
    _sign_in(s, request)
    return runs_outputs(s)


@friendly
def on_open_run(s: Session, run_id: str | None, module: str | None, cad: str | None,
                request: gr.Request | None = None):
    _sign_in(s, request)
    s.open_run(run_id or "")
    return compare_outputs(s, module, cad)


@friendly
def on_run_files(s: Session, run_id: str | None, request: gr.Request | None = None):
    _sign_in(s, request)
    return [str(p) for p in s.run_files(run_id or None)]


def model_status(name: str) -> tuple[str, Any]:
    status = SHARED.status(name)
    done = status == "ready" or status.startswith("error")
    if status == "ready":
        text = f"Model **{name}** is loaded and shared by every session: click “Load model and data”."
    else:
        text = f"Model **{name}**: {html.escape(status, quote=False)}" + (
            "" if done else " … (first use builds and caches it)")
    return text, gr.Timer(active=not done)


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


CACHE_CLEANUP = (3600, 6 * 3600)
"""Gradio's ``delete_cache``: every hour, delete the downloads and uploads older than six hours."""


@dataclass
class SetupViews:
    """1 · Setup: model, data, quantizer."""

    model: gr.Dropdown
    domain: gr.Dropdown
    quant_type: gr.Radio
    blocksize: gr.Dropdown
    double_quant: gr.Checkbox
    forget_file: gr.File
    retain_file: gr.File
    data_format: gr.Dropdown
    forget_check: gr.Markdown
    retain_check: gr.Markdown
    button: gr.Button
    summary: gr.Markdown
    base_accuracy: gr.Dataframe


def _setup_section(start_model: str) -> SetupViews:
    models = list(dict.fromkeys([start_model, *BUILTINS]))
    gr.Markdown("## 1 · Setup: model, data, quantizer")
    with gr.Row():
        model = gr.Dropdown(models, value=start_model, allow_custom_value=True, label="Model",
                            info="a built-in, or the path of a local Hugging Face model directory", scale=2)
        domain = gr.Dropdown([], value=None, allow_custom_value=True, label="Forget domain (built-in data)",
                             info="filled in by “Load model and data”; change it and load again",
                             interactive=False, scale=2)
        quant_type = gr.Radio(list(QUANT_TYPES), value="nf4", label="Quantizer", scale=1)
        blocksize = gr.Dropdown([32, 64, 128, 256, 512, 1024, 2048, 4096], value=64, label="Block size", scale=1)
        double_quant = gr.Checkbox(False, label="Double quantization", scale=1)
    with gr.Row():
        forget_file = gr.File(label="Forget set (JSONL, CSV or Parquet; optional)", file_types=list(FACT_SUFFIXES),
                              type="filepath", elem_id="forget-file")
        retain_file = gr.File(label="Retain set (JSONL, CSV or Parquet; optional)", file_types=list(FACT_SUFFIXES),
                              type="filepath", elem_id="retain-file")
        data_format = gr.Dropdown(["auto", *FILE_FORMATS], value="auto", label="File format",
                                  info="auto: told from each row's fields; cloze {prompt, answer}, mc {question, "
                                       "choices, answer index}, qa {question, answer}, text {text}",
                                  elem_id="data-format")
        with gr.Column():
            forget_check = gr.Markdown(elem_id="forget-check")
            retain_check = gr.Markdown(elem_id="retain-check")
    button = gr.Button("Load model and data", variant="primary", elem_id="setup-btn")
    summary = gr.Markdown(elem_id="setup-summary")
    base_accuracy = gr.Dataframe(headers=["set", "facts", "full precision", "quantized", "difference"],
                                 label="Base accuracy (top-1), full precision vs quantized", interactive=False,
                                 elem_id="base-accuracy")
    return SetupViews(model, domain, quant_type, blocksize, double_quant, forget_file, retain_file, data_format,
                      forget_check, retain_check, button, summary, base_accuracy)


@dataclass
class AttributionViews:
    """2 · Attribution: which heads and MLPs carry the forget facts."""

    method: gr.Radio
    ig_steps: gr.Slider
    edges: gr.Checkbox
    button: gr.Button
    summary: gr.Markdown
    graph: gr.Plot
    heatmap: gr.Plot
    reference: gr.Radio
    agree_button: gr.Button
    agreement_text: gr.Markdown
    agreement_plot: gr.Plot
    baseline: gr.Radio
    fact: gr.Dropdown
    fact_plot: gr.Plot
    fact_table: gr.Dataframe


BASELINES = {"paired": "paired (counterfactual twins)", "mean": "mean ablation", "resample": "resample ablation"}


def _attribution_section() -> AttributionViews:
    gr.Markdown("## 2 · Attribution: which heads and MLPs carry the forget facts")
    with gr.Row():
        method = gr.Radio([(v, k) for k, v in ATTRIBUTION_METHODS.items()], value="atp", label="Method", scale=3)
        ig_steps = gr.Slider(1, 64, value=8, step=1, label="IG steps (integrated gradients)", scale=2)  # = INPUTS
        edges = gr.Checkbox(True, label="Score edges too (not with exact patching)", scale=1)
        baseline = gr.Radio([(v, k) for k, v in BASELINES.items()], value="paired", label="Baseline", scale=2)
    button = gr.Button("Run attribution", variant="primary", elem_id="attr-btn")
    summary = gr.Markdown(elem_id="attr-summary")
    with gr.Row():
        graph = gr.Plot(label="Circuit graph", elem_id="circuit-graph", scale=3)
        heatmap = gr.Plot(label="Layer × head heatmap (● = in the circuit)", elem_id="heatmap", scale=2)
    with gr.Row():
        reference = gr.Radio([(v, k) for k, v in ATTRIBUTION_METHODS.items()], value="exact",
                             label="Compare with", scale=2)
        agree_button = gr.Button("Compare attribution methods", scale=1)
    agreement_text = gr.Markdown(elem_id="agreement")
    agreement_plot = gr.Plot(label="Method agreement")
    gr.Markdown("**One fact:** which heads and MLPs carry it (its own attribution scores)")
    with gr.Row():
        fact = gr.Dropdown([], label="Fact", elem_id="fact-picker", scale=3)
    with gr.Row():
        fact_plot = gr.Plot(label="This fact: layer × head", elem_id="fact-heatmap", scale=3)
        fact_table = gr.Dataframe(headers=["component", "score"], type="array", interactive=False,
                                  label="This fact's strongest components", scale=2)
    return AttributionViews(method, ig_steps, edges, button, summary, graph, heatmap, reference, agree_button,
                            agreement_text, agreement_plot, baseline, fact, fact_plot, fact_table)


@dataclass
class CircuitViews:
    """3 · Circuit: edit the selection, watch faithfulness."""

    faithfulness: gr.Markdown
    top_k: gr.Number
    top_k_button: gr.Button
    threshold: gr.Number
    threshold_button: gr.Button
    mass: gr.Slider
    mass_button: gr.Button
    component: gr.Dropdown
    include_button: gr.Button
    exclude_button: gr.Button
    undo_button: gr.Button
    redo_button: gr.Button
    nodes: gr.Dataframe
    download: gr.DownloadButton
    upload: gr.UploadButton
    faithfulness_button: gr.Button  # hidden: the /faithfulness endpoint (the readout after an edit)
    curve_k: gr.Number
    curve_ablation: gr.Radio
    curve_metric: gr.Radio
    curve_button: gr.Button
    curve_text: gr.Markdown
    curve_plot: gr.Plot


def _circuit_section() -> CircuitViews:
    gr.Markdown("## 3 · Circuit: edit the selection, watch faithfulness")
    faithfulness = gr.Markdown("Run attribution to get a circuit.", elem_id="faithfulness")
    with gr.Row():
        top_k = number_box(10, "top_k", "k", scale=1)
        top_k_button = gr.Button("Select top-k", scale=1)
        threshold = number_box(0.1, "threshold", "|score| ≥", scale=1)
        threshold_button = gr.Button("Select by threshold", scale=1)
        mass = gr.Slider(0.0, 1.0, value=0.8, step=0.01, label="cumulative |score| mass", scale=2)
        mass_button = gr.Button("Select by mass", scale=1)
    with gr.Row():
        component = gr.Dropdown([], label="Component", elem_id="component-picker", scale=2)
        include_button = gr.Button("Include node", scale=1, elem_id="include-btn")
        exclude_button = gr.Button("Exclude node", scale=1, elem_id="exclude-btn")
        undo_button = gr.Button("Undo", scale=1, elem_id="undo-btn")
        redo_button = gr.Button("Redo", scale=1, elem_id="redo-btn")
    nodes = gr.Dataframe(headers=NODE_HEADERS, datatype=["bool", "str", "str", "number", "number", "number"],
                         type="array", interactive=True, static_columns=[1, 2, 3, 4, 5], max_height=360,
                         label="Nodes (tick or untick “in circuit”; strongest first)", elem_id="node-table")
    with gr.Row():
        download = gr.DownloadButton("Download circuit JSON", interactive=False)
        upload = gr.UploadButton("Upload circuit JSON", file_types=[".json"], type="filepath")
    faithfulness_button = gr.Button("Measure faithfulness", visible=False)
    with gr.Row():
        curve_k = number_box(20, "max_k", "largest k", scale=1)
        curve_ablation = gr.Radio(["corrupt", "mean"], value="corrupt", label="Ablation", scale=1)
        curve_metric = gr.Radio(["logit_diff", "logprob", "kl"], value="logit_diff", label="Metric", scale=2)
        curve_button = gr.Button("Faithfulness curve (top-k, k = 1…N)", scale=1, elem_id="curve-btn")
    curve_text = gr.Markdown(elem_id="curve-text")
    curve_plot = gr.Plot(label="Faithfulness over circuit size", elem_id="curve-plot")
    return CircuitViews(faithfulness, top_k, top_k_button, threshold, threshold_button, mass, mass_button, component,
                        include_button, exclude_button, undo_button, redo_button, nodes, download, upload,
                        faithfulness_button, curve_k, curve_ablation, curve_metric, curve_button, curve_text,
                        curve_plot)


@dataclass
class UnlearningViews:
    """4 · Unlearning: MANSU or a baseline, with its settings and live progress."""

    method: gr.Dropdown
    forget_target: gr.Number
    measure_cad: gr.Checkbox
    use_oracle: gr.Checkbox
    mansu_box: gr.Group
    use_circuit: gr.Checkbox
    use_projection: gr.Checkbox
    use_fisher: gr.Checkbox
    use_floor: gr.Checkbox
    max_rounds: gr.Number
    fisher_budget: gr.Number
    params_per_round: gr.Number
    code_steps: gr.Number
    baseline_box: gr.Group
    lr: gr.Number
    max_steps: gr.Number
    settings: gr.Code
    run_button: gr.Button
    cancel_button: gr.Button
    live: gr.Textbox
    live_timer: gr.Timer
    live_plot: gr.Plot
    live_drawn: gr.State
    ablate_button: gr.Button
    ablation_text: gr.Markdown


def _unlearning_section() -> UnlearningViews:
    gr.Markdown("## 4 · Unlearning: MANSU or a baseline")
    with gr.Row():
        method = gr.Dropdown(_methods(), value="mansu", label="Method", scale=2)
        forget_target = number_box(0.1, "forget_target", "Forget target (top-1)", scale=1,
                                   info="multiple-choice forget sets: MC accuracy, never below chance")
        measure_cad = gr.Checkbox(True, label="Measure CAD (attribution before/after)", scale=1)
        use_oracle = gr.Checkbox(True, label="Compare with the retrain oracle (built-ins)", scale=1)
    with gr.Group(visible=True) as mansu_box:
        with gr.Row():
            use_circuit = gr.Checkbox(True, label="circuit restriction")
            use_projection = gr.Checkbox(True, label="null-space projection")
            use_fisher = gr.Checkbox(True, label="Fisher bound")
            use_floor = gr.Checkbox(True, label="quantization floor")
        with gr.Row():
            max_rounds = number_box(60, "max_rounds", "max rounds")
            fisher_budget = number_box(0.05, "fisher_budget", "Fisher budget ε (nats; 0 = no cap)")
            params_per_round = number_box(0, "params_per_round", "weights per round (0 = auto)")
            code_steps = number_box(2, "code_steps", "codes moved per weight")
    with gr.Group(visible=False) as baseline_box:
        with gr.Row():
            lr = number_box(0, "lr", "learning rate (0 = the model's default)")
            max_steps = number_box(100, "max_steps", "max steps")
        settings = gr.Code("", language="json", visible=False, interactive=True,
                           label="The method's own settings (JSON; defaults shown)")
    with gr.Row():
        run_button = gr.Button("Run MANSU", variant="primary", elem_id="run-btn")
        cancel_button = gr.Button("Cancel run", variant="stop", elem_id="cancel-btn")
    live = gr.Textbox(label="Live progress (forget top-1, full precision and quantized)", lines=4,
                      interactive=False, elem_id="live")
    live_timer = gr.Timer(1.0, active=False)
    live_plot = gr.Plot(label="Forget / retain so far (full precision solid, quantized dashed)", elem_id="live-plot")
    live_drawn = gr.State(0)
    ablate_button = gr.Button("Would an ablation have passed? (re-runs this MANSU run 4×, each with one component "
                              "off)", size="sm", elem_id="ablate-btn")
    ablation_text = gr.Markdown(elem_id="ablation-text")
    return UnlearningViews(method, forget_target, measure_cad, use_oracle, mansu_box, use_circuit, use_projection,
                           use_fisher, use_floor, max_rounds, fisher_budget, params_per_round, code_steps,
                           baseline_box, lr, max_steps, settings, run_button, cancel_button, live, live_timer,
                           live_plot, live_drawn, ablate_button, ablation_text)


@dataclass
class CompareViews:
    """5 · Compare: this run and a pinned one side by side, before/after quantization."""

    module: gr.Dropdown
    cad_which: gr.Radio
    pin_button: gr.Button
    unpin_button: gr.Button
    current: tuple[gr.Markdown, gr.Dataframe, gr.Plot, gr.Plot]  # summary, report card, occupancy, CAD
    pinned: tuple[gr.Markdown, gr.Dataframe, gr.Plot, gr.Plot]
    accuracy_plot: gr.Plot
    ratio_plot: gr.Plot
    history_plot: gr.Plot

    def outputs(self) -> list[Any]:
        """What every compare handler returns, in its order."""
        return [self.module, *self.current, *self.pinned, self.accuracy_plot, self.ratio_plot, self.history_plot]


def _compare_section() -> CompareViews:
    gr.Markdown("## 5 · Compare: before/after quantization, side by side")
    with gr.Row():
        module = gr.Dropdown(["overall"], value="overall", label="Module (bin occupancy)", scale=3)
        cad_which = gr.Radio([("full precision", "fp"), ("quantized", "quantized")], value="fp",
                             label="CAD attribution of", scale=2)
        pin_button = gr.Button("Pin this run for comparison", scale=1)
        unpin_button = gr.Button("Unpin", scale=1)
    report_headers = ["property", "verdict", "value", "threshold", "margin"]
    with gr.Row():
        with gr.Column():
            gr.Markdown("### This run")
            current = (gr.Markdown(elem_id="run-summary"),
                       gr.Dataframe(headers=report_headers, label="Report card", interactive=False,
                                    elem_id="report-card"),
                       gr.Plot(label="Bin occupancy before | after", elem_id="occupancy"),
                       gr.Plot(label="CAD: attribution per node before | after | difference", elem_id="cad-diff"))
        with gr.Column():
            gr.Markdown("### Pinned run")
            pinned = (gr.Markdown("*Pin a run to compare it here.*", elem_id="pinned-summary"),
                      gr.Dataframe(headers=report_headers, label="Report card (pinned)", interactive=False),
                      gr.Plot(label="Bin occupancy (pinned)"),
                      gr.Plot(label="CAD (pinned)"))
    accuracy_plot = gr.Plot(label="Forget / retain accuracy, full precision vs quantized (PTQ gap)",
                            elem_id="accuracy")
    ratio_plot = gr.Plot(label="|Δw| / bin width of changed weights", elem_id="ratio")
    history_plot = gr.Plot(label="Forget / retain over the steps (rounds), full precision vs quantized",
                           elem_id="history")
    return CompareViews(module, cad_which, pin_button, unpin_button, current, pinned, accuracy_plot, ratio_plot,
                        history_plot)


@dataclass
class RunsViews:
    """6 · Runs: the session's saved runs, reopened or downloaded."""

    refresh_button: gr.Button
    pick: gr.Dropdown
    open_button: gr.Button
    files_button: gr.Button
    history: gr.Dataframe
    files: gr.File


def _runs_section() -> RunsViews:
    gr.Markdown("## 6 · Runs: every run is saved; reopen or download one")
    with gr.Row():
        refresh_button = gr.Button("Refresh run history", scale=1)
        pick = gr.Dropdown([], label="Run", scale=3, elem_id="run-pick")
        open_button = gr.Button("Open run", scale=1)
        files_button = gr.Button("Download run files", scale=1)
    history = gr.Dataframe(headers=list(RUN_COLUMNS), interactive=False, label="History", elem_id="runs")
    files = gr.File(label="Run files (metrics, config, update)", file_count="multiple", interactive=False,
                    elem_id="run-files")
    return RunsViews(refresh_button, pick, open_button, files_button, history, files)


# --- wiring: one function per section, in the order the events were always registered --------

def _wire_setup(session: gr.State, v: SetupViews, heavy: dict[str, Any]) -> None:
    v.button.click(on_setup, [session, v.model, v.forget_file, v.retain_file, v.domain, v.quant_type, v.blocksize,
                              v.double_quant, v.data_format], [v.summary, v.base_accuracy, v.domain], api_name="setup",
                   **heavy)
    for which, upload, check in (("forget", v.forget_file, v.forget_check), ("retain", v.retain_file, v.retain_check)):
        for trigger in (upload.change, v.data_format.change):
            trigger(functools.partial(on_check_file, which=which), [session, upload, v.data_format], check,
                    api_visibility="private")


def _circuit_outputs(a: AttributionViews, c: CircuitViews) -> list[Any]:
    """What every circuit handler returns (:func:`circuit_outputs`), in its order."""
    return [a.graph, a.heatmap, c.faithfulness, c.nodes, c.component, c.download]


def _wire_attribution_and_circuit(session: gr.State, a: AttributionViews, c: CircuitViews,
                                  heavy: dict[str, Any]) -> None:
    views = _circuit_outputs(a, c)
    readout = (on_faithfulness, [session], c.faithfulness)
    private: dict[str, Any] = {"api_visibility": "private"}  # typed: the keyword splat is checked per parameter
    a.button.click(on_attribute, [session, a.method, a.ig_steps, a.edges, a.baseline], [a.summary, *views, a.fact],
                   api_name="attribute", **heavy).then(*readout, **private)
    a.fact.change(on_fact, [session, a.fact], [a.fact_plot, a.fact_table], api_name="fact")
    c.curve_button.click(on_curve, [session, c.curve_k, c.curve_ablation, c.curve_metric], [c.curve_text, c.curve_plot],
                         api_name="faithfulness_curve", **heavy)
    a.agree_button.click(on_agreement, [session, a.reference, a.ig_steps], [a.agreement_text, a.agreement_plot],
                         api_name="agreement", **heavy)
    for button, action, value in ((c.top_k_button, "top_k", c.top_k), (c.threshold_button, "threshold", c.threshold),
                                  (c.mass_button, "mass", c.mass), (c.include_button, "include", c.component),
                                  (c.exclude_button, "exclude", c.component)):
        button.click(_edit(action), [session, value], views, api_name=action).then(*readout, **private)
    c.undo_button.click(_edit("undo"), [session], views, api_name="undo").then(*readout, **private)
    c.redo_button.click(_edit("redo"), [session], views, api_name="redo").then(*readout, **private)
    c.nodes.input(on_table, [session, c.nodes], views, api_visibility="private").then(*readout, **private)
    c.faithfulness_button.click(*readout, api_name="faithfulness")
    c.upload.upload(on_upload_circuit, [session, c.upload], views, api_name="upload_circuit")


def _wire_unlearning(session: gr.State, u: UnlearningViews, cmp: CompareViews, runs: RunsViews,
                     heavy: dict[str, Any]) -> None:
    u.method.change(on_method, u.method, [u.run_button, u.mansu_box, u.baseline_box, u.settings],
                    api_visibility="private")
    live_outputs = [u.live_timer, u.live, u.live_plot, u.live_drawn]
    run_event = u.run_button.click(on_run_start, [session], live_outputs, api_visibility="private", queue=False)
    run_event.then(
        on_unlearn,
        [session, u.method, u.use_circuit, u.use_projection, u.use_fisher, u.use_floor, u.max_rounds,
         u.fisher_budget, u.params_per_round, u.forget_target, u.code_steps, u.lr, u.max_steps, u.settings,
         u.measure_cad, u.use_oracle, cmp.module, cmp.cad_which],
        [u.live, *cmp.outputs(), runs.history, runs.pick], api_name="unlearn", **heavy,
    ).then(on_run_end, [session], live_outputs, api_visibility="private")
    u.live_timer.tick(on_live_tick, [session, u.live_drawn], [u.live, u.live_plot, u.live_drawn],
                      concurrency_limit=None, show_progress="hidden", api_visibility="private")
    u.cancel_button.click(on_cancel, [session], u.live, concurrency_limit=None, api_name="cancel")
    u.ablate_button.click(on_run_start, [session], live_outputs, api_visibility="private", queue=False).then(
        on_ablations, [session], [u.ablation_text, runs.history, runs.pick], api_name="ablations", **heavy,
    ).then(on_run_end, [session], live_outputs, api_visibility="private")


def _wire_compare_and_runs(session: gr.State, cmp: CompareViews, runs: RunsViews) -> None:
    views = cmp.outputs()
    for trigger in (cmp.module.input, cmp.cad_which.input):
        trigger(on_compare, [session, cmp.module, cmp.cad_which], views, api_visibility="private")
    cmp.pin_button.click(on_pin, [session, cmp.module, cmp.cad_which], views, api_name="pin")
    cmp.unpin_button.click(on_unpin, [session, cmp.module, cmp.cad_which], views, api_name="unpin")
    runs.refresh_button.click(on_runs, [session], [runs.history, runs.pick], api_name="runs")
    runs.open_button.click(on_open_run, [session, runs.pick, cmp.module, cmp.cad_which], views, api_name="open_run")
    runs.files_button.click(on_run_files, [session, runs.pick], runs.files, api_name="run_files")


def build_app(start_model: str, heavy_jobs: int = 1, limits: Limits | None = None) -> gr.Blocks:
    """The Blocks app; ``start_model`` is pre-selected (and preloaded by :func:`main`).

    ``limits``: what each session may use (default: private runs, no time or disk limit).
    """

    heavy = {"concurrency_id": "heavy", "concurrency_limit": heavy_jobs}
    limits = limits or Limits(private_runs=True)
    with gr.Blocks(title="MANSU workbench", analytics_enabled=False, delete_cache=CACHE_CLEANUP) as demo:
        session = gr.State(Session(limits=limits, default_model=start_model),
                           delete_callback=lambda s: s.close() if s is not None else None)
        gr.Markdown("# MANSU workbench\nErase knowledge from a language model so the erasure survives "
                    "4-bit quantization — and see why. Go top to bottom: setup → attribution → circuit → "
                    "unlearning → compare → runs.")
        status = gr.Markdown(elem_id="model-status")
        status_timer = gr.Timer(1.0, active=True)
        setup, attribution, circuit = _setup_section(start_model), _attribution_section(), _circuit_section()
        unlearning, compare, runs = _unlearning_section(), _compare_section(), _runs_section()

        status_timer.tick(lambda: model_status(start_model), outputs=[status, status_timer], concurrency_limit=None,
                          show_progress="hidden", api_visibility="private")
        demo.load(lambda: model_status(start_model), outputs=[status, status_timer], api_visibility="private")
        demo.load(on_runs, [session], [runs.history, runs.pick], api_visibility="private")
        _wire_setup(session, setup, heavy)
        _wire_attribution_and_circuit(session, attribution, circuit, heavy)
        _wire_unlearning(session, unlearning, compare, runs, heavy)
        _wire_compare_and_runs(session, compare, runs)
    return demo


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The app's own flags (``prog``: the name its usage line shows, e.g. ``workbench app``)."""

    p = argparse.ArgumentParser(prog=prog, description="The MANSU workbench in the browser.")
    p.add_argument("--model", default=os.environ.get("WORKBENCH_MODEL") or DEFAULT_MODEL,
                   help="start model: a built-in or a local HF directory (default: $WORKBENCH_MODEL or %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the app to your network)")
    p.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--heavy-jobs", type=int, default=1,
                   help="attribution/unlearning jobs run at once across all sessions (default 1)")
    p.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                   help="a folder whose model directories remote users may load (repeatable); without it only the "
                        "built-ins and the start model load")
    p.add_argument("--max-models", type=int, default=2, help="loaded models kept in memory (default 2, LRU)")
    p.add_argument("--job-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="wall-clock limit of one setup, attribution or unlearning job (default 1800; 0 = none)")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests waiting in the queue at most; more are refused as 'queue full' (default 16)")
    p.add_argument("--runs-quota-mb", type=float, default=2048.0,
                   help="disk space one session's saved runs may take (default 2048; 0 = none)")
    p.add_argument("--runs-total-mb", type=float, default=20_000.0,
                   help="disk space all sessions' saved runs may take together (default 20000; 0 = none)")
    p.add_argument("--auth-file", metavar="FILE",
                   help="require a login: lines 'user:password'; each user's runs are theirs across sessions")
    p.add_argument("--no-preload", action="store_true", help="do not load the start model in the background")
    p.add_argument("--open-browser", action="store_true", help="open the page in the default web browser")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:

    args = parse_args(argv, prog)
    # before the click threads start: each of the pool's threads would keep a heap of its own
    limit_arenas()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("memory allocator: %s (WORKBENCH_MALLOC=system or jemalloc to choose)", allocator_in_use())
    try:
        limits = configure(args)
    except WorkbenchError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not args.no_preload:
        # The page opens at once; the model loads (or builds, the first time) behind the status line.
        SHARED.preload(args.model)
    demo = build_app(args.model, heavy_jobs=args.heavy_jobs, limits=limits)
    demo.queue(default_concurrency_limit=4, max_size=args.queue_size)
    # No allowed_paths: the run store is never served by URL (a session's files are copied to its
    # own scratch directory); blocked_paths keeps it and the model cache out even if they sit in
    # the working or temporary directory that Gradio otherwise lets handlers return from.
    demo.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=args.open_browser,
                auth=read_auth_file(args.auth_file) if args.auth_file else None,
                max_file_size=MAX_FILE_SIZE, blocked_paths=[str(runs_dir().resolve()), str(cache_dir().resolve())],
                show_error=False, ssr_mode=False, quiet=False,
                footer_links=["api"], theme=DefaultTheme(font=["system-ui", "sans-serif"],
                                                              font_mono=["ui-monospace", "monospace"]))


def read_auth_file(path: str) -> list[tuple[str, str]]:
    """``user:password`` lines (blank lines and ``#`` comments skipped); in a file, not on the command
    line, where every local user could read the passwords in the process list."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"error: --auth-file {path}: {exc}") from None
    pairs = []
    for number_, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise SystemExit(f"error: --auth-file {path}, line {number_}: expected 'user:password'")
        pairs.append((user.strip(), password))
    if not pairs:
        raise SystemExit(f"error: --auth-file {path} lists no users")
    return pairs


def configure(args: argparse.Namespace) -> Limits:
    """Apply the operator's flags to the process (model roots, model cache) and return the sessions' limits."""
    for flag, value, low in (("--heavy-jobs", args.heavy_jobs, 1), ("--max-models", args.max_models, 1),
                             ("--queue-size", args.queue_size, 1), ("--job-timeout", args.job_timeout, 0),
                             ("--runs-quota-mb", args.runs_quota_mb, 0), ("--runs-total-mb", args.runs_total_mb, 0)):
        if not Range(low, integer=isinstance(value, int)).admits(value):
            raise WorkbenchError(f"{flag} must be a finite number >= {low}, got {value!r}")
    working_budget_setting()  # a malformed $WORKBENCH_WORKING_MB stops the start, not the first click
    # The start model is the operator's own choice, so its directory counts as listed.
    start = [] if args.model in BUILTINS else [args.model]
    SHARED.restrict(ModelRoots.of([*args.models_dir, *start]))
    set_max_loaded(args.max_models)
    return Limits(job_seconds=args.job_timeout or None,
                  runs_quota_bytes=int(args.runs_quota_mb * 1e6) or None,
                  runs_total_bytes=int(args.runs_total_mb * 1e6) or None, private_runs=True)


if __name__ == "__main__":
    main()
