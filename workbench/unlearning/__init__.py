"""Unlearning methods. Every method maps (model, split, ...) to an :class:`UnlearningResult`
whose ``update`` is the change to the base; the base is never modified.

``unlearn(model, split, method=...)`` is the one entry point the faces call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from workbench.errors import WorkbenchError
from workbench.unlearning.baselines import BaselineConfig, objective_for
from workbench.unlearning.loop import Batches, OptimConfig, StopRule, UnlearningResult, run_gradient_method
from workbench.unlearning.mansu import MansuConfig, mansu

if TYPE_CHECKING:
    from workbench.facts import FactSplit
    from workbench.models import LoadedModel
    from workbench.nodes import Component
    from workbench.quant import QuantConfig

GRADIENT_METHODS = ("ga", "graddiff", "ga_klr", "npo", "npo_gdr", "npo_klr", "simnpo")
METHODS = ("mansu",) + GRADIENT_METHODS

# Learning rates that reach the default forget target in tens of steps on the built-ins.
DEFAULT_LR = {"facts": 1e-3, "facts-tiny": 3e-3, "smollm2": 3e-6}


def default_lr(model: LoadedModel) -> float:
    return DEFAULT_LR.get(model.name, 1e-5)


def unlearn(
    model: LoadedModel,
    split: FactSplit,
    *,
    method: str = "mansu",
    quant: QuantConfig | None = None,
    circuit: Iterable[Component] | None = None,
    mansu_config: MansuConfig | None = None,
    optim: OptimConfig | None = None,
    stop: StopRule | None = None,
    baseline: BaselineConfig | None = None,
    progress: Callable[[float, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> UnlearningResult:
    """Run one method and return its result (update, history, diagnostics)."""
    from workbench.quant import QuantConfig

    quant = quant or QuantConfig("nf4")
    batches = Batches.build(model, split)
    if method == "mansu":
        return mansu(model, batches, circuit=circuit, quant=quant, config=mansu_config or MansuConfig(),
                     progress=progress, should_stop=should_stop)
    if method in GRADIENT_METHODS:
        optim = optim or OptimConfig(lr=default_lr(model))
        return run_gradient_method(
            model, batches, objective_for(method, baseline or BaselineConfig()), method=method,
            optim=optim, stop=stop or StopRule(), progress=progress, should_stop=should_stop,
        )
    raise WorkbenchError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


__all__ = [
    "METHODS", "GRADIENT_METHODS", "unlearn", "UnlearningResult", "MansuConfig", "OptimConfig",
    "StopRule", "BaselineConfig", "Batches", "default_lr",
]
