"""``workbench sweep CONFIG``: the sweep file (TOML), checked whole before any work, and its jobs.

A sweep is models × forget domains × quantizers × methods (× seeds for the gradient
methods), every run under one stopping rule, as in the paper table::

    models = ["facts-tiny"]            # built-in names or local HF directories
    methods = ["mansu", "graddiff"]    # registered method names (default: all)
    forget_domains = ["pathogens"]     # built-in split domains (default: each model's own)
    quantizers = ["nf4"]               # nf4, fp4, int8 (default nf4)
    ablations = ["floor"]              # extra MANSU runs, each with one component off
    seeds = [0]                        # gradient methods' batch seeds (MANSU is deterministic)
    blocksize = 64
    double_quant = false
    cad = false                        # measure CAD (slow)
    oracle = false                     # compare with the retrain oracle where one exists

    [stop]     # the gradient methods' rule (StopRule); forget_target is MANSU's target too
    max_steps = 20
    [optim]    # OptimConfig (lr defaults per model)
    [readings] # the gradient loop's progress readings (LoopReadings: every = 10; 0 = none)
    [mansu]    # MansuConfig fields, plus variant = "v1" | "snap" | ...
    [rmu]      # each method's own config table (RmuConfig, SureConfig, QuailConfig, LoraConfig)

Unknown keys, methods, models, quantizers, ablations and wrongly typed values are refused
with the key's name before anything runs (:func:`load_sweep_config`); domains are checked
when each model's split is built, still before the first job (:func:`plan_sweep`).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.core.errors import WorkbenchError
from workbench.experiments.flow import oracle_for
from workbench.experiments.jobs import DEFAULT_CIRCUIT, Job, job_for
from workbench.experiments.sweep import JobGroup
from workbench.models.builtin_splits import builtin_split
from workbench.models.builtins import BUILTINS
from workbench.models.loading import load_model
from workbench.quant import QUANT_TYPES, QuantConfig, QuantType
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.mansu.config import MANSU_VARIANTS
from workbench.unlearning.readings import LoopReadings
from workbench.unlearning.registry import METHODS, REGISTRY, MethodConfig, default_lr
from workbench.unlearning.task import OptimConfig, StopRule

ABLATIONS = ("circuit", "projection", "fisher", "floor")
"""MANSU's four components (docs/SCIENCE.md §3), each switched off alone by an ablation."""
TOP_LEVEL: dict[str, type] = {
    "models": list, "methods": list, "forget_domains": list, "quantizers": list, "ablations": list, "seeds": list,
    "blocksize": int, "double_quant": bool, "cad": bool, "oracle": bool,
}
TABLES = ("stop", "optim", "readings", *(m for m in METHODS if REGISTRY[m].config_type is not None))


@dataclass(frozen=True)
class SweepConfig:
    """A sweep file, checked. ``optim`` is the gradient methods' optimiser with ``lr`` applied per
    model (``lr`` None: each model's default); ``method_configs`` the methods' own tables."""

    models: tuple[str, ...]
    methods: tuple[str, ...] = METHODS
    forget_domains: tuple[str | None, ...] = (None,)
    quantizers: tuple[QuantType, ...] = ("nf4",)
    ablations: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    blocksize: int = 64
    double_quant: bool = False
    cad: bool = False
    oracle: bool = False
    stop: StopRule = field(default_factory=StopRule)
    optim: OptimConfig = field(default_factory=OptimConfig)
    readings: LoopReadings = field(default_factory=LoopReadings)
    lr: float | None = None
    mansu: MansuConfig = field(default_factory=MansuConfig)
    method_configs: dict[str, MethodConfig] = field(default_factory=dict)


@dataclass
class SweepPlan:
    """The sweep's jobs (in table order) and the loaded models and splits they run on."""

    jobs: list[Job]
    groups: list[JobGroup]


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read and check a sweep file (every error names the file and the key)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise WorkbenchError(f"no sweep file {path}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"{path}: not valid TOML ({exc})") from exc
    return sweep_config(data, source=str(path))


def sweep_config(data: dict[str, Any], *, source: str = "sweep") -> SweepConfig:
    """:class:`SweepConfig` from parsed TOML."""
    unknown = [k for k in data if k not in TOP_LEVEL and k not in TABLES]
    if unknown:
        raise WorkbenchError(f"{source}: unknown key(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join([*TOP_LEVEL, *(f'[{t}]' for t in TABLES)])}")
    for key, kind in TOP_LEVEL.items():
        if key in data and (not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool))):
            raise WorkbenchError(f"{source}: {key} must be {_type_name(kind)}, got {data[key]!r}")
    if "models" not in data or not data["models"]:
        raise WorkbenchError(f"{source}: models = [...] is required (e.g. models = [\"facts-tiny\"])")
    stop = _dataclass_from(StopRule, _table(data, "stop", source), f"{source} [stop]")
    optim_table = _table(data, "optim", source)
    optim = _dataclass_from(OptimConfig, optim_table, f"{source} [optim]")
    config = SweepConfig(
        models=_names(data, "models", source, _check_model),
        methods=_names(data, "methods", source, _choice(METHODS, "method")) if "methods" in data else METHODS,
        forget_domains=tuple(_names(data, "forget_domains", source, None)) if data.get("forget_domains") else (None,),
        quantizers=tuple(_QUANT_TYPES[q] for q in _names(data, "quantizers", source,
                                                          _choice(QUANT_TYPES, "quantizer"))) or ("nf4",),
        ablations=_names(data, "ablations", source, _choice(ABLATIONS, "ablation")),
        seeds=_seeds(data, source),
        blocksize=data.get("blocksize", 64), double_quant=data.get("double_quant", False),
        cad=data.get("cad", False), oracle=data.get("oracle", False), stop=stop, optim=optim,
        readings=_dataclass_from(LoopReadings, _table(data, "readings", source), f"{source} [readings]"),
        lr=optim_table.get("lr"),
        mansu=_mansu(_table(data, "mansu", source), stop, f"{source} [mansu]"),
        method_configs={m: _method_config(m, _table(data, m, source), f"{source} [{m}]")
                        for m in TABLES if m not in ("stop", "optim", "readings", "mansu") and m in data},
    )
    for qtype in config.quantizers:  # a block size the quantizer does not support fails now
        _quant(config, qtype, source)
    return config


def _quant(config: SweepConfig, qtype: QuantType, source: str = "sweep") -> QuantConfig:
    try:
        return QuantConfig(qtype, blocksize=config.blocksize, double_quant=config.double_quant)
    except (WorkbenchError, ValueError, TypeError) as exc:
        raise WorkbenchError(f"{source}: {exc}") from exc


_TYPE_NAMES: dict[type, str] = {list: "a list", int: "an integer", bool: "true or false"}
_QUANT_TYPES: dict[str, QuantType] = {t: t for t in QUANT_TYPES}
"""Quantizer names as the typed literal (after the file's names were checked against it)."""


def _type_name(kind: type) -> str:
    return _TYPE_NAMES.get(kind, kind.__name__)


def _table(data: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise WorkbenchError(f"{source}: {key} must be a table ([{key}]), got {value!r}")
    return dict(value)


NameCheck = Callable[[str, str], None]
"""``check(name, where)``: raises :class:`WorkbenchError` for a name that is not allowed."""


def _names(data: dict[str, Any], key: str, source: str, check: NameCheck | None) -> tuple[str, ...]:
    values = data.get(key, [])
    if any(not isinstance(v, str) or not v.strip() for v in values):
        raise WorkbenchError(f"{source}: {key} must be a list of names, got {values!r}")
    if check is not None:
        for v in values:
            check(v, f"{source}: {key}")
    return tuple(dict.fromkeys(values))


def _choice(allowed: tuple[str, ...], what: str) -> NameCheck:
    def check(value: str, where: str) -> None:
        if value not in allowed:
            raise WorkbenchError(f"{where}: unknown {what} {value!r}; choose from {', '.join(allowed)}")
    return check


def _check_model(name: str, where: str) -> None:
    if name not in BUILTINS and not Path(name).expanduser().is_dir():
        raise WorkbenchError(f"{where}: unknown model {name!r}: not a built-in ({', '.join(BUILTINS)}) "
                             "and not a local model directory")


def _seeds(data: dict[str, Any], source: str) -> tuple[int, ...]:
    seeds = data.get("seeds", [0])
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise WorkbenchError(f"{source}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    return tuple(dict.fromkeys(seeds))


def _mansu(values: dict[str, Any], stop: StopRule, where: str) -> MansuConfig:
    """MANSU's config: a variant (default v1) with the table's fields; the shared forget target."""
    variant = values.pop("variant", "v1")
    if variant not in MANSU_VARIANTS:
        raise WorkbenchError(f"{where}: unknown variant {variant!r}; choose from {', '.join(MANSU_VARIANTS)}")
    if stop.forget_target is not None:
        values.setdefault("forget_target", stop.forget_target)
    return _dataclass_from(MansuConfig, values, where, base=MANSU_VARIANTS[variant])


def _method_config(method: str, values: dict[str, Any], where: str) -> MethodConfig:
    config_type = REGISTRY[method].config_type
    assert config_type is not None  # TABLES lists only methods with a config type
    return _dataclass_from(config_type, values, where)


def _dataclass_from(cls: type[Any], values: dict[str, Any], where: str, base: Any = None) -> Any:
    """``cls(**values)`` (or ``base`` with them replaced), every key and type checked first."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key, value in values.items():
        if key not in names:
            raise WorkbenchError(f"{where}: unknown key {key!r}; allowed: {', '.join(names)}")
        if not _matches(value, hints[key]):
            raise WorkbenchError(f"{where}: {key} = {value!r} has the wrong type (want {_hint_text(hints[key])})")
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except (TypeError, ValueError) as exc:
        raise WorkbenchError(f"{where}: {exc}") from exc


def _matches(value: object, hint: Any) -> bool:
    """Whether a TOML value fits a dataclass field's type (int is accepted for float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    return False  # a field TOML cannot spell: refused rather than passed through unchecked


def _hint_text(hint: Any) -> str:
    return str(hint).replace("typing.", "")


# --- planning ---------------------------------------------------------------------------------------


def plan_sweep(config: SweepConfig) -> SweepPlan:
    """Load each model and build each split (an unknown domain fails here, before any job), then
    list the jobs: per model, domain and quantizer, every method (gradient methods once per
    seed), then the MANSU ablations."""
    jobs: list[Job] = []
    groups: list[JobGroup] = []
    for name in config.models:
        model = load_model(name)
        optim = dataclasses.replace(config.optim, lr=config.lr if config.lr is not None else default_lr(model))
        for domain in config.forget_domains:
            split = builtin_split(model, forget_domain=domain)
            group = JobGroup(model, split, oracle=oracle_for(model, split) if config.oracle else None)
            groups.append(group)
            for qtype in config.quantizers:
                quant = _quant(config, qtype)
                jobs += _group_jobs(config, group, quant, optim)
    return SweepPlan(jobs=jobs, groups=groups)


def _group_jobs(config: SweepConfig, group: JobGroup, quant: QuantConfig, optim: OptimConfig) -> list[Job]:
    """One model, split and quantizer: the methods, then the ablations (MANSU with one part off)."""
    uses_circuit = DEFAULT_CIRCUIT if "mansu" in config.methods or config.ablations or config.cad else None

    def job(method: str, **kwargs: Any) -> Job:
        return job_for(group.model, group.split, method, quant, measure_cad=config.cad, oracle=group.oracle,
                       circuit=uses_circuit, readings=config.readings, **kwargs)

    jobs = []
    for method in config.methods:
        if method == "mansu":
            jobs.append(job(method, method_config=config.mansu))
            continue
        for seed in config.seeds:
            jobs.append(job(method, method_config=config.method_configs.get(method),
                            optim=dataclasses.replace(optim, seed=seed), stop=config.stop))
    jobs += [job("mansu", method_config=dataclasses.replace(config.mansu, **{f"use_{a}": False}))
             for a in config.ablations]
    return jobs
