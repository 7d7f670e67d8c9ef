"""What every unlearning method returns: :class:`UnlearningResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.models.update import Update


@dataclass
class UnlearningResult:
    """What an unlearning method produced.

    Attributes:
        update: the change to the base (after = base + update).
        method: method name.
        steps: optimisation steps (or MANSU rounds) taken.
        stopped: why the run ended ("target", "budget", "cancelled", ...).
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
