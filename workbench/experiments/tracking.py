"""Experiment tracking through the libraries labs already use: TensorBoard and MLflow.

Each newly saved run is logged once, from what the store holds: its ``config.json`` (as
text / flattened parameters), its per-step or per-round history, each series where the
records carry it (forget top-1 in full precision, and quantized: every MANSU round, and the
gradient loop's readings, every ``LoopReadings.every``-th step and the last; retain top-1 on a
sample: those readings in both precisions, and MANSU's retain guard, quantized only with
``guard_precision="both"``; the loss) and its
final metrics (forget and retain of the base, w+Δ, Q(w)+Δ and Q(w+Δ), the PTQ gap, the
update's size, the four properties). Logging from the saved run rather than from the live
loop is what lets worker processes and Ray tasks be tracked by the driver alone.

Neither library is needed unless asked for: each is imported when a tracker is made, with
a clear error naming the extra to install (``mansu-workbench[tracking]``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from workbench.core.errors import WorkbenchError
from workbench.experiments.store import Run

TrackerKind = Literal["tensorboard", "mlflow"]
TRACKERS: tuple[TrackerKind, ...] = ("tensorboard", "mlflow")
DEFAULT_DIRS = {"tensorboard": "tensorboard", "mlflow": "mlruns"}
"""Where each tracker writes when no directory is given (relative to the working directory)."""
EXPERIMENT = "mansu-workbench"
"""MLflow experiment name the runs are logged under."""

# history record key → logged name; "{q}" is the run's quantizer (nf4, fp4, int8)
HISTORY_SERIES = {"forget_top1": "forget/fp", "forget_top1_q": "forget/{q}", "retain_top1": "retain/fp",
                  "retain_top1_q": "retain/{q}", "forget_mc": "forget_mc/fp", "forget_mc_q": "forget_mc/{q}",
                  "retain_mc": "retain_mc/fp", "retain_mc_q": "retain_mc/{q}", "loss": "loss"}


@dataclass(frozen=True)
class TrackingConfig:
    """``kind``: which library; ``directory``: its log directory (TensorBoard) or file store (MLflow)."""

    kind: TrackerKind
    directory: Path

    @classmethod
    def of(cls, kind: str, directory: str | None = None) -> TrackingConfig:
        known: dict[str, TrackerKind] = {k: k for k in TRACKERS}
        if kind not in known:
            raise WorkbenchError(f"unknown tracker {kind!r}; choose from {', '.join(TRACKERS)}")
        return cls(known[kind], Path(directory or DEFAULT_DIRS[kind]).resolve())


@dataclass(frozen=True)
class Point:
    """One value of one series at one step (a history record's entry, or a final metric at step 0)."""

    name: str
    step: int
    value: float


class Tracker(Protocol):
    def log_run(self, run: Run) -> None: ...

    def close(self) -> None: ...


def open_tracker(config: TrackingConfig) -> Tracker:
    """The tracker for ``config`` (its library imported now: a missing one fails before any work)."""
    if config.kind == "tensorboard":
        return TensorBoardTracker(config.directory)
    return MlflowTracker(config.directory)


# --- what is logged ---------------------------------------------------------------------------------


def history_points(run: Run) -> list[Point]:
    """The run's per-step (gradient methods) or per-round (MANSU) series."""
    q = run.metrics.quant.type
    points = []
    for record in run.history:
        step = int(record.get("step", len(points)))
        for key, value in record.items():
            if key == "step" or not _finite(value):
                continue
            name = HISTORY_SERIES.get(key, f"{run.metrics.method.split('-')[0]}/{key}").format(q=q)
            points.append(Point(name, step, float(value)))
    return points


def final_metrics(run: Run) -> dict[str, float]:
    """The headline numbers of ``metrics.json``, flat (non-finite and missing values left out)."""
    m = run.metrics
    q = m.quant.type
    values: dict[str, Any] = {"steps": m.steps, "seconds": m.seconds, "ptq_gap": m.ptq_gap,
                              "ptq_gap_base_shift": m.ptq_gap_decomposition.base_shift,
                              "ptq_gap_rounding": m.ptq_gap_decomposition.rounding,
                              "params_changed": m.params_changed, "codes_changed": m.codes_changed,
                              "bucket_overlap": m.bucket_overlap, "code_overlap": m.code_overlap}
    for name, acc in (("forget", m.forget), ("retain", m.retain)):
        values.update({f"{name}/base_fp": acc.base_fp, f"{name}/base_{q}": acc.base_q, f"{name}/fp": acc.after_fp,
                       f"{name}/qbase_delta": acc.after_qbase_delta, f"{name}/{q}": acc.after_q})
    # the span metrics and multiple-choice accuracy beside top-1 (None: not measured, not logged)
    for metric, pair in (("exact", m.exact), ("logprob", m.logprob)):
        if pair is not None:
            for name, acc in (("forget", pair.forget), ("retain", pair.retain)):
                values.update({f"{metric}/{name}/fp": acc.after_fp, f"{metric}/{name}/{q}": acc.after_q})
    mc = m.multiple_choice
    values.update({"forget_mc/base_fp": mc.base_fp, "forget_mc/fp": mc.after_fp, f"forget_mc/{q}": mc.after_q})
    if m.cad is not None:
        values.update({"cad/fp": m.cad.fp, "cad/q": m.cad.quantized})
    for name, prop in m.properties.items():
        if prop.verdict in ("PASS", "fail"):
            values[f"property/{name}"] = 1.0 if prop.verdict == "PASS" else 0.0
    values.update(diagnostic_values(run))
    return {f"final/{k}": float(v) for k, v in values.items() if _finite(v)}


def diagnostic_values(run: Run) -> dict[str, float]:
    """The method's own numbers from ``metrics.json``'s diagnostics (MANSU's Fisher bound, rounds
    undone by the retain guard, seconds by phase; RMU's steering coefficient, ...). Only the
    scalars and the phase timings: per-module tables would add hundreds of series on a real model."""
    diagnostics = run.metrics.diagnostics or {}
    out = {f"diagnostics/{k}": float(v) for k, v in diagnostics.items() if _finite(v)}
    phases = diagnostics.get("seconds_by_phase")
    if isinstance(phases, dict):
        out.update({f"diagnostics/seconds_{k}": float(v) for k, v in phases.items() if _finite(v)})
    return out


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``config.json`` flattened to ``a.b.c → value`` strings (MLflow parameters are flat strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- TensorBoard ------------------------------------------------------------------------------------


class TensorBoardTracker:
    """One TensorBoard run directory per workbench run, under ``directory``."""

    def __init__(self, directory: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise WorkbenchError("--report-to tensorboard needs TensorBoard: "
                                 "pip install 'mansu-workbench[tracking]'") from exc
        self._writer_type = SummaryWriter
        self.directory = directory

    def log_run(self, run: Run) -> None:
        writer = self._writer_type(log_dir=str(self.directory / run.id))
        try:
            writer.add_text("config", "```json\n" + json.dumps(run.config, indent=2) + "\n```", 0)
            for p in history_points(run):
                writer.add_scalar(p.name, p.value, p.step)
            for name, value in final_metrics(run).items():
                writer.add_scalar(name, value, run.metrics.steps)
        finally:
            writer.close()

    def close(self) -> None:
        return None


# --- MLflow -----------------------------------------------------------------------------------------


class MlflowTracker:
    """MLflow runs in a local file store at ``directory`` (``file:`` URI), one per workbench run,
    named by the run id, under the experiment :data:`EXPERIMENT`."""

    def __init__(self, directory: Path) -> None:
        try:
            import mlflow
        except ImportError as exc:
            raise WorkbenchError("--report-to mlflow needs MLflow: pip install 'mansu-workbench[tracking]'") from exc
        # MLflow >= 3.7 keeps the file store in maintenance mode and refuses it unless opted in;
        # it is what works offline with mlflow-skinny alone (a sqlite store needs SQLAlchemy).
        # setdefault: a user who set the variable (to refuse it) keeps their choice.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._mlflow = mlflow
        self.directory = directory
        self.uri = directory.as_uri()

    def log_run(self, run: Run) -> None:
        mlflow = self._mlflow
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(EXPERIMENT)
        with mlflow.start_run(run_name=run.id, tags={"workbench.run_id": run.id, "workbench.method":
                                                     run.metrics.method, "workbench.path": str(run.path)}):
            params = flat_params({k: v for k, v in run.config.items() if k != "provenance"})
            mlflow.log_params({k: v[:6000] for k, v in params.items()})
            mlflow.log_dict(run.config, "config.json")
            for p in history_points(run):
                mlflow.log_metric(p.name, p.value, step=p.step)
            mlflow.log_metrics(final_metrics(run), step=run.metrics.steps)

    def close(self) -> None:
        return None
