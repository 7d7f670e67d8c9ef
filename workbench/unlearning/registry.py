"""Every unlearning method, registered once: name → run function + config type.

The faces (app, CLI, notebooks) read their method lists, labels and settings from
:data:`REGISTRY`; :func:`unlearn` is the one entry point they call. Every method runs as
``spec.run(task, config)`` on one :class:`~workbench.unlearning.task.UnlearningTask`, and
every method except MANSU stops by the shared rule of the loop (same ``optim`` and ``stop``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from workbench.core.components import Component
from workbench.core.errors import WorkbenchError
from workbench.core.progress import Progress
from workbench.data.facts import FactSplit
from workbench.models.loaded import LoadedModel
from workbench.quant import QuantConfig
from workbench.unlearning.batches import Batches
from workbench.unlearning.loop import run_gradient_method
from workbench.unlearning.mansu import MansuConfig, mansu
from workbench.unlearning.methods import GRADIENT_OBJECTIVES
from workbench.unlearning.methods.lora import LoraConfig, lora
from workbench.unlearning.methods.quail import QuailConfig, quail
from workbench.unlearning.methods.rmu import RmuConfig, rmu
from workbench.unlearning.methods.sure import SureConfig, sure
from workbench.unlearning.objectives import BaselineConfig, ForgetRetainObjective
from workbench.unlearning.readings import LoopReadings
from workbench.unlearning.result import UnlearningResult
from workbench.unlearning.task import OptimConfig, RecordSink, StopRule, UnlearningTask

MethodConfig = MansuConfig | RmuConfig | SureConfig | QuailConfig | LoraConfig
"""A method's own settings (the gradient-ascent family has none beyond :class:`BaselineConfig`)."""


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    Attributes:
        name: the name the faces and ``metrics.json`` use (``"mansu"``, ``"graddiff"``, ...).
        label: display name.
        summary: one line on what it does.
        run: ``run(task, config)`` (``config`` ``None`` means the method's defaults).
        config_type: the method's own config dataclass, or ``None``.
        uses_optimizer: trained by the shared loop (learning rate, step budget, stopping rule).
    """

    name: str
    label: str
    summary: str
    # Each method takes its own config type; unlearn() checks it against config_type first.
    run: Callable[[UnlearningTask, Any], UnlearningResult]
    config_type: type[MethodConfig] | None = None
    uses_optimizer: bool = True


def _gradient_spec(objective: type[ForgetRetainObjective]) -> MethodSpec:
    def run(task: UnlearningTask, _config: MethodConfig | None) -> UnlearningResult:
        return run_gradient_method(task, objective(task.baseline), method=objective.name)

    return MethodSpec(objective.name, objective.label, objective.summary, run)


REGISTRY: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("mansu", "MANSU", "circuit-restricted, null-space-projected, Fisher-bounded sparse edit moved past a "
               "bin boundary", mansu, MansuConfig, uses_optimizer=False),
    *(_gradient_spec(objective) for objective in GRADIENT_OBJECTIVES.values()),
    MethodSpec("rmu", "RMU", "steer the middle block's residual on forget prompts to c·u, keep retain activations",
               rmu, RmuConfig),
    MethodSpec("sure", "SURE", "GA+GDR on the top 10% output rows by forget-gradient norm, larger lr",
               sure, SureConfig),
    MethodSpec("quail", "QUAIL", "GA+GDR + logit hinge at half a local quantization step",
               quail, QuailConfig),
    MethodSpec("lora", "LoRA", "peft adapters on every quantized weight, GA+GDR, merged before quantizing",
               lora, LoraConfig),
)}

METHODS: tuple[str, ...] = tuple(REGISTRY)
"""Every method name, MANSU first."""
BASELINES: tuple[str, ...] = METHODS[1:]
"""Every method but MANSU."""

# Learning rates that reach the default forget target in tens of steps on the built-ins.
DEFAULT_LR = {"facts": 1e-3, "facts-tiny": 3e-3, "smollm2": 3e-6}


def default_lr(model: LoadedModel) -> float:
    return DEFAULT_LR.get(model.name, 1e-5)


def method_spec(name: str) -> MethodSpec:
    """The registered method ``name``; a clear error for an unknown one."""
    if name not in REGISTRY:
        raise WorkbenchError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return REGISTRY[name]


def check_method_config(spec: MethodSpec, config: MethodConfig | None) -> None:
    """Refuse a config of another method's type."""
    if config is not None and (spec.config_type is None or not isinstance(config, spec.config_type)):
        want = spec.config_type.__name__ if spec.config_type else "no method config"
        raise WorkbenchError(f"method {spec.name!r} takes {want}, got {type(config).__name__}")


def unlearn(
    model: LoadedModel,
    split: FactSplit,
    *,
    method: str = "mansu",
    quant: QuantConfig | None = None,
    circuit: Iterable[Component] | None = None,
    method_config: MethodConfig | None = None,
    optim: OptimConfig | None = None,
    stop: StopRule | None = None,
    baseline: BaselineConfig | None = None,
    readings: LoopReadings | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_record: RecordSink | None = None,
) -> UnlearningResult:
    """Run one method and return its result (update, history, diagnostics).

    ``method_config`` is the method's own config (``REGISTRY[method].config_type``; its
    defaults when None). The gradient methods share ``optim`` (default: Adam at the model's
    :func:`default_lr`), ``stop`` and ``baseline``, so runs stop by the same rule; ``readings``:
    what their loop measures for progress and history besides (default :class:`LoopReadings`);
    ``on_record``: each history record as it is made (:data:`~workbench.unlearning.task.RecordSink`).
    """
    spec = method_spec(method)
    check_method_config(spec, method_config)
    task = UnlearningTask(
        model=model, batches=Batches.build(model, split), quant=quant or QuantConfig("nf4"),
        circuit=tuple(circuit) if circuit is not None else None,
        optim=optim or OptimConfig(lr=default_lr(model)), stop=stop or StopRule(),
        baseline=baseline or BaselineConfig(), readings=readings or LoopReadings(), progress=progress,
        should_stop=should_stop, on_record=on_record,
    )
    return spec.run(task, method_config)
