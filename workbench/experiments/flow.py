"""The whole flow as plain functions the three faces share: attribute → circuit → unlearn → measure → save.

Each function takes and returns plain objects; a face adds only widgets around them, so a
number on screen is the number the CLI prints for the same inputs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from workbench.core.device import DTYPES
from workbench.core.errors import WorkbenchError
from workbench.core.memo import base_memo, drop_once, hold_once, once_asked, take_once
from workbench.core.progress import Progress, scaled, silent
from workbench.data.facts import FactSplit
from workbench.experiments.provenance import provenance
from workbench.experiments.store import Run, save_run
from workbench.interpretability.attribution import (
    ABLATION_BATCH_SIZE,
    Attribution,
    AttributionConfig,
    CleanRuns,
    PromptPairs,
    attribute,
    clean_runs,
    dataset_means,
    pairs_for,
)
from workbench.interpretability.circuit import Circuit
from workbench.interpretability.faithfulness import FaithfulnessMeter
from workbench.measurement.metrics import Thresholds, measure_update
from workbench.measurement.results import RunMetrics
from workbench.models.builtin_splits import builtin_split
from workbench.models.builtins import ORACLES
from workbench.models.loaded import LoadedModel
from workbench.models.loading import load_model
from workbench.quant import QuantConfig
from workbench.unlearning.objectives import BaselineConfig
from workbench.unlearning.readings import LoopReadings
from workbench.unlearning.registry import MethodConfig, unlearn
from workbench.unlearning.result import UnlearningResult
from workbench.unlearning.task import OptimConfig, RecordSink, StopRule

DEFAULT_TOP_K = 10


def forget_set_pairs(model: LoadedModel, split: FactSplit, config: AttributionConfig | None = None) -> PromptPairs:
    """The forget set's clean/baseline pairs as :func:`attribute_forget_set` attributes them
    (``config``'s metric, baseline and seed), for a face that measures more on the same pairs.

    Memoised per weights, tokenizer, facts, metric, baseline and seed (the pairs read the model's
    own answers, a forward): the same object each time, shared, never written."""

    if not split.forget:
        raise WorkbenchError("the forget set is empty: nothing to attribute")
    config = config or AttributionConfig()
    key = ("forget-set-pairs", model.fingerprint, model.name, tuple(split.forget), config.metric,
           config.baseline, config.seed)
    return base_memo(key, lambda: pairs_for(model, list(split.forget), config))


def prepare_forget_set(model: LoadedModel, split: FactSplit, config: AttributionConfig | None = None) -> PromptPairs:
    """Take ahead of the first click what an attribution of the forget set and its faithfulness
    readout read first: the pairs (:func:`forget_set_pairs`), when a pair is on the mean
    baseline their dataset means at the attribution's batch size and at the readout's
    (:data:`ABLATION_BATCH_SIZE`), all memoised; the sweep's clean runs with ``config``, held
    for the next :func:`attribute_forget_set` with that config, which takes them; and the
    faithfulness readout's meter on the pairs, held for :func:`take_readout_meter`. What is held
    is let go when taken, by :func:`release_prepared` (a run's start), or not held at all when
    either was asked for while this worked."""

    # a click or a run that comes while this works makes its own: from then on nothing is held
    since = {kind: once_asked(kind) for kind in (CLEAN_RUNS, READOUT_METER)}
    config = config or AttributionConfig()
    pairs = forget_set_pairs(model, split, config)
    if pairs.has_mean:
        dataset_means(model, pairs, batch_size=config.means_batch)
        dataset_means(model, pairs, batch_size=ABLATION_BATCH_SIZE)
    if config.method != "exact":  # exact patching has no clean runs to take ahead
        # held once, not memoised: ~66 MiB on SmolLM2, used by the first click and then let go
        hold_once(CLEAN_RUNS, CleanRuns.key_of(model, pairs, config), lambda: clean_runs(model, pairs, config),
                  since=since[CLEAN_RUNS])
    hold_once(READOUT_METER, _readout_key(model, pairs), lambda: _readout_meter(model, pairs),
              since=since[READOUT_METER])
    return pairs


CLEAN_RUNS = "forget-set-clean-runs"
READOUT_METER = "forget-set-readout-meter"


def _readout_key(model: LoadedModel, pairs: PromptPairs) -> tuple[object, ...]:
    return (model.fingerprint, pairs.ids_hash, pairs.metric, "corrupt")  # the readout's ablation


def _readout_meter(model: LoadedModel, pairs: PromptPairs) -> FaithfulnessMeter | None:
    try:  # the readout's baselines, floor and corrupt runs (a meter measures them when made)
        return FaithfulnessMeter(model, pairs)
    except WorkbenchError:  # faithfulness undefined on these pairs: the readout itself says so
        return None


def take_readout_meter(model: LoadedModel, pairs: PromptPairs) -> FaithfulnessMeter | None:
    """The faithfulness readout's meter of ``pairs`` (corrupt ablation, the pairs' metric) when
    :func:`prepare_forget_set` made it ahead, once; else ``None``."""
    meter = take_once(READOUT_METER, _readout_key(model, pairs), FaithfulnessMeter)
    return meter if meter is not None and meter.measures(model, pairs, "corrupt", None) else None


def release_prepared() -> None:
    """Let go of what :func:`prepare_forget_set` holds for a first click that did not come."""
    drop_once(CLEAN_RUNS)
    drop_once(READOUT_METER)


def attribute_forget_set(
    model: LoadedModel, split: FactSplit, config: AttributionConfig | None = None, *, progress: Progress | None = None,
    pairs: PromptPairs | None = None,
) -> Attribution:
    """Attribution of the forget-set behaviour (clean = forget prompts, corrupt = other subjects);
    ``pairs``: the forget set's pairs already made (:func:`forget_set_pairs`), else made here.
    Pairs on the mean baseline read the memoised :func:`dataset_means`, as the faithfulness
    readout on the same pairs does."""

    config = config or AttributionConfig()
    pairs = forget_set_pairs(model, split, config) if pairs is None else pairs.with_metric(config.metric)
    means = dataset_means(model, pairs, batch_size=config.means_batch) if pairs.has_mean else None
    ahead = take_once(CLEAN_RUNS, CleanRuns.key_of(model, pairs, config), CleanRuns)
    return attribute(model, pairs, config, progress=progress, means=means, taken_ahead=ahead)


def default_circuit(attribution: Attribution, top_k: int = DEFAULT_TOP_K) -> Circuit:
    """The circuit the faces start from: the top-k components by |score| (embeddings excluded,
    since MANSU never moves them)."""

    return Circuit.from_attribution(attribution).select_top_k(top_k, include_embed=False)


def run_unlearning(
    model: LoadedModel,
    split: FactSplit,
    *,
    method: str = "mansu",
    quant: QuantConfig | None = None,
    circuit: Circuit | None = None,
    method_config: MethodConfig | None = None,
    optim: OptimConfig | None = None,
    stop: StopRule | None = None,
    baseline: BaselineConfig | None = None,
    readings: LoopReadings | None = None,
    thresholds: Thresholds | None = None,
    oracle: LoadedModel | None = None,
    measure_cad: bool = True,
    save: bool = True,
    runs_root: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_record: RecordSink | None = None,
    job_key: str | None = None,
) -> tuple[UnlearningResult, RunMetrics, Run | None]:
    """Unlearn, measure everything, and (by default) save the run atomically.

    ``method_config`` is the method's own config (e.g. :class:`MansuConfig`); ``optim``,
    ``stop`` and ``baseline`` are the gradient methods' shared settings, ``readings`` what their
    loop measures for its progress besides (:class:`LoopReadings`; not part of a job's key: it
    changes no result). MANSU needs a
    circuit; when none is given, the forget set is attributed and the default top-k circuit
    is used. Baselines record the circuit too (for CAD's circuit share). Returns the
    method's result, the run's metrics (without ``run_id``) and the saved run (``None``
    with ``save=False``; its ``metrics`` carry the ``run_id``). ``job_key`` (a table's or
    sweep's :attr:`~workbench.experiments.jobs.Job.key`) goes into ``config.json``, which is
    how a resumed sweep recognises the run as its finished job.
    """

    report = progress or silent
    quant = quant or QuantConfig("nf4")
    start = time.perf_counter()
    circuit = _circuit_for(model, split, circuit, method, report)
    release_prepared()  # held for an attribution that did not come: not carried into the run's peak
    components = sorted(circuit.selected) if circuit is not None else None
    result = unlearn(model, split, method=method, quant=quant, circuit=components, method_config=method_config,
                     optim=optim, stop=stop, baseline=baseline, readings=readings, progress=scaled(report, 0.0, 0.6),
                     should_stop=should_stop, on_record=on_record)
    if result.stopped == "cancelled":
        raise WorkbenchError("the run was cancelled; nothing was saved")
    measured = measure_update(model, split, result.update, quant=quant, circuit=components, oracle=oracle,
                              thresholds=thresholds or Thresholds(), cad=measure_cad,
                              progress=scaled(report, 0.6, 0.98))
    metrics = RunMetrics.of_update(
        measured, method=result.method, model=model.name, model_fingerprint=model.fingerprint, split=split.name,
        n_forget=len(split.forget), n_retain=len(split.retain), steps=result.steps, stopped=result.stopped,
        seconds=time.perf_counter() - start, unlearning_seconds=result.seconds, diagnostics=result.diagnostics,
        circuit=tuple(c.name for c in components) if components else None,
    )
    run = None
    if save:
        config = _run_config(model, split, method=method, quant=quant, method_config=method_config, optim=optim,
                             stop=stop, baseline=baseline, thresholds=thresholds or Thresholds())
        if job_key is not None:
            config["job_key"] = job_key
        circuit_json = json.dumps(circuit.to_dict()) if circuit is not None else None
        run = save_run(config=config, metrics=metrics, update=result.update, history=result.history,
                       circuit_json=circuit_json, root=runs_root)
    report(1.0, "done")
    return result, metrics, run


def _circuit_for(model: LoadedModel, split: FactSplit, circuit: Circuit | None, method: str,
                 report: Progress) -> Circuit | None:
    """The circuit the run uses: the given one (checked against the model), or for MANSU the default one."""
    if circuit is None and method == "mansu":
        report(0.0, "no circuit given: attributing the forget set")
        circuit = default_circuit(attribute_forget_set(model, split))
    if circuit is not None and circuit.model_fingerprint != model.fingerprint:
        raise WorkbenchError(
            f"the circuit was computed on another model (fingerprint {circuit.model_fingerprint}, "
            f"this model {model.fingerprint})"
        )
    return circuit


def _run_config(model: LoadedModel, split: FactSplit, *, method: str, quant: QuantConfig,
                method_config: MethodConfig | None, optim: OptimConfig | None, stop: StopRule | None,
                baseline: BaselineConfig | None, thresholds: Thresholds) -> dict[str, Any]:
    """``config.json``: what was asked, as plain JSON."""
    return {
        "method": method, "model": model.name, "model_fingerprint": model.fingerprint, "split": split.name,
        "quant": quant.to_dict(),
        "mansu": asdict(method_config) if method_config is not None and method == "mansu" else None,
        "optim": asdict(optim) if optim is not None else None,
        "stop": asdict(stop) if stop is not None else None,
        "baseline": asdict(baseline) if baseline is not None else None,
        "method_config": asdict(method_config) if method_config is not None else None,
        "thresholds": asdict(thresholds),
        "provenance": provenance(model).to_dict(),
    }


def oracle_for(model: LoadedModel, split: FactSplit | None = None) -> LoadedModel | None:
    """The retrain oracle of a built-in facts model (built on first use), else None.

    With ``split``, only when the oracle is one for it (:func:`oracle_fits`): an oracle retrained
    without the default forget domain still knows every other domain, so on another forget set
    it would set the forgetting threshold at half the base and calibrate CAD on noise."""

    name = ORACLES.get(model.name)
    if not name or (split is not None and not oracle_fits(model, split)):
        return None
    return load_model(name)


def oracle_fits(model: LoadedModel, split: FactSplit) -> bool:
    """Did the built-in's retrain oracle never see any of ``split``'s forget facts? Its training
    set is the world without the default split's forget facts (and their paraphrases)."""
    left_out = builtin_split(model)
    unseen = {(f.prompt, f.answer) for f in (*left_out.forget, *left_out.forget_paraphrase)}
    return all((f.prompt, f.answer) in unseen for f in split.forget)


def no_oracle_reason(model: LoadedModel, split: FactSplit) -> str | None:
    """Why a built-in that has a retrain oracle gets none for ``split`` (``None``: it gets one,
    or has none at all); every face shows it, so a card without the oracle's columns is explained."""
    name = ORACLES.get(model.name)
    if not name or oracle_fits(model, split):
        return None
    return (f"no retrain oracle: {name} was retrained without {model.name}'s default forget set only, and "
            f"{split.name} forgets other facts (thresholds without an oracle apply)")


def run_base_model(run: Run, model: LoadedModel | None = None) -> LoadedModel:
    """The base model a saved run was made on: ``model`` if given, else loaded by the run's model
    name in the storage dtype its provenance records (the same name in another dtype is another
    model); either way it must have the run's fingerprint."""
    m = run.metrics
    made_in = (run.config.get("provenance") or {}).get("dtype")
    model = model or load_model(m.model, dtype=made_in if made_in in DTYPES else None)
    if m.model_fingerprint and model.fingerprint != m.model_fingerprint:
        raise WorkbenchError(
            f"run {run.id} was made on a model with fingerprint {m.model_fingerprint}, "
            f"but {model.name!r} now has {model.fingerprint}"
        )
    return model


def model_and_split_for_run(run: Run, *, model: LoadedModel | None = None,
                            split: FactSplit | None = None) -> tuple[LoadedModel, FactSplit]:
    """The base model and the split a saved run was measured on (for probes and re-evaluation).

    The model is loaded by the name in ``metrics.json`` and must have the run's fingerprint.
    A built-in split is rebuilt from its name (``<domain>-seed<s>-<size>`` for the facts
    models, ``smollm2:<domain>``); a run on user fact files needs ``split`` passed in.
    """

    m = run.metrics
    model = run_base_model(run, model)
    if split is not None:
        return model, split
    name = m.split
    domain = name.split(":", 1)[1] if ":" in name else name.rsplit("-seed", 1)[0]
    try:
        candidate = builtin_split(model) if not domain else builtin_split(model, forget_domain=domain)
    except WorkbenchError:
        candidate = None
    if candidate is None or candidate.name != name:
        raise WorkbenchError(
            f"run {run.id} used the split {name!r}, which is not a built-in split of {model.name!r}; "
            "pass the forget and retain fact files it was made with"
        )
    return model, candidate
