"""What every unlearning method is given: one :class:`UnlearningTask`, the same for all.

Methods take ``(task, config)`` and return an :class:`~workbench.unlearning.result.UnlearningResult`;
each reads from the task what it needs (the shared optimiser and stopping rule, the
quantizer, the circuit) and ignores the rest, so the registry calls them all alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from workbench.core.components import Component
from workbench.core.errors import WorkbenchError
from workbench.core.progress import Progress
from workbench.models.loaded import LoadedModel
from workbench.quant import QuantConfig
from workbench.unlearning.batches import Batches
from workbench.unlearning.objectives import BaselineConfig

TrainableSet = Literal["quantized", "all"]
"""``quantized``: only the weights the quantizer quantizes (decoder Linear/Conv1D weights), so every
change is exposed to quantization; ``all``: every parameter (embeddings, norms and biases too)."""


@dataclass(frozen=True)
class StopRule:
    """When a run ends.

    Attributes:
        max_steps: step budget.
        forget_target: stop once full-precision forget top-1 <= this (None: run the budget).
        eval_every: check the forget accuracy every this many steps.
    """

    max_steps: int = 100
    forget_target: float | None = 0.1
    eval_every: int = 1

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise WorkbenchError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.forget_target is not None and not 0.0 <= self.forget_target <= 1.0:
            raise WorkbenchError(f"forget_target must be in [0, 1], got {self.forget_target}")
        if self.eval_every < 1:
            raise WorkbenchError(f"eval_every must be >= 1, got {self.eval_every}")


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
        if not self.lr > 0:
            raise WorkbenchError(f"lr must be > 0, got {self.lr}")
        if self.forget_batch < 1 or self.retain_batch < 1:
            raise WorkbenchError("batch sizes must be >= 1")
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
        progress: ``progress(fraction, message)``; a tqdm bar when ``None``.
        should_stop: polled between steps; ``True`` cancels the run.
    """

    model: LoadedModel
    batches: Batches
    quant: QuantConfig
    circuit: tuple[Component, ...] | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    stop: StopRule = field(default_factory=StopRule)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    progress: Progress | None = None
    should_stop: Callable[[], bool] | None = None
