"""What every unlearning method is given: one :class:`UnlearningTask`, the same for all.

Methods take ``(task, config)`` and return an :class:`~workbench.unlearning.result.UnlearningResult`;
each reads from the task what it needs (the shared optimiser and stopping rule, the
quantizer, the circuit) and ignores the rest, so the registry calls them all alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from workbench.core.checks import Range, check_config
from workbench.core.components import Component
from workbench.core.errors import WorkbenchError
from workbench.core.progress import Progress
from workbench.models.loaded import LoadedModel
from workbench.quant import QuantConfig
from workbench.unlearning.batches import Batches
from workbench.unlearning.objectives import BaselineConfig
from workbench.unlearning.readings import LoopReadings

RecordSink = Callable[[dict[str, float]], None]
"""Called with each history record as a method makes it (a gradient step, a kept MANSU round): the
app's live plot. The record is a copy: the sink may keep it."""

TrainableSet = Literal["quantized", "all"]
"""``quantized``: only the weights the quantizer quantizes (decoder Linear/Conv1D weights), so every
change is exposed to quantization; ``all``: every parameter (embeddings, norms and biases too)."""


@dataclass(frozen=True)
class StopRule:
    """When a run ends.

    Attributes:
        max_steps: step budget.
        forget_target: stop once full-precision forget top-1 <= this (None: run the budget);
            on a multiple-choice forget set, MC accuracy <= max(this, chance level).
        eval_every: check the forget accuracy every this many steps.
    """

    max_steps: int = 100
    forget_target: float | None = 0.1
    eval_every: int = 1

    def __post_init__(self) -> None:
        check_config(self, {"max_steps": Range(1, 100_000, integer=True), "forget_target": Range(0, 1, optional=True),
                            "eval_every": Range(1, 100_000, integer=True)})


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and batching of a gradient method.

    Attributes:
        lr: Adam learning rate.
        forget_batch: forget rows per step (all if larger than the set).
        retain_batch: retain rows per step.
        trainable: see :data:`TrainableSet`.
        seed: seeds the batch sampling.
    """

    lr: float = 1e-5
    forget_batch: int = 64
    retain_batch: int = 64
    trainable: TrainableSet = "quantized"
    seed: int = 0

    def __post_init__(self) -> None:
        check_config(self, {"lr": Range(0, 1, low_open=True), "forget_batch": Range(1, 10**6, integer=True),
                            "retain_batch": Range(1, 10**6, integer=True), "seed": Range(0, 2**63 - 1, integer=True)})
        if self.trainable not in ("quantized", "all"):
            raise WorkbenchError(f"trainable must be 'quantized' or 'all', got {self.trainable!r}")


@dataclass(frozen=True)
class UnlearningTask:
    """One unlearning job.

    Attributes:
        model: the base (never modified).
        batches: the forget and retain sets as tensors on the model's device.
        quant: the quantizer the result will be deployed with.
        circuit: the components a circuit-restricted method may move (``None``: no circuit).
        optim: optimiser and batching of the gradient methods.
        stop: the shared stopping rule of the gradient methods.
        baseline: loss weights of the gradient-ascent family (also used by SURE, QUAIL, LoRA).
        readings: what the gradient loop reads for its progress and history beside the forget
            accuracy (retain, and Q(w+Δ)'s forget and retain; :mod:`~workbench.unlearning.readings`).
        progress: ``progress(fraction, message)``; a tqdm bar when ``None``.
        should_stop: polled between steps; ``True`` cancels the run.
        on_record: each history record as it is made (:data:`RecordSink`).
    """

    model: LoadedModel
    batches: Batches
    quant: QuantConfig
    circuit: tuple[Component, ...] | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    stop: StopRule = field(default_factory=StopRule)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    readings: LoopReadings = field(default_factory=LoopReadings)
    progress: Progress | None = None
    should_stop: Callable[[], bool] | None = None
    on_record: RecordSink | None = None

    def publish(self, record: dict[str, float]) -> None:
        """Hand a new history record to :attr:`on_record` (a copy), when there is one."""
        if self.on_record is not None:
            self.on_record(dict(record))
