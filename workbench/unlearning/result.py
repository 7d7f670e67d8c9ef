"""What every unlearning method returns: :class:`UnlearningResult`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.models.loaded import LoadedModel
from workbench.models.prefix import PrefixCache
from workbench.models.update import Update
from workbench.unlearning.batches import Batches

ALREADY_AT_TARGET = "already at target"
"""Why a run that took no step ended: the base already misses the forget set (see
:func:`already_at_target`)."""


@dataclass
class UnlearningResult:
    """What an unlearning method produced.

    Attributes:
        update: the change to the base (after = base + update).
        method: method name.
        steps: optimisation steps (or MANSU rounds) taken.
        stopped: why the run ended ("target", "budget", "cancelled", :data:`ALREADY_AT_TARGET`, ...).
        seconds: wall time.
        history: per-step records (step, loss, forget_top1, ...), for live plots.
        diagnostics: method-specific numbers, JSON-ready (e.g. MANSU's Fisher bound and floor checks).
        seconds_by_phase: where the unlearning time went, for methods that time their phases (MANSU).
    """

    update: Update
    method: str
    steps: int
    stopped: str
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    seconds_by_phase: dict[str, float] = field(default_factory=dict)


def accuracy_text(record: Mapping[str, float], key: str, label: str) -> str | None:
    """How a progress line shows a history record's accuracy ``key``: ``label v (quantized q)``,
    ``label v`` without ``key_q``, ``label quantized q`` with only ``key_q``; ``None`` with neither.
    MANSU's round lines and the gradient loop's step lines both read their records through it."""
    value, quantized = record.get(key), record.get(key + "_q")
    if value is None:
        return None if quantized is None else f"{label} quantized {quantized:.3f}"
    return f"{label} {value:.3f}" + ("" if quantized is None else f" (quantized {quantized:.3f})")


def already_at_target(batches: Batches, hf: torch.nn.Module | PrefixCache, target: float | None, *,
                      quantized: torch.nn.Module | PrefixCache | None = None) -> bool:
    """Does the base already answer at most ``target`` of the forget set by the run's criterion
    (:meth:`Batches.target`; and so does its quantized copy, when given)? Then no step is taken:
    every step would move weights, and cost retain, for a forgetting property that holds
    already (a user's file of facts the model never knew, e.g. a TOFU-style set on a model not
    fine-tuned on it)."""
    if target is None or batches.forget_accuracy(hf) > batches.target(target):
        return False
    return quantized is None or batches.forget_accuracy(quantized) <= batches.target(target)


def nothing_to_unlearn(model: LoadedModel, method: str, start: float) -> UnlearningResult:
    """The result of a run stopped before its first step by :func:`already_at_target`: an empty update."""
    update = Update({}, {"method": method, "base_fingerprint": model.fingerprint})
    return UnlearningResult(update=update, method=method, steps=0, stopped=ALREADY_AT_TARGET,
                            seconds=time.perf_counter() - start)
