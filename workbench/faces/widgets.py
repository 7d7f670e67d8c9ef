"""The notebook face: ipywidgets + plotly ``FigureWidget`` over the same core as the app and CLI.

``Workbench(model="facts")`` in JupyterLab shows the whole flow in four tabs —
setup → attribute & edit the circuit → unlearn → compare. Every number and figure comes
from the core (:mod:`workbench.experiments.flow`, :mod:`workbench.interpretability.circuit`,
:mod:`workbench.faces.plots`, :mod:`workbench.measurement.metrics`); this module only wires widgets to it.

Callbacks are plain methods (:meth:`Workbench.load`, :meth:`Workbench.run_attribution`,
:meth:`Workbench.toggle`, :meth:`Workbench._on_node_click`, :meth:`Workbench.set_top_k`,
:meth:`Workbench.undo`, :meth:`Workbench.run_unlearning`), so they run headless in tests.
A :class:`~workbench.errors.WorkbenchError` (bad input) becomes a one-line message in the
Output widget; any other exception is a bug and is shown with its traceback there.

Long steps run in the kernel's thread: ipywidgets sends widget updates while a callback
runs, so the progress bar moves live, and a second click waits for the first to finish.
"""

from __future__ import annotations

import dataclasses
import functools
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import ipywidgets as W
import plotly.graph_objects as go

from workbench.core.errors import WorkbenchError
from workbench.data.facts import FactSplit
from workbench.data.files import load_fact_file
from workbench.experiments.flow import DEFAULT_TOP_K, attribute_forget_set, default_circuit, run_unlearning
from workbench.faces import plots
from workbench.faces.tables import html_table
from workbench.interpretability.attribution import Attribution, AttributionConfig
from workbench.interpretability.circuit import Circuit
from workbench.measurement.metrics import report_card_rows, summary_lines
from workbench.measurement.results import RunMetrics
from workbench.models.builtin_splits import builtin_split
from workbench.models.builtins import BUILTINS
from workbench.models.loaded import LoadedModel
from workbench.models.loading import load_model
from workbench.quant import QUANT_TYPES, QuantConfig
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.registry import METHODS, REGISTRY
from workbench.unlearning.task import OptimConfig, StopRule

P = ParamSpec("P")
R = TypeVar("R")

NODE_TRACES = ("selected", "unselected")
"""Names of the node traces of :func:`workbench.plots.circuit_figure` (clickable)."""


def _guarded(fn: Callable[P, R]) -> Callable[P, R | None]:
    """Run a callback; show errors in the Output widget instead of raising into the UI."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        self: Any = args[0]  # a method of ForgetWorkbench, which has _error and _busy
        try:
            return fn(*args, **kwargs)
        except WorkbenchError as exc:  # the user's input: a message, no traceback
            self._error(str(exc))
        except Exception:  # a bug: keep the traceback, where the user can copy it
            self._error("unexpected error (please report it):\n" + traceback.format_exc())
        finally:
            self._busy(False)
        return None

    return wrapper


def method_label(method: str) -> str:
    """Button text for a method: its registered label (``graddiff`` → ``GradDiff``)."""
    return REGISTRY[method].label if method in REGISTRY else method.upper()


class Workbench:
    """The setup → attribute → edit circuit → unlearn → compare flow as one widget.

    Args:
        model: a built-in name (``"facts"``, ``"facts-tiny"``, ``"smollm2"``, …), a local
            Hugging Face directory, or a :class:`~workbench.models.LoadedModel`.
        forget, retain: fact files (JSONL, CSV or Parquet; any row shape of
            :mod:`workbench.data.files`) for a model without a built-in split.
        data_format: force the files' row shape (``"cloze"``, ``"mc"``, ``"qa"``, ``"text"``);
            default: told from each row's fields.
        quant: ``"nf4"`` (default), ``"fp4"`` or ``"int8"``, or a ``QuantConfig``.
        top_k: initial circuit size (components by |attribution score|).
        method: initial unlearning method (one of ``workbench.unlearning.registry.METHODS``).
        mansu_config, optim, stop, attribution_config: passed to the core unchanged.
        measure_cad: measure CAD after each run (4 attributions; off = faster).
        runs_root: where runs are saved (default: ``WORKBENCH_RUNS`` or ``./runs``).
        load: load the model now (else press "Load").

    Attributes (state, read freely): ``model``, ``split``, ``attribution``, ``circuit``,
    ``runs`` (label → metrics of this session's runs, in order), ``last_metrics``.
    """

    def __init__(
        self,
        model: str | LoadedModel = "facts",
        *,
        forget: str | Path | None = None,
        retain: str | Path | None = None,
        data_format: str | None = None,
        quant: str | QuantConfig = "nf4",
        top_k: int | None = None,
        method: str = "mansu",
        mansu_config: MansuConfig | None = None,
        optim: OptimConfig | None = None,
        stop: StopRule | None = None,
        attribution_config: AttributionConfig | None = None,
        measure_cad: bool = True,
        runs_root: str | Path | None = None,
        load: bool = True,
    ) -> None:

        self.model: LoadedModel | None = None
        self.split: FactSplit | None = None
        self.attribution: Attribution | None = None
        self.circuit: Circuit | None = None
        self.runs: dict[str, RunMetrics] = {}
        self.histories: dict[str, list[dict[str, float]]] = {}  # each run's per-step (per-round) records
        self.last_metrics: RunMetrics | None = None
        self._given_model = model if not isinstance(model, str) else None
        self._forget, self._retain = forget, retain
        self._format = data_format  # the fact files' row shape (cloze, mc, qa, text); None: told per row
        self.mansu_config, self.optim, self.stop = mansu_config, optim, stop
        self.attribution_config = attribution_config
        self.measure_cad = measure_cad
        self.runs_root = str(runs_root) if runs_root is not None else None

        name = model if isinstance(model, str) else model.name
        options = list(BUILTINS) + ([name] if name not in BUILTINS else [])
        if isinstance(quant, QuantConfig):
            self._quant_config: QuantConfig | None = quant
            quant = quant.type
        else:
            self._quant_config = None
        methods = METHODS
        if method not in methods:
            raise WorkbenchError(f"unknown method {method!r}; choose from {', '.join(methods)}")

        # --- widgets -------------------------------------------------------------------
        self.model_dropdown = W.Dropdown(options=options, value=name, description="model")
        self.quant_dropdown = W.Dropdown(options=QUANT_TYPES, value=quant, description="quantizer")
        self.load_button = W.Button(description="Load", icon="download")
        self.model_info = W.HTML()
        self.attribute_button = W.Button(description="Run attribution", button_style="primary")
        self.top_k = W.IntSlider(value=top_k or DEFAULT_TOP_K, min=0, max=max(top_k or DEFAULT_TOP_K, 1),
                                 description="top-k", continuous_update=False)
        self.undo_button = W.Button(description="Undo", icon="undo")
        self.redo_button = W.Button(description="Redo", icon="redo")
        self.circuit_info = W.HTML()
        self.circuit_fig = go.FigureWidget(layout=dict(title="Run attribution to see the circuit", height=420))
        self.heatmap_fig = go.FigureWidget(layout=dict(height=320))
        self.baseline_dropdown = W.Dropdown(options=["paired", "mean", "resample"],
                                            value=attribution_config.baseline if attribution_config else "paired",
                                            description="baseline")
        self.fact_dropdown = W.Dropdown(options=[], value=None, description="one fact")
        self.fact_fig = go.FigureWidget(layout=dict(height=320, title="Pick a fact to see its own heads and MLPs"))
        self.method_dropdown = W.Dropdown(options=methods, value=method, description="method")
        self.run_button = W.Button(description=f"Run {method_label(method)}", button_style="danger")
        self.progress = W.FloatProgress(value=0.0, min=0.0, max=1.0, description="progress")
        self.status = W.Label()
        self.output = W.Output(layout=W.Layout(max_height="240px", overflow="auto", border="1px solid #ddd"))
        self.live_records: list[dict[str, float]] = []  # the running run's history so far
        self.live_fig = go.FigureWidget(layout=dict(height=320, title="Forget and retain so far: run a method"))
        self.report_html = W.HTML("<i>No run yet.</i>")
        self.compare_box = W.VBox([self.report_html])

        # --- wiring (every handler is a method; tests call them directly) -----------------
        self.load_button.on_click(lambda _b: self.load())
        self.attribute_button.on_click(lambda _b: self.run_attribution())
        self.top_k.observe(self._on_top_k, names="value")
        self.fact_dropdown.observe(lambda change: self.show_fact(change["new"]), names="value")
        self.undo_button.on_click(lambda _b: self.undo())
        self.redo_button.on_click(lambda _b: self.redo())
        self.method_dropdown.observe(self._on_method, names="value")
        self.run_button.on_click(lambda _b: self.run_unlearning())

        setup = W.VBox([W.HTML("<b>1. Setup</b>: pick a model and the quantizer the edit must survive."),
                        W.HBox([self.model_dropdown, self.quant_dropdown, self.load_button]), self.model_info])
        circuit = W.VBox([W.HTML("<b>2. Attribute and edit the circuit</b>: click a node to add or remove it."),
                          W.HBox([self.attribute_button, self.baseline_dropdown, self.top_k, self.undo_button,
                                  self.redo_button]),
                          self.circuit_info, self.circuit_fig, self.heatmap_fig,
                          W.HTML("<b>One fact</b>: which heads and MLPs carry it."), self.fact_dropdown,
                          self.fact_fig])
        unlearn = W.VBox([W.HTML("<b>3. Unlearn</b>: MANSU edits the circuit; baselines use plain gradients."),
                          W.HBox([self.method_dropdown, self.run_button]), self.live_fig])
        compare = W.VBox([W.HTML("<b>4. Compare</b>: full precision vs quantized, "
                                 "and what the update did to the bins."),
                          self.compare_box])
        self.tabs = W.Tab(children=[setup, circuit, unlearn, compare])
        for i, title in enumerate(["setup", "circuit", "unlearn", "compare"]):
            self.tabs.set_title(i, title)
        self.ui = W.VBox([self.tabs, W.HBox([self.progress, self.status]), self.output])
        self._refresh_buttons()
        if load:
            self.load()

    # --- display --------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.ui._repr_mimebundle_(**kwargs)

    def display(self) -> None:
        from IPython.display import display

        display(self.ui)

    # --- messages and progress ------------------------------------------------------------
    def _message(self, text: str) -> None:
        # append_stdout works without a kernel (tests) as well as in JupyterLab
        self.output.append_stdout(text.rstrip("\n") + "\n")

    def _error(self, text: str) -> None:
        self.status.value = "error"
        self.output.append_stderr("error: " + text.rstrip("\n") + "\n")

    def _report(self, fraction: float, message: str) -> None:
        """The core's ``progress(fraction, message)`` callback."""
        self.progress.value = min(1.0, max(0.0, float(fraction)))
        self.status.value = message

    def _record(self, record: dict[str, float]) -> None:
        """The core's ``on_record`` callback: redraw the live plot with the new step (round)."""
        self.live_records.append(record)
        drawn = plots.live_history_figure(self.live_records)
        with self.live_fig.batch_update():
            self.live_fig.data = ()
            self.live_fig.add_traces(list(drawn.data))
            self.live_fig.layout = drawn.layout

    def _busy(self, busy: bool) -> None:
        for b in (self.load_button, self.attribute_button, self.run_button):
            b.disabled = busy
        if not busy:
            self._refresh_buttons()

    def _refresh_buttons(self) -> None:
        self.attribute_button.disabled = self.model is None
        self.run_button.disabled = self.model is None
        circuit = self.circuit
        self.undo_button.disabled = not (circuit is not None and circuit.can_undo)
        self.redo_button.disabled = not (circuit is not None and circuit.can_redo)

    @property
    def quant(self) -> QuantConfig:
        """The quantizer chosen in the dropdown (or the ``QuantConfig`` given)."""

        if self._quant_config is not None and self._quant_config.type == self.quant_dropdown.value:
            return self._quant_config
        chosen: Any = self.quant_dropdown.value  # one of QUANT_TYPES; QuantConfig checks it
        return QuantConfig(chosen)

    def _loaded(self) -> tuple[LoadedModel, FactSplit]:
        """The loaded model and its split, or a message saying what to do first."""
        if self.model is None or self.split is None:
            raise WorkbenchError("load a model first (setup tab)")
        return self.model, self.split

    def _edited(self) -> Circuit:
        """The circuit being edited, or a message saying what to do first."""
        self._loaded()
        if self.circuit is None:
            raise WorkbenchError("run attribution first: there is no circuit to edit yet")
        return self.circuit

    # --- 1. setup ------------------------------------------------------------------------
    @_guarded
    def load(self) -> None:
        """Load the model in the dropdown and its split (built-in, or the fact files given)."""

        self._busy(True)
        name = str(self.model_dropdown.value)
        self._report(0.0, f"loading {name}")
        given = self._given_model
        model = given if given is not None and given.name == name else load_model(name, progress=self._report)
        self.split = self._load_split(model)
        self.model = model
        self.attribution = self.circuit = None
        self.circuit_fig.data = []
        self.heatmap_fig.data = []
        s = self.split
        self.model_info.value = (f"<b>{model.name}</b> ({model.architecture}, {model.n_layers} layers × "
                                 f"{model.n_heads} heads) — split <code>{s.name}</code>: {len(s.forget)} forget, "
                                 f"{len(s.retain)} retain facts; quantizer {self.quant.label}")
        self._report(1.0, f"loaded {name}")
        self._message(f"loaded {name}: {len(s.forget)} forget / {len(s.retain)} retain facts")

    def _load_split(self, model: LoadedModel) -> FactSplit:
        if self._forget is None and self._retain is None:

            return builtin_split(model)
        if self._forget is None or self._retain is None:
            raise WorkbenchError("pass both forget= and retain= fact files (or neither, for a built-in split)")

        kw = {"tokenizer": model.tokenizer, "max_context": model.n_ctx, "format": self._format}
        forget = load_fact_file(self._forget, **kw)
        retain = load_fact_file(self._retain, **kw)
        return FactSplit(name=f"{Path(self._forget).stem}|{Path(self._retain).stem}", forget=tuple(forget),
                         retain=tuple(retain))

    # --- 2. attribution and the circuit ---------------------------------------------------
    @_guarded
    def run_attribution(self) -> None:
        """Attribute the forget set, start from the top-k circuit, draw it."""

        model, split = self._loaded()
        self._busy(True)
        config = dataclasses.replace(self.attribution_config or AttributionConfig(),
                                     baseline=self.baseline_dropdown.value)
        self.attribution = attribute_forget_set(model, split, config, progress=self._report)
        n_components = len(self.attribution.scores)
        k = min(self.top_k.value, n_components)
        self.circuit = default_circuit(self.attribution, top_k=k)
        with self.top_k.hold_trait_notifications():
            self.top_k.max = n_components
            self.top_k.value = k
        self._replace(self.heatmap_fig, plots.head_heatmap(self.attribution))
        self._redraw_circuit()
        self._report(1.0, "attribution done")
        self.fact_dropdown.options = [(f"{i}: {p}", i) for i, p in enumerate(self.attribution.pair_prompts)]
        self._message(f"attribution ({self.attribution.method}, {self.attribution.baseline} baseline): "
                      f"{self.attribution.pairing.describe()}; top-{k} circuit selected")

    @_guarded
    def show_fact(self, index: int | None) -> None:
        """Draw one fact's own attribution (which heads and MLPs carry this fact)."""
        if index is None:
            return
        if self.attribution is None:
            raise WorkbenchError("run attribution first")
        self._replace(self.fact_fig, plots.fact_heatmap(self.attribution, int(index)))

    def _on_top_k(self, change: Mapping[str, Any]) -> None:
        if self.circuit is not None:  # before attribution the slider only sets the initial size
            self.set_top_k(int(change["new"]))

    @_guarded
    def set_top_k(self, k: int) -> None:
        """Select the top-k components by |score| (embeddings excluded, as the core's default)."""
        self._edited().select_top_k(k, include_embed=False)
        if self.top_k.value != k:
            self.top_k.value = k
        self._redraw_circuit()

    @_guarded
    def toggle(self, name: str) -> None:
        """Add or remove one component (``"L1.H3"``, ``"L0.MLP"``) and redraw."""
        circuit = self._edited()
        was_in = any(c.name == name for c in circuit.selected)
        circuit.toggle(name)
        self._redraw_circuit()
        self._message(f"{'removed' if was_in else 'added'} {name}: {len(circuit.selected)} components selected")

    def _on_node_click(self, trace: Any, points: Any, _state: Any = None) -> None:
        """``FigureWidget`` click handler: toggle every clicked node (the logits sink is fixed)."""
        names = [trace.customdata[i] for i in points.point_inds]
        for name in names:
            if name == "logits":
                self._message("logits is the readout: always in the circuit")
                continue
            self.toggle(name)

    @_guarded
    def undo(self) -> None:
        if self._edited().undo():
            self._redraw_circuit()

    @_guarded
    def redo(self) -> None:
        if self._edited().redo():
            self._redraw_circuit()

    def _redraw_circuit(self) -> None:

        circuit = self._edited()
        self._replace(self.circuit_fig, plots.circuit_figure(circuit))
        traces: Any = self.circuit_fig.data  # FigureWidget traces (their stubs type them as plain data)
        for trace in traces:
            if trace.name in NODE_TRACES:
                trace.on_click(self._on_node_click)
        chosen = ", ".join(sorted(c.name for c in circuit.selected)) or "nothing"
        self.circuit_info.value = f"<b>{len(circuit.selected)}</b> selected: {chosen}"
        self._refresh_buttons()

    @staticmethod
    def _replace(widget: go.FigureWidget, fig: go.Figure) -> None:
        """Swap a FigureWidget's content for a core figure (one message to the front end)."""
        with widget.batch_update():
            widget.data = []
            widget.add_traces(list(fig.data))
            widget.layout = fig.layout

    # --- 3. unlearning --------------------------------------------------------------------
    def _on_method(self, change: Mapping[str, Any]) -> None:
        self.run_button.description = f"Run {method_label(change['new'])}"

    @_guarded
    def run_unlearning(self, method: str | None = None) -> RunMetrics | None:
        """Run the chosen method on the current circuit, save the run, show the comparison.

        Returns the run's metrics (also in ``runs`` and ``last_metrics``).
        """

        model, split = self._loaded()
        method = method or self.method_dropdown.value
        if method not in METHODS:
            raise WorkbenchError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if method == "mansu" and self.circuit is None:
            raise WorkbenchError("MANSU edits a circuit: run attribution first (circuit tab)")
        if self.circuit is not None and not self.circuit.selected and method == "mansu":
            raise WorkbenchError("the circuit is empty: select at least one component for MANSU")
        self._busy(True)
        self.live_records = []
        result, metrics, run = run_unlearning(
            model, split, method=method, quant=self.quant, circuit=self.circuit,
            method_config=self.mansu_config if method == "mansu" else None, optim=self.optim, stop=self.stop,
            measure_cad=self.measure_cad, runs_root=self.runs_root, progress=self._report, on_record=self._record,
        )
        label = f"{method} #{len(self.runs) + 1}"
        self.runs[label] = metrics
        self.histories[label] = result.history
        self.last_metrics = metrics
        f = metrics.forget
        self._message(f"{label}: forget {f.base_fp:.2f} → {f.after_fp:.2f} (fp), {f.after_q:.2f} "
                      f"({self.quant.label}); PTQ gap {metrics.ptq_gap:+.3f}; saved as {run.id if run else '-'}")
        self.show_comparison()
        self.tabs.selected_index = 3
        return metrics

    # --- 4. comparison --------------------------------------------------------------------
    def show_comparison(self) -> None:
        """Report card of the last run, accuracy and occupancy figures, and |Δw|/bin width and
        forget/retain over the steps of every run."""
        import html


        m = self.last_metrics
        if m is None:
            return
        label = list(self.runs)[-1]
        summary = "<br>".join(html.escape(line) for line in summary_lines(m))
        self.report_html.value = f"<b>{label}</b> — report card" + html_table(report_card_rows(m)) + f"<p>{summary}</p>"
        figures = [plots.accuracy_figure(dict(self.runs)),
                   plots.occupancy_figure(m.quantization),
                   plots.update_ratio_figure({k: v.quantization for k, v in self.runs.items()}),
                   plots.history_figure(self.histories)]
        self.compare_figs = [go.FigureWidget(f) for f in figures]
        self.compare_box.children = [self.report_html, *self.compare_figs]


__all__ = ["QUANT_TYPES", "Workbench", "method_label"]
