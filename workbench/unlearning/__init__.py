"""Unlearning methods. Every method maps (model, split, ...) to an :class:`UnlearningResult`
whose ``update`` is the change to the base; the base is never modified.

``unlearn(model, split, method=...)`` is the one entry point the faces call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError
from workbench.unlearning.baselines import BaselineConfig, objective_for
from workbench.unlearning.lora import LoraConfig, lora
from workbench.unlearning.loop import Batches, OptimConfig, StopRule, UnlearningResult, run_gradient_method
from workbench.unlearning.mansu import MansuConfig, mansu
from workbench.unlearning.quail import QuailConfig, quail
from workbench.unlearning.rmu import RmuConfig, rmu
from workbench.unlearning.sure import SureConfig, sure

if TYPE_CHECKING:
    from workbench.facts import FactSplit
    from workbench.models import LoadedModel
    from workbench.nodes import Component
    from workbench.quant import QuantConfig

GRADIENT_METHODS = ("ga", "graddiff", "ga_klr", "npo", "npo_gdr", "npo_klr", "simnpo")
"""Baselines that are only an objective for the shared loop (:mod:`workbench.unlearning.baselines`)."""
SPECIAL_METHODS = ("rmu", "sure", "quail", "lora")
"""Baselines with their own module: RMU (activations), SURE (row mask, larger lr), QUAIL
(logit hinge at half a quantization step), LoRA (adapters merged before quantizing)."""
BASELINES = GRADIENT_METHODS + SPECIAL_METHODS
METHODS = ("mansu",) + BASELINES
METHOD_CONFIGS: dict[str, type] = {"mansu": MansuConfig, "rmu": RmuConfig, "sure": SureConfig,
                                   "quail": QuailConfig, "lora": LoraConfig}
"""The config dataclass of each method that has one beyond :class:`BaselineConfig`."""

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
    method_config: Any = None,
    progress: Callable[[float, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> UnlearningResult:
    """Run one method and return its result (update, history, diagnostics).

    ``method_config`` is the method's own config (``METHOD_CONFIGS[method]``; default
    values when None); ``mansu_config`` is kept as MANSU's name for it. Every method except
    MANSU runs through the shared loop with the same ``optim`` and ``stop`` defaults, so
    runs stop by the same rule.
    """
    from workbench.quant import QuantConfig

    if method not in METHODS:
        raise WorkbenchError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "mansu" and mansu_config is not None:
        method_config = mansu_config
    expected = METHOD_CONFIGS.get(method)
    if method_config is not None and (expected is None or not isinstance(method_config, expected)):
        want = expected.__name__ if expected else "no method config"
        raise WorkbenchError(f"method {method!r} takes {want}, got {type(method_config).__name__}")
    quant = quant or QuantConfig("nf4")
    batches = Batches.build(model, split)
    if method == "mansu":
        return mansu(model, batches, circuit=circuit, quant=quant, config=method_config or MansuConfig(),
                     progress=progress, should_stop=should_stop)
    optim = optim or OptimConfig(lr=default_lr(model))
    stop = stop or StopRule()
    baseline = baseline or BaselineConfig()
    common = {"optim": optim, "stop": stop, "progress": progress, "should_stop": should_stop}
    if method == "rmu":
        return rmu(model, batches, config=method_config or RmuConfig(), **common)
    if method == "sure":
        return sure(model, batches, config=method_config or SureConfig(), baseline=baseline, **common)
    if method == "quail":
        return quail(model, batches, quant=quant, config=method_config or QuailConfig(alpha=baseline.alpha), **common)
    if method == "lora":
        return lora(model, batches, config=method_config or LoraConfig(), baseline=baseline, **common)
    return run_gradient_method(model, batches, objective_for(method, baseline), method=method, **common)


__all__ = [
    "METHODS", "GRADIENT_METHODS", "SPECIAL_METHODS", "BASELINES", "METHOD_CONFIGS", "RmuConfig", "SureConfig",
    "QuailConfig", "LoraConfig", "unlearn", "UnlearningResult", "MansuConfig", "OptimConfig",
    "StopRule", "BaselineConfig", "Batches", "default_lr",
]
