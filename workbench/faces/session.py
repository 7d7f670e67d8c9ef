"""What one browser session of the app holds and does, with no UI code in it.

The Gradio face (``app.py``) keeps one :class:`Session` per browser session (in a
``gr.State``) and only wires widgets to its methods; everything a method returns is a
plain object, a table (list of dicts) or a plotly figure from :mod:`workbench.plots`, so
the same flow is testable without a browser and shows the numbers the CLI prints.

Sharing. The loaded base models are process-wide and read-only: :data:`SHARED` (a
:class:`SharedModels`) hands every session the same :class:`~workbench.models.LoadedModel`
per model name, together with its built-in split and its base accuracies (both
deterministic, so computing them once per process is safe). Sessions never modify a base
model — the core never does (an unlearning run produces an ``Update``). What is per
session: the chosen data and quantizer, the attribution and the editable circuit (with
its undo history), the run on screen and a pinned run to compare with.

Uploaded files are size-limited (:data:`MAX_UPLOAD_BYTES`) and parsed as text only
(JSON lines / CSV through :func:`workbench.facts.load_fact_file`, circuits through
:meth:`workbench.circuit.Circuit.load`); nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.core.allocator import hand_back_freed_memory, hands_back_memory
from workbench.core.errors import WorkbenchError
from workbench.core.files import parse_json
from workbench.core.paths import runs_dir
from workbench.core.progress import Progress, scaled, silent
from workbench.data.facts import Fact, FactSplit
from workbench.data.files import load_fact_file
from workbench.data.world import fact_world
from workbench.experiments.flow import (
    attribute_forget_set,
    default_circuit,
    forget_set_pairs,
    no_oracle_reason,
    oracle_for,
    prepare_forget_set,
    run_unlearning,
    take_readout_meter,
)
from workbench.experiments.store import Run, check_run_id, list_runs, load_run
from workbench.experiments.sweep_config import ABLATIONS
from workbench.faces.compare import check_ablations, compare_row
from workbench.faces.plots import (
    accuracy_figure,
    agreement_scatter,
    cad_diff_figure,
    circuit_figure,
    fact_heatmap,
    faithfulness_curve_figure,
    head_heatmap,
    history_figure,
    live_history_figure,
    occupancy_figure,
    update_ratio_figure,
)
from workbench.interpretability.attribution import (
    Attribution,
    AttributionConfig,
    PromptPairs,
    agreement,
    make_prompt_pairs,
)
from workbench.interpretability.circuit import Circuit
from workbench.interpretability.faithfulness import (
    Faithfulness,
    FaithfulnessCurve,
    FaithfulnessMeter,
    faithfulness_curve,
)
from workbench.measurement.ablations import AblationOutcome, ablation_lines, read_ablations
from workbench.measurement.metrics import base_measurement, base_scores, report_card_rows, summary_lines
from workbench.measurement.results import RunMetrics, UpdateMetrics
from workbench.models.builtin_splits import builtin_split, facts_preset, filtered_real_facts
from workbench.models.builtins import BUILTINS
from workbench.models.loaded import LoadedModel
from workbench.models.loading import ModelRoots, load_model, model_key
from workbench.quant import QUANT_TYPES, QuantConfig
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.registry import MethodConfig, default_lr, method_spec
from workbench.unlearning.task import OptimConfig, StopRule

if TYPE_CHECKING:
    import plotly.graph_objects as go


log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
"""Largest fact or circuit file a session accepts (the app also caps uploads at this size)."""

MAX_SETTINGS_CHARS = 100_000
"""Longest method-settings text a session parses (a config is a few hundred characters)."""

FACT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ATTRIBUTION_METHODS = {"atp": "attribution patching (plain)", "ig": "integrated gradients", "exact": "exact patching"}



# --------------------------------------------------------------------------------------------
# Process-wide, read-only: one base model per name
# --------------------------------------------------------------------------------------------


class SharedModels:
    """Thread-safe cache of base models, their built-in splits and base accuracies.

    :func:`workbench.models.load_model` already returns one object per name; this adds
    per-key locks (two sessions asking for the same split or accuracies compute them once,
    different keys do not wait for each other), background preloading with a status line,
    and caches for the derived read-only results.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._splits: dict[tuple[str, str | None], FactSplit] = {}
        self._accuracy: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        self._status: dict[str, str] = {}
        self._threads: dict[str, threading.Thread] = {}
        self.roots: ModelRoots | None = None

    def restrict(self, roots: ModelRoots) -> None:
        """Serve only built-ins and directories under ``roots`` (the app does this at start-up)."""
        self.roots = roots

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def model(self, name: str, progress: Progress | None = None) -> LoadedModel:
        """The shared base model ``name`` (a built-in, built on first use, or a directory)."""

        name = str(name).strip()
        if not name:
            raise WorkbenchError("choose a model: a built-in name or a local Hugging Face directory")
        # Refused names leave no trace here (no lock, no status), so a caller cannot grow these dicts.
        key = model_key(name, self.roots)
        with self._key_lock(f"model:{key}"):
            self._status.setdefault(key, "loading")
            try:
                model = load_model(name, progress=progress, roots=self.roots)
            except WorkbenchError as exc:
                self._status[key] = f"error: {exc}"
                raise
            self._status[key] = "ready"
            return model

    def builtin_split(self, model: LoadedModel, forget_domain: str | None = None) -> FactSplit:
        """The model's built-in split (SmolLM2's is filtered once per process, then cached on disk)."""

        key = (model.name, forget_domain or None)
        with self._key_lock(f"split:{key}"):
            if key not in self._splits:
                self._splits[key] = builtin_split(model, forget_domain=forget_domain or None)
            return self._splits[key]

    def base_accuracy(self, model: LoadedModel, split: FactSplit, quant: QuantConfig) -> list[dict[str, Any]]:
        """Top-1 of the base on every set of ``split``, full precision and quantized (rows)."""

        key = (model.fingerprint + model.name, split_signature(split), quant.label)
        with self._key_lock(f"acc:{key}"):
            if key not in self._accuracy:
                # Top-1 only (multiple choice over SmolLM2's ~1000 facts costs minutes), from the
                # scores the runs' measurement memoises and reuses (metrics.base_scores).
                scores = base_scores(model, split, quant, multiple_choice=False)
                fp, q = scores["base_fp"], scores["base_q"]
                self._accuracy[key] = [
                    {"set": name, "facts": fp[name].n, "full precision": fp[name].top1,
                     quant.label: q[name].top1, "difference": q[name].top1 - fp[name].top1}
                    for name in fp
                ]
            return [dict(r) for r in self._accuracy[key]]

    def prepare_base(self, model: LoadedModel, split: FactSplit, quant: QuantConfig,
                     status: Callable[[str], None] = lambda text: None) -> None:
        """What the app computes in the background from its start, before any click: the base
        accuracies the setup panel shows, and the rest of what a run's measurement takes from the
        base alone (the forget set's multiple choice, the CAD attributions of w and Q(w)), so the
        first "Run MANSU" measures only the update's variants; last, the forget set's prompt pairs,
        dataset means, clean runs and readout meter the default attribution and its readout start from."""
        # Each step's transients handed back before the next: the next does not reuse all of
        # them (at a 128 MiB budget on SmolLM2 the readout meter's forwards peaked with 448 MiB
        # in use and ~800 MiB more freed by the base's attributions, still resident).
        status(f"measuring base accuracy, full precision vs {quant.label}")
        self.base_accuracy(model, split, quant)
        hand_back_freed_memory(collect=True)
        status(f"attributing the base for CAD, full precision and {quant.label}")
        base_measurement(model, split, quant)
        hand_back_freed_memory(collect=True)
        status("making the forget set's prompt pairs, clean runs and readout baselines for attribution")
        prepare_forget_set(model, split, attribution_config())

    def clear_scores(self) -> None:
        """Forget the cached base accuracies (the bench starts each path from none)."""
        self._accuracy.clear()

    def preload(self, name: str) -> None:
        """Start loading ``name`` (and its built-in split) in a background thread, once."""

        key = model_key(name, self.roots)
        with self._lock:
            if name in self._threads:
                return

            def work() -> None:
                try:
                    model = self.model(name)
                    if name in BUILTINS:

                        self._status[key] = "preparing the built-in fact split"
                        split = self.builtin_split(model)
                        # The setup panel's first click then only reads this cache.
                        self.prepare_base(model, split, QuantConfig("nf4"),
                                          status=lambda text: self._status.__setitem__(key, text))
                        hand_back_freed_memory(collect=True)  # its transients: not resident before the first click
                    self._status[key] = "ready"
                except WorkbenchError as exc:
                    self._status[key] = f"error: {exc}"
                except Exception as exc:  # a background thread has nobody to raise to: log it
                    log.exception("preloading %s failed", name)
                    self._status[key] = f"error: {type(exc).__name__} (see the server log)"

            self._status[key] = "loading"
            thread = threading.Thread(target=work, name=f"preload-{name}", daemon=True)
            self._threads[name] = thread
        thread.start()

    def wait(self, name: str, timeout: float | None = None, progress: Progress | None = None) -> None:
        """Wait for a preload of ``name`` started by :meth:`preload` (no-op if none),
        reporting its status every second to ``progress``."""
        thread = self._threads.get(name)
        if thread is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while thread.is_alive() and (deadline is None or time.monotonic() < deadline):
            if progress is not None:
                progress(0.05, f"{name}: {self.status(name)} (loading in the background since the app started)")
            thread.join(1.0)

    def status(self, name: str) -> str:
        """``"ready"``, ``"loading"``, ``"error: …"``, another step, or ``"not loaded"``."""
        try:
            return self._status.get(model_key(name, self.roots), "not loaded")
        except WorkbenchError:
            return "not loaded"


SHARED = SharedModels()
"""The process-wide model cache every session uses."""


def split_signature(split: FactSplit) -> str:
    """A short key that changes whenever the split's prompts or answers change."""
    h = hashlib.sha256(split.name.encode())
    for part in (split.forget, split.retain, split.forget_paraphrase, split.retain_paraphrase):
        h.update(b"\x00")
        for f in part:
            h.update(f"{f.prompt}\x1f{f.answer}\x1e".encode())
    return h.hexdigest()[:16]


def check_upload(path: str | Path, what: str, suffixes: Sequence[str]) -> Path:
    """An uploaded file's path, after the size and extension checks (message names the file)."""
    p = Path(path)
    if not p.is_file():
        raise WorkbenchError(f"{what}: the upload {p.name!r} did not arrive; upload it again")
    size = p.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise WorkbenchError(
            f"{what} {p.name!r} is {size / 1e6:.1f} MB; the limit is {MAX_UPLOAD_BYTES / 1e6:.0f} MB"
        )
    if p.suffix.lower() not in suffixes:
        raise WorkbenchError(f"{what} {p.name!r}: expected a {' / '.join(suffixes)} file")
    return p


def _short_paths(exc: WorkbenchError, path: Path) -> WorkbenchError:
    """The same error with the upload's temporary directory cut from the message."""
    return WorkbenchError(str(exc).replace(str(path), path.name))


def read_fact_upload(path: str | Path, what: str, model: LoadedModel | None = None,
                     data_format: str | None = None) -> tuple[Fact, ...]:
    """Validate an uploaded fact file with the core's parser; errors name the file and line.

    Any row shape of :mod:`workbench.data.files` (cloze, multiple choice, question answering,
    raw text), told from the fields or forced by ``data_format``. With ``model``, answers must
    be known to its tokenizer and prompts must fit its context (as the CLI checks).
    """

    p = check_upload(path, what, FACT_SUFFIXES)
    kwargs: dict[str, Any] = {"format": data_format}
    if model is not None:
        kwargs.update(tokenizer=model.tokenizer, max_context=model.n_ctx)
    try:
        facts = load_fact_file(p, **kwargs)
    except WorkbenchError as exc:
        raise _short_paths(exc, p) from None
    if not facts:
        raise WorkbenchError(f"{what} {p.name!r} holds no facts")
    return facts


@dataclass(frozen=True)
class Limits:
    """What one session may use of a shared server (the app's flags; ``None``: no limit).

    Attributes:
        job_seconds: wall-clock limit of one heavy job (setup, attribution, unlearning).
        runs_quota_bytes: disk space a session's saved runs may take; a new run is refused beyond it.
        runs_total_bytes: disk space all sessions' runs together may take (a new session per run
            would otherwise sidestep the per-session quota).
        private_runs: each session keeps its runs in a directory of its own and sees only those.
    """

    job_seconds: float | None = None
    runs_quota_bytes: int | None = None
    runs_total_bytes: int | None = None
    private_runs: bool = False


PRIVATE_RUNS = "sessions"
"""Subdirectory of the run store holding one directory of runs per app session."""


# --------------------------------------------------------------------------------------------
# Results handed to the face
# --------------------------------------------------------------------------------------------


@dataclass
class SetupResult:
    """What the setup panel shows: a summary line, base accuracies, the forget domains."""

    summary: str
    accuracy: list[dict[str, Any]]
    domains: list[str]
    domain: str | None


@dataclass(frozen=True)
class _MansuRun:
    """A MANSU run of this session and what it was run with, so its ablations can re-run it."""

    run: Run
    config: MansuConfig
    use_oracle: bool
    measure_cad: bool


@dataclass
class RunView:
    """A run on screen: live or reopened from the run store."""

    label: str
    metrics: RunMetrics
    run_id: str | None = None
    path: Path | None = None
    history: tuple[dict[str, float], ...] = ()  # the run's per-step (per-round) records

    @property
    def modules(self) -> list[str]:
        """``"overall"`` and every quantized module of the run's analysis."""
        return ["overall", *(m["name"] for m in self.metrics.quantization.get("modules", []))]


# --------------------------------------------------------------------------------------------
# One browser session
# --------------------------------------------------------------------------------------------


class Session:
    """Everything one user has chosen and computed; see the module docstring.

    Methods raise :class:`~workbench.errors.WorkbenchError` for anything the user can fix
    (the face shows the message) and never modify the shared base model.
    """

    def __init__(self, runs_root: str | Path | None = None, limits: Limits | None = None,
                 default_model: str | None = None) -> None:
        self._runs_base = runs_root
        # What a skipped "Load model and data" assumes (the app's start model); None: nothing.
        self.default_model = default_model
        self.assumed: list[str] = []  # what the last action assumed because a step was skipped
        self.limits = limits or Limits()
        # Made on first use, not here: Gradio deep-copies one initial Session per browser session,
        # so an owner drawn in __init__ would be shared by every session.
        self._owner: str | None = None
        self._user: str | None = None
        self.model: LoadedModel | None = None
        self.split: FactSplit | None = None
        self.quant: QuantConfig | None = None
        self.attribution: Attribution | None = None
        self.reference: dict[str, Attribution] = {}
        self.circuit: Circuit | None = None
        self.pairs: PromptPairs | None = None
        self._meter: FaithfulnessMeter | None = None  # the readout's baselines on self.pairs
        self.faithfulness_result: Faithfulness | None = None
        self.faithfulness_error: str | None = None
        self.faithfulness_seconds: float | None = None
        self._measured_selection: frozenset[str] | None = None  # what the readout's numbers are for
        self.current: RunView | None = None
        self.pinned: RunView | None = None
        self._last_mansu: _MansuRun | None = None  # what try_ablations re-runs
        self.ablations: list[AblationOutcome] = []
        self.live: list[str] = []
        self.live_records: list[dict[str, float]] = []  # the running run's history so far (live plot)
        self._run_clock: tuple[float, float] | None = None  # (start, latest progress fraction) of a run
        self.running = False
        self._cancel = False
        self._workdir: Path | None = None

    # --- where this session's runs live, and how much it may use ---------------------------
    @property
    def owner(self) -> str:
        """Whose runs these are: ``users/<hash of the signed-in name>`` (the app's ``--auth-file``:
        a user's runs follow them from session to session), else ``sessions/<random id>``."""
        if self._user is not None:
            return f"users/{hashlib.sha256(self._user.encode()).hexdigest()[:32]}"
        if self._owner is None:
            self._owner = secrets.token_hex(16)
        return f"{PRIVATE_RUNS}/{self._owner}"

    def sign_in(self, user: str | None) -> None:
        """The signed-in user of this session (``None`` without login); it cannot change later."""
        if user is None or user == self._user:
            return
        if self._user is not None:
            raise WorkbenchError("this session belongs to another user; sign in again in a new tab")
        self._user = user

    @property
    def runs_root(self) -> Path | str | None:
        """Where this session saves, lists and opens runs: with :attr:`Limits.private_runs`, a
        directory of its own under the run store (no other session can name or list its runs)."""
        if not self.limits.private_runs:
            return self._runs_base
        base = Path(self._runs_base) if self._runs_base is not None else runs_dir()
        return base / self.owner

    def runs_bytes(self) -> int:
        """Disk space this session's runs take."""
        return _bytes_under(self.runs_root)

    def _check_quota(self) -> None:
        quota, total = self.limits.runs_quota_bytes, self.limits.runs_total_bytes
        if quota is not None and (used := self.runs_bytes()) >= quota:
            raise WorkbenchError(
                f"your saved runs take {used / 1e6:.3g} MB of your {quota / 1e6:g} MB quota, so no new run can be "
                "saved; ask the operator to archive old runs or to raise --runs-quota-mb"
            )
        if total is not None:
            store = Path(self._runs_base) if self._runs_base is not None else runs_dir()
            if (used := _bytes_under(store)) >= total:
                raise WorkbenchError(
                    f"the app's run store is full ({used / 1e6:.3g} MB of {total / 1e6:g} MB), so no new run can "
                    "be saved; ask the operator to archive old runs or to raise --runs-total-mb"
                )

    def _bounded(self, progress: Progress | None) -> Progress:
        """``progress``, raising once the job has run past :attr:`Limits.job_seconds` (checked at
        every progress report, i.e. between steps/rounds; a finished job is never failed)."""
        report = progress or silent
        limit = self.limits.job_seconds
        if limit is None:
            return report
        deadline = time.monotonic() + limit

        def checked(f: float, message: str) -> None:
            if f < 1.0 and time.monotonic() > deadline:
                raise WorkbenchError(
                    f"stopped: this job ran longer than the app's limit of {limit:g} s per job "
                    "(--job-timeout); nothing was saved. Choose a smaller budget and run it again"
                )
            report(f, message)

        return checked

    # --- setup ----------------------------------------------------------------------------
    @hands_back_memory
    def setup(
        self,
        model_name: str,
        *,
        forget_file: str | Path | None = None,
        retain_file: str | Path | None = None,
        forget_domain: str | None = None,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = False,
        progress: Progress | None = None,
        data_format: str | None = None,
    ) -> SetupResult:
        """Load (share) the model, choose the data and the quantizer; base accuracies fp vs quantized.

        Both fact files, or neither (then the model's built-in split, optionally with
        another forget domain). ``data_format`` forces the files' row shape (cloze, mc, qa,
        text; default: told from each row). A new model or new data resets the attribution
        and circuit.
        """

        # Loading or building a model is not timed: a built-in's build is a fixed recipe, serialised
        # by a lock, and a build stopped half-way would make that model unbuildable under a short limit.
        loading = progress or silent
        if quant_type not in QUANT_TYPES:
            raise WorkbenchError(f"unknown quantizer {quant_type!r}; choose {', '.join(QUANT_TYPES)}")
        try:
            blocksize = int(blocksize)
        except (TypeError, ValueError):
            raise WorkbenchError(f"block size must be a whole number, got {blocksize!r}") from None
        quant = QuantConfig(quant_type, blocksize=blocksize, double_quant=bool(double_quant))
        name = str(model_name or "").strip()
        loading(0.05, f"loading {name} (built and cached on first use)")
        SHARED.wait(name, progress=loading)  # a background preload of the same model: join it, don't race it
        model = SHARED.model(name, progress=lambda f, m: loading(0.05 + 0.4 * f, m))
        report = self._bounded(progress)  # the work this request asks for, from here on, is timed
        if (forget_file is None) != (retain_file is None):
            raise WorkbenchError("upload both a forget file and a retain file, or neither for the built-in split")
        domains: list[str] = []
        if forget_file is not None and retain_file is not None:
            report(0.5, "checking the uploaded fact files")
            forget = read_fact_upload(forget_file, "forget file", model, data_format)
            retain = read_fact_upload(retain_file, "retain file", model, data_format)
            split = FactSplit(name=f"user:{Path(forget_file).name}", forget=forget, retain=retain)
            domain = None
        else:
            if name not in BUILTINS:
                raise WorkbenchError(
                    f"{name} is a local model without a built-in fact split: upload a forget file and a retain file"
                )
            report(0.5, "preparing the built-in fact split")
            split = SHARED.builtin_split(model, forget_domain or None)
            domains = self.domains(model)
            domain = forget_domain or _split_domain(split)
        report(0.7, f"base accuracy, full precision vs {quant.label}")
        rows = SHARED.base_accuracy(model, split, quant)
        if self.model is not model or self.split is None or split_signature(self.split) != split_signature(split):
            self._reset_analysis()
        self.model, self.split, self.quant = model, split, quant
        counts = split.counts()
        summary = (
            f"**{name}** ({model.architecture}, {model.n_layers} layers × {model.n_heads} heads) · "
            f"split **{split.name}**: forget {counts['forget']}, retain {counts['retain']} facts · "
            f"quantizer **{quant.label}**"
        )
        report(1.0, "ready")
        return SetupResult(summary=summary, accuracy=rows, domains=domains, domain=domain)

    def domains(self, model: LoadedModel | None = None) -> list[str]:
        """Forget domains a built-in split can use (empty for user data or local models)."""

        model = model or self.model
        if model is None:
            return []
        preset = facts_preset(model)
        if preset is not None:

            return list(fact_world(seed=preset.seed, size=preset.world_size).domain_names)
        if model.name == "smollm2":

            facts = filtered_real_facts(model)
            return sorted({f.domain for f in facts} | {f.relation for f in facts if f.relation})
        return []

    def _reset_analysis(self) -> None:
        self.attribution = None
        self.reference = {}
        self.circuit = None
        self.pairs = None
        self._meter = None
        self.faithfulness_result = None
        self.faithfulness_error = None
        self._last_mansu = None
        self.ablations = []

    def ensure_setup(self, progress: Progress | None = None) -> tuple[LoadedModel, FactSplit, QuantConfig]:
        """Like :meth:`require`, but a skipped setup runs with step 1's defaults (the app's start
        model, its built-in data, NF4 in blocks of 64) and says so in :attr:`assumed`."""
        if self.model is None and self.default_model is not None:
            self.setup(self.default_model, progress=progress)
            self.assumed.append(f"“Load model and data” was skipped: loaded {self.default_model} with its "
                                "built-in forget/retain split and NF4 in blocks of 64 (step 1's defaults).")
        return self.require()

    def require(self) -> tuple[LoadedModel, FactSplit, QuantConfig]:
        """The loaded model, its split and quantizer, or a message saying to load them first."""
        if self.model is None or self.split is None or self.quant is None:
            raise WorkbenchError("load a model and its data first (Setup: “Load model and data”)")
        return self.model, self.split, self.quant

    def require_circuit(self) -> Circuit:
        """The circuit being edited, or a message saying how to get one."""
        if self.circuit is None:
            raise WorkbenchError("run attribution first (Attribution: “Run attribution”), or upload a circuit")
        return self.circuit

    def require_attribution(self) -> Attribution:
        """The attribution on screen, or a message saying to run it first."""
        if self.attribution is None:
            raise WorkbenchError("run attribution first, then compare it with another method")
        return self.attribution

    # --- attribution ----------------------------------------------------------------------
    @hands_back_memory
    def attribute(
        self, method: str = "atp", *, ig_steps: int = 8, edges: bool = True, baseline: str = "paired",
        progress: Progress | None = None, measure: bool = True,
    ) -> Attribution:
        """Attribute the forget set and start a fresh circuit from the core's default (top-k).

        ``measure=False``: the new circuit's faithfulness is left to :meth:`measure_faithfulness`
        (as :meth:`edit` does), so a face can draw the circuit first: on SmolLM2 the measurement
        was about half of the click."""

        self.assumed = []
        model, split, _q = self.ensure_setup(progress)
        config = attribution_config(method, ig_steps=ig_steps, edges=edges, baseline=baseline)
        pairs = forget_set_pairs(model, split, config)
        attribution = attribute_forget_set(model, split, config, progress=self._bounded(progress), pairs=pairs)
        self.attribution = attribution
        self.reference = {method: attribution}
        self.pairs = pairs  # the readout measures faithfulness on the very pairs attributed
        self._set_circuit(default_circuit(attribution), measure=measure)
        return attribution

    def attribution_text(self) -> str:
        """What the attribution averaged over, and which baseline each fact got (Markdown)."""
        a = self.require_attribution()
        return (f"{a.n_pairs} facts attributed ({a.baseline} baseline): {a.pairing.describe()} · metric "
                f"{a.metric}: clean {a.clean_metric:.3f}, baseline {a.corrupt_metric:.3f}")

    def fact_choices(self) -> list[tuple[str, int]]:
        """(label, index) of every attributed fact, for a picker."""
        a = self.require_attribution()
        return [(f"{i}: {p}", i) for i, p in enumerate(a.pair_prompts)]

    def fact_view(self, index: Any) -> tuple[go.Figure, list[dict[str, Any]]]:
        """Which heads and MLPs carry this one fact: its heatmap and its strongest components."""
        a = self.require_attribution()
        i = _whole(index, "fact")
        scores = a.for_fact(i)
        ranked = sorted(scores.items(), key=lambda kv: -abs(kv[1]))[:10]
        rows = [{"component": c.name, "score": round(s, 6)} for c, s in ranked]
        return fact_heatmap(a, i), rows

    @hands_back_memory
    def faithfulness_curve(self, max_k: Any = 20, *, ablation: str = "corrupt", metric: str = "logit_diff",
                           progress: Progress | None = None) -> tuple[FaithfulnessCurve, go.Figure]:
        """Faithfulness of the top-k heads/MLPs of the attribution for k = 1..max_k, and its figure."""
        model, split, _q = self.require()
        a = self.require_attribution()
        if self.pairs is None:
            self.pairs = make_prompt_pairs(model, split.forget, metric=a.metric,  # type: ignore[arg-type]
                                           baseline=a.baseline)  # type: ignore[arg-type]
        meter = self._meter  # the readout's baselines, when the curve asks for the same ablation and metric
        if meter is not None and not meter.measures(model, self.pairs, ablation, metric):
            meter = None
        curve = faithfulness_curve(a, model, self.pairs, max_k=_whole(max_k, "max k"),
                                   ablation=ablation, metric=metric,  # type: ignore[arg-type] -- core checks
                                   progress=self._bounded(progress), meter=meter)
        return curve, faithfulness_curve_figure(curve)

    @hands_back_memory
    def agreement(self, reference: str = "exact", *, ig_steps: int = 8,
                  progress: Progress | None = None) -> tuple[dict[str, float], go.Figure]:
        """How the current attribution agrees with another method's (rank correlations, top-k overlap)."""

        model, split, _q = self.require()
        attribution = self.require_attribution()
        if reference == attribution.method and reference != "ig":
            raise WorkbenchError(f"the attribution on screen already uses {reference}; pick another method to compare")
        if reference not in self.reference:
            config = AttributionConfig(method=reference, ig_steps=_whole(ig_steps, "IG steps"),  # type: ignore[arg-type]
                                       baseline=attribution.baseline)  # type: ignore[arg-type]
            self.reference[reference] = attribute_forget_set(model, split, config, progress=self._bounded(progress))
        ref = self.reference[reference]
        numbers = agreement(attribution, ref, top_k=10)
        figure = agreement_scatter(attribution, ref, labels=(attribution.method, ref.method))
        return numbers, figure

    # --- circuit --------------------------------------------------------------------------
    def _set_circuit(self, circuit: Circuit, *, measure: bool = True) -> None:
        model, split, _q = self.require()
        self.circuit = circuit
        if self.pairs is None or self.pairs.metric != circuit.metric:
            baseline = self.attribution.baseline if self.attribution is not None else "paired"
            self.pairs = make_prompt_pairs(model, split.forget, metric=circuit.metric,
                                           baseline=baseline)  # type: ignore[arg-type] -- an Attribution's own
        if measure:
            self.measure_faithfulness()
        else:
            self._measured_selection = None  # the readout says "measuring…" until measured

    @hands_back_memory
    def measure_faithfulness(self) -> Faithfulness | None:
        """Recompute faithfulness of the current selection (kept on the session for the readout)."""

        circuit = self.require_circuit()
        model, _s, _q = self.require()
        start = time.perf_counter()
        selection = frozenset(c.name for c in circuit.selected)
        try:
            self.faithfulness_result = self._faithfulness_meter(model).of(circuit)
            self.faithfulness_error = None
        except WorkbenchError as exc:
            # Undefined faithfulness (e.g. clean == corrupt) is a fact about the data, not a failed edit.
            self.faithfulness_result, self.faithfulness_error = None, str(exc)
        self.faithfulness_seconds = time.perf_counter() - start
        self._measured_selection = selection
        return self.faithfulness_result

    def _faithfulness_meter(self, model: LoadedModel) -> FaithfulnessMeter:
        """The readout's baselines (means, clean and baseline metrics, the floor) depend on the model
        and the pairs only: measured once per attribution, so an edit's readout is two ablated runs."""
        if self.pairs is None:
            raise WorkbenchError("no prompt pairs to measure faithfulness on: run attribution first")
        meter = self._meter
        if meter is None or meter.model is not model or meter.pairs is not self.pairs:
            # the background start's meter when these are its pairs (the default forget set's, not yet
            # taken); else measured here (pairs of an uploaded circuit or another metric: ~11 s on SmolLM2)
            meter = self._meter = take_readout_meter(model, self.pairs) or FaithfulnessMeter(model, self.pairs)
        return meter

    @property
    def faithfulness_is_current(self) -> bool:
        """Whether the readout's numbers are for the circuit's selection as it is now."""
        if self.circuit is None:
            return False
        return self._measured_selection == frozenset(c.name for c in self.circuit.selected)

    def edit(self, action: str, value: Any = None, *, measure: bool = True) -> Faithfulness | None:
        """One circuit edit, then faithfulness again (``measure=False``: later, by
        :meth:`measure_faithfulness`, so a face can redraw the circuit at once and let the readout
        follow; until then :meth:`faithfulness_text` says it is being measured). ``action``:

        ``top_k`` (value k), ``threshold`` (|score| ≥ value), ``mass`` (fraction of total
        |score|), ``include`` / ``exclude`` (component name or names), ``toggle`` (a name),
        ``set`` (exactly these names), ``undo``, ``redo``.
        """
        circuit = self.require_circuit()
        if action == "top_k":
            circuit.select_top_k(_whole(value, "top-k"), include_embed=False)
        elif action == "threshold":
            circuit.select_threshold(value, include_embed=False)  # the core validates the value
        elif action == "mass":
            circuit.select_mass(value, include_embed=False)
        elif action in ("include", "exclude"):
            names = _names(value)
            if not names:
                raise WorkbenchError(f"choose a component to {action}")
            getattr(circuit, action)(*names)
        elif action == "toggle":
            (name,) = _names(value) or [None]
            if name is None:
                raise WorkbenchError("choose a component to toggle")
            circuit.toggle(name)
        elif action == "set":
            circuit.set_selection(_names(value))
        elif action == "undo":
            if not circuit.undo():
                raise WorkbenchError("nothing to undo")
        elif action == "redo":
            if not circuit.redo():
                raise WorkbenchError("nothing to redo")
        else:
            raise WorkbenchError(f"unknown circuit edit {action!r}")
        return self.measure_faithfulness() if measure else None

    def apply_node_table(self, rows: Sequence[Sequence[Any]] | Sequence[Mapping[str, Any]], *,
                         measure: bool = True) -> bool:
        """Make the selection what the node table's checkboxes say (one undoable step).

        Rows are ``[in circuit, component, ...]`` (as :meth:`node_rows` gives, first two
        columns) or dicts with those keys. Returns False when nothing changed.
        """
        circuit = self.require_circuit()
        chosen = []
        for row in rows:
            flag, name = (row["in circuit"], row["component"]) if isinstance(row, Mapping) else (row[0], row[1])
            if _truthy(flag):
                chosen.append(str(name))
        if set(chosen) == {c.name for c in circuit.selected}:
            return False
        self.edit("set", chosen, measure=measure)
        return True

    def node_rows(self) -> list[dict[str, Any]]:
        """Every component, strongest |score| first: in circuit, name, kind, layer, head, score."""
        circuit = self.require_circuit()
        selected = circuit.selected
        ranked = sorted(circuit.scores.items(), key=lambda kv: -abs(kv[1]) if math.isfinite(kv[1]) else 0.0)
        return [
            {"in circuit": c in selected, "component": c.name, "kind": c.kind.value,
             "layer": c.layer, "head": c.head, "score": round(s, 6)}
            for c, s in ranked
        ]

    def faithfulness_text(self) -> str:
        """The live readout (Markdown)."""
        if self.circuit is None:
            return "No circuit yet."
        n = len(self.circuit.selected)
        if not self.faithfulness_is_current:
            return f"**{n} components selected.** Faithfulness: measuring…"
        if self.faithfulness_error:
            return f"**{n} components selected.** Faithfulness: {self.faithfulness_error}"
        f = self.faithfulness_result
        if f is None:
            return f"**{n} components selected.**"
        took = f" · measured in {self.faithfulness_seconds:.2f} s" if self.faithfulness_seconds is not None else ""
        return (
            f"**{n} components selected.** Faithfulness ({f.ablation} ablation; embedding and unembedding "
            f"always kept): circuit alone recovers **{f.recovered:.3f}** of what the heads and MLPs add "
            f"(clean − all ablated); ablating the circuit drops **{f.drop:.3f}** of it "
            f"(metric clean {f.clean_metric:.3f}, all heads/MLPs ablated {f.floor_metric:.3f}, "
            f"corrupt {f.corrupt_metric:.3f}, circuit only {f.circuit_only_metric:.3f}, "
            f"without circuit {f.without_circuit_metric:.3f}){took}"
        )

    def circuit_figures(self) -> tuple[go.Figure, go.Figure]:
        """The layered circuit graph and the layer × head heatmap of the current selection."""

        circuit = self.require_circuit()
        return circuit_figure(circuit), head_heatmap(circuit)

    def component_names(self) -> list[str]:
        """Components of the circuit graph in forward order (for pickers)."""
        return [c.name for c in self.require_circuit().components]

    def workdir(self) -> Path:
        """This session's scratch directory for downloads (removed by :meth:`close`)."""
        if self._workdir is None or not self._workdir.exists():
            self._workdir = Path(tempfile.mkdtemp(prefix="workbench-session-"))
        return self._workdir

    def save_circuit(self) -> Path:
        """Write the circuit as JSON for download; returns the file."""
        circuit = self.require_circuit()
        model, _s, _q = self.require()
        tag = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in Path(model.name).name)
        return circuit.save(self.workdir() / f"circuit-{tag}.json")

    @hands_back_memory
    def load_circuit(self, path: str | Path) -> Circuit:
        """Replace the circuit by an uploaded JSON file (validated against the loaded model)."""

        model, _s, _q = self.require()
        p = check_upload(path, "circuit file", (".json",))
        try:
            circuit = Circuit.load(p, model=model)
        except WorkbenchError as exc:
            raise _short_paths(exc, p) from None
        self._set_circuit(circuit)
        return circuit

    # --- unlearning -------------------------------------------------------------------------
    def unlearn(
        self,
        method: str = "mansu",
        *,
        mansu: Mapping[str, Any] | None = None,
        optim: Mapping[str, Any] | None = None,
        stop: Mapping[str, Any] | None = None,
        settings: Mapping[str, Any] | str | None = None,
        measure_cad: bool = True,
        use_oracle: bool = True,
        progress: Progress | None = None,
    ) -> RunView:
        """Run MANSU or a baseline through :func:`workbench.experiments.flow.run_unlearning`, save the run.

        ``mansu`` holds :class:`~workbench.unlearning.MansuConfig` fields, ``optim`` and
        ``stop`` those of ``OptimConfig`` / ``StopRule`` (baselines; ``lr`` None = the core's
        default for the model). ``settings`` (a dict or JSON text) holds the fields of a
        baseline's own config (the registry's ``config_type``, e.g. RMU's), see :func:`method_settings`.
        Progress messages are also kept in :attr:`live`.
        :meth:`cancel` stops the run between steps; nothing is saved then.
        """

        if self.running:
            raise WorkbenchError("a run is already in progress in this session; wait for it or cancel it")
        self.assumed = []
        model, split, quant = self.ensure_setup(progress)
        if self._meter is not None:
            self._meter.release()  # the readout's kept corrupt runs: MANSU needs the memory more
        if method == "mansu" and self.circuit is None:
            self.assumed.append("No circuit yet: MANSU edits the default one (top 10 heads/MLPs of attribution "
                                "patching on the forget set), attributed now.")
        method_config, optim_config, stop_rule = run_configs(method, mansu=mansu, optim=optim, stop=stop,
                                                             settings=settings, default_lr=lambda: default_lr(model))
        oracle = oracle_for(model, split) if use_oracle else None
        reason = no_oracle_reason(model, split) if use_oracle else None
        if reason is not None:
            self.assumed.append(reason[0].upper() + reason[1:] + ".")
        run = self._execute(model, split, quant, method, method_config=method_config, optim=optim_config,
                            stop=stop_rule, circuit=self.circuit, oracle=oracle, measure_cad=bool(measure_cad),
                            progress=progress)
        # what ran, as a reopened run shows it (e.g. ``mansu-state_storage`` on a 16-bit model)
        self.current = RunView(label=f"{run.metrics.method} · {run.id}", metrics=run.metrics, run_id=run.id,
                               path=run.path, history=tuple(run.history))
        self._last_mansu, self.ablations = None, []
        if method == "mansu" and isinstance(method_config, MansuConfig):
            self._last_mansu = _MansuRun(run, method_config, bool(use_oracle), bool(measure_cad))
        return self.current

    @hands_back_memory
    def _execute(self, model: LoadedModel, split: FactSplit, quant: QuantConfig, method: str, *,
                 method_config: MethodConfig | None, optim: OptimConfig | None, stop: StopRule | None,
                 circuit: Circuit | None, oracle: LoadedModel | None, measure_cad: bool,
                 progress: Progress | None) -> Run:
        """One run through :func:`run_unlearning`, saved; its messages kept in :attr:`live` for
        :meth:`live_text`, :meth:`cancel` honoured between steps, the runs quota checked first."""
        if self.running:
            raise WorkbenchError("a run is already in progress in this session; wait for it or cancel it")
        self._check_quota()
        report = self._bounded(progress)
        self.live, self.live_records = [], []
        self._run_clock = None

        def tracked(f: float, message: str) -> None:
            self.live.append(message)
            del self.live[:-200]
            self._run_clock = (self._run_clock[0] if self._run_clock else time.monotonic(), f)
            report(f, message)

        self._cancel = False
        self.running = True
        try:
            _result, _metrics, run = run_unlearning(
                model, split, method=method, quant=quant, circuit=circuit,
                optim=optim, stop=stop, method_config=method_config, oracle=oracle,
                measure_cad=measure_cad,
                runs_root=str(self.runs_root) if self.runs_root is not None else None,
                progress=tracked, should_stop=lambda: self._cancel, on_record=self.live_records.append,
            )
        finally:
            self.running = False
        assert run is not None  # save=True always returns the saved run
        return run

    def try_ablations(self, ablations: Sequence[str] = ABLATIONS,
                      progress: Progress | None = None) -> list[AblationOutcome]:
        """Re-run this session's last MANSU run with each component in ``ablations`` switched off
        alone (same split, quantizer, circuit, oracle and CAD setting); each run is saved.

        Returns each ablated run read against the full run (:func:`ablation_lines` puts it in
        words: which ablation would have passed where the full method failed).
        """
        last = self._last_mansu
        if last is None:
            raise WorkbenchError("run MANSU first in this session: the ablations re-run that run with one "
                                 "component switched off at a time")
        names = check_ablations(ablations)
        model, split, quant = self.require()
        circuit = Circuit.load(last.run.circuit_path, model=model) if last.run.circuit_path else None
        oracle = oracle_for(model, split) if last.use_oracle else None
        outcomes = []
        for i, name in enumerate(names):
            config = replace(last.config, **{f"use_{name}": False})
            run = self._execute(model, split, quant, "mansu", method_config=config, optim=None, stop=None,
                                circuit=circuit, oracle=oracle, measure_cad=last.measure_cad,
                                progress=scaled(progress, i / len(names), (i + 1) / len(names)))
            outcomes += read_ablations(last.run.metrics.properties, [(name, run.metrics.properties)])
        self.ablations = outcomes
        return outcomes

    def ablation_text(self) -> str:
        """The last :meth:`try_ablations` in words (empty before one)."""
        if self._last_mansu is None or not self.ablations:
            return ""
        return "\n".join(ablation_lines(self._last_mansu.run.metrics.properties, self.ablations))

    def cancel(self) -> bool:
        """Ask a run in progress to stop at its next step; False when nothing is running."""
        if not self.running:
            return False
        self._cancel = True
        return True

    @property
    def cancel_requested(self) -> bool:
        """Whether :meth:`cancel` was called for the current or last run."""
        return self._cancel

    def live_text(self) -> str:
        """What the run assumed, its newest step with the forget numbers, what it is doing now,
        and the time so far with an estimate of the time left."""
        lines = list(self.assumed)
        if not self.live:
            return "\n".join(lines)
        steps = [m for m in self.live if "forget top-1" in m]
        lines += [f"last step: {steps[-1]}"] if steps else []
        if not steps or self.live[-1] != steps[-1]:
            lines.append(f"now: {self.live[-1]}")
        if self._run_clock is not None:
            lines.append(_time_line(*self._run_clock))
        return "\n".join(lines)

    def live_figure(self) -> go.Figure | None:
        """Forget and retain over the running (or last) run's steps so far; ``None`` before its
        first record (MANSU's setup, or a baseline's first step)."""
        if not self.live_records:
            return None
        return live_history_figure(list(self.live_records))

    # --- compare ----------------------------------------------------------------------------
    def pin(self) -> RunView:
        """Keep the run on screen as the comparison run."""
        if self.current is None:
            raise WorkbenchError("run unlearning (or open a saved run) first, then pin it")
        self.pinned = self.current
        return self.pinned

    def unpin(self) -> None:
        self.pinned = None

    # --- runs -------------------------------------------------------------------------------
    def open_run(self, run_id: str) -> RunView:
        """Reopen a saved run's views (its metrics; the update stays on disk)."""

        if not run_id:
            raise WorkbenchError("choose a run from the history first")
        run = self._load_own_run(str(run_id).strip())
        self.current = RunView(label=f"{run.metrics.method} · {run.id}", metrics=run.metrics,
                               run_id=run.id, path=run.path, history=tuple(run.history))
        return self.current

    def run_files(self, run_id: str | None = None) -> list[Path]:
        """metrics.json, config.json and the update of a saved run (default: the run on screen)."""

        rid = run_id or (self.current.run_id if self.current else None)
        if not rid:
            raise WorkbenchError("choose a saved run first")
        run = self._load_own_run(rid)
        # Copies in this session's scratch directory: the run store itself is never served over HTTP.
        out = self.workdir() / "run-files" / run.id
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for name in ("metrics.json", "config.json", "update.safetensors"):
            if (run.path / name).exists():
                files.append(Path(shutil.copy2(run.path / name, out / name)))
        return files

    def _load_own_run(self, run_id: str) -> Run:
        """One of this session's runs; a run it cannot see gets the message of a missing one,
        without the server's directories in it."""
        root = self.runs_root
        if root is not None and not (Path(root) / check_run_id(run_id)).is_dir():
            raise WorkbenchError(f"no run {run_id!r} among this session's runs")
        return load_run(run_id, root=root)

    def close(self) -> None:
        """Free this session's scratch files (the app calls it when the browser session ends)."""
        self._cancel = True
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def _bytes_under(root: str | Path | None) -> int:
    if root is None or not Path(root).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------
# Views of runs (plain functions over a run's metrics, so a reopened run draws the same)
# --------------------------------------------------------------------------------------------


RUN_COLUMNS = ("run", "method", "model", "split", "quantizer", "forget fp", "forget quantized", "retain fp",
               "retain quantized", "forget exact fp", "forget exact Q", "forget MC fp", "forget MC Q", "PTQ gap",
               "forgetting", "retain kept", "PTQ gap ok", "structural")
"""Columns of :func:`runs_table` (values from :func:`workbench.faces.compare.compare_row`, the CLI's comparison)."""


def runs_table(runs_root: str | Path | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The run history, newest first, as the core's comparison rows (one quantizer column pair:
    the run's own)."""

    rows = []
    for run in list_runs(root=runs_root)[:limit]:
        row = compare_row(run)
        q = row.get("quantizer")
        rows.append({
            **{k: row.get(k) for k in RUN_COLUMNS},
            "model": run.metrics.model, "split": run.metrics.split,
            "forget quantized": row.get(f"forget {q}"), "retain quantized": row.get(f"retain {q}"),
        })
    return rows


def report_card_table(metrics: UpdateMetrics) -> list[dict[str, Any]]:
    """The four-property report card as rows (the core's :func:`workbench.measurement.metrics.report_card_rows`)."""

    rows = report_card_rows(metrics)
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in rows]


def run_summary(view: RunView) -> str:
    """The run's headline numbers in words (Markdown), the same the CLI prints."""

    m = view.metrics
    lines = [
        f"**{view.label}** — {m.model} · {m.split} · {m.steps} steps, stopped by {m.stopped} · {m.seconds:.1f} s",
        *summary_lines(m),
    ]
    return "  \n".join(lines)


@dataclass
class CompareFigures:
    """The compare panel of one run (the pinned run gets its own)."""

    occupancy: go.Figure
    cad: go.Figure | None
    report: list[dict[str, Any]]
    summary: str
    notes: list[str] = field(default_factory=list)


def compare_figures(view: RunView, module: str = "overall", cad: str = "fp") -> CompareFigures:
    """Occupancy before/after of ``module``, the CAD per-node diff, the report card."""

    m = view.metrics
    if module not in view.modules:
        module = "overall"
    occupancy = occupancy_figure(m.quantization, module)
    notes = []
    try:
        cad_fig = cad_diff_figure(m, "quantized" if cad == "quantized" else "fp")
    except WorkbenchError as exc:
        cad_fig = None
        notes.append(str(exc))
    return CompareFigures(occupancy=occupancy, cad=cad_fig, report=report_card_table(m),
                          summary=run_summary(view), notes=notes)


def shared_figures(views: Sequence[RunView]) -> tuple[go.Figure, go.Figure, go.Figure]:
    """Accuracy fp vs quantized, |Δw|/bin width and forget/retain over the steps, every given run overlaid."""

    labelled = _unique_labels(views)
    accuracy = accuracy_figure({label: v.metrics for label, v in labelled.items()})
    ratios = update_ratio_figure({label: v.metrics.quantization for label, v in labelled.items()})
    return accuracy, ratios, history_figure({label: v.history for label, v in labelled.items()})


def _unique_labels(views: Sequence[RunView]) -> dict[str, RunView]:
    out: dict[str, RunView] = {}
    for i, v in enumerate(views):
        label = v.label if v.label not in out else f"{v.label} ({i + 1})"
        out[label] = v
    return out


# --------------------------------------------------------------------------------------------
# Small parsers (values arrive from widgets or the HTTP API as str/float/None)
# --------------------------------------------------------------------------------------------


def run_configs(
    method: str,
    *,
    mansu: Mapping[str, Any] | None = None,
    optim: Mapping[str, Any] | None = None,
    stop: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | str | None = None,
    default_lr: Callable[[], float] = lambda: 1e-3,
) -> tuple[MethodConfig | None, OptimConfig | None, StopRule | None]:
    """The method's config, the optimiser's and the stop rule, from what a caller sent (every
    value checked: a wrong field, type or range is a :class:`WorkbenchError`, nothing else)."""
    spec = method_spec(method)
    optim_config = stop_rule = None
    method_config: MethodConfig | None = None
    try:
        if method == "mansu":
            method_config = MansuConfig(**dict(mansu or {}))
        else:
            fields = _settings_dict(settings)
            if fields and spec.config_type is None:
                raise WorkbenchError(f"{method} has no settings of its own; leave them empty")
            if spec.config_type is not None:
                method_config = spec.config_type(**fields)
            o = dict(optim or {})
            if o.get("lr") in (None, 0, 0.0):
                o["lr"] = default_lr()
            optim_config = OptimConfig(**o)
            stop_rule = StopRule(**dict(stop or {}))
    except TypeError as exc:  # a wrong field name from an API caller
        raise WorkbenchError(f"bad hyper-parameter: {exc}") from None
    return method_config, optim_config, stop_rule


def method_settings(method: str) -> dict[str, Any]:
    """The default fields of a baseline's own config (``{}`` for MANSU and plain gradient methods)."""
    spec = method_spec(method)
    if method == "mansu" or spec.config_type is None:
        return {}
    return asdict(spec.config_type())


def _settings_dict(settings: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """Settings as a dict; JSON text is parsed as data only (an object of field → value)."""
    if settings is None:
        return {}
    if isinstance(settings, str):
        if not settings.strip():
            return {}
        if len(settings) > MAX_SETTINGS_CHARS:
            raise WorkbenchError(f"method settings: {len(settings)} characters; at most {MAX_SETTINGS_CHARS}")
        # Bounded like every file: no deep nesting, no 5,000-digit integers, no NaN.
        settings = parse_json(settings, source="method settings")
    if not isinstance(settings, Mapping):
        raise WorkbenchError("method settings must be a JSON object of field → value")
    return dict(settings)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"


def _time_line(start: float, fraction: float) -> str:
    """Elapsed time and, from the progress so far, a linear estimate of the time left."""
    elapsed = time.monotonic() - start
    if not 0.02 <= fraction < 1:  # too early to say, or done
        return f"elapsed {_clock(elapsed)}"
    return f"elapsed {_clock(elapsed)} · about {_clock(elapsed * (1 - fraction) / fraction)} left"


def attribution_config(method: str = "atp", *, ig_steps: Any = 8, edges: bool = True,
                       baseline: str = "paired") -> AttributionConfig:
    """The attribution a face asks for (its defaults: the app's "Run attribution" as it opens)."""
    return AttributionConfig(method=method,  # type: ignore[arg-type] -- checked by AttributionConfig
                             ig_steps=_whole(ig_steps, "IG steps"), edges=bool(edges) and method != "exact",
                             baseline=baseline)  # type: ignore[arg-type] -- checked by AttributionConfig


def _whole(value: Any, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise WorkbenchError(f"{what} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise WorkbenchError(f"{what} must be a whole number, got {value!r}")
    return int(number)


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


def _truthy(flag: Any) -> bool:
    if isinstance(flag, str):
        return flag.strip().lower() in ("true", "1", "yes", "✓", "x")
    return bool(flag)



def _split_domain(split: FactSplit) -> str | None:
    domains = {f.domain for f in split.forget}
    return next(iter(domains)) if len(domains) == 1 else None


__all__ = [
    "MAX_UPLOAD_BYTES",
    "PRIVATE_RUNS",
    "SHARED",
    "CompareFigures",
    "Limits",
    "RunView",
    "Session",
    "SetupResult",
    "SharedModels",
    "check_upload",
    "compare_figures",
    "method_settings",
    "read_fact_upload",
    "report_card_table",
    "run_configs",
    "run_summary",
    "runs_table",
    "shared_figures",
]
