"""Everything measured about one unlearning update: the numbers behind ``metrics.json``.

Five models are compared, all built from the base without modifying it:

========================  ===========================================================
``base_fp``               w — the base in full precision
``base_q``                Q(w) — the base quantized
``after_fp``              w + Δ — the unlearned model in full precision
``after_qbase_delta``     Q(w) + Δ — the exact, unrounded update on the quantized base
``after_q``               Q(w + Δ) — the unlearned model quantized (what gets deployed)
========================  ===========================================================

In a 16-bit storage dtype ``w + Δ`` is the after-model as saved: summed in float32 and rounded
to the storage dtype once (``models.update.stored_sum``); the rounding's own effect,
``storage = forget(w+Δ as stored) − forget(w+Δ exact)`` (both run in float32), is reported as
the decomposition's third term (exactly 0 for a float32 model).

The PTQ gap ``forget(after_q) − forget(after_fp)`` is decomposed (docs/SCIENCE.md §6.2) into
``base_shift = forget(Q(w)+Δ) − forget(w+Δ)`` — the base's own quantization noise — and
``rounding = forget(Q(w+Δ)) − forget(Q(w)+Δ)`` — the update being rounded away. Only the
second is "quantization undoing the update".

Parameters the quantizer does not touch (embeddings, norms, biases) keep their exact
update in every quantized model, as they would in a bitsandbytes 4-bit deployment.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from workbench.core.allocator import hand_back_freed_memory
from workbench.core.components import Component
from workbench.core.computed_weight import install
from workbench.core.errors import WorkbenchError
from workbench.core.memo import base_memo
from workbench.core.progress import Progress, silent
from workbench.core.sharing import sharing_copy, widened_copy
from workbench.data.facts import AnswerCriterion, Fact, FactSplit, answer_criterion, chance_level
from workbench.interpretability.attribution import Attribution, AttributionConfig, attribute
from workbench.interpretability.cad import CADResult, circuit_attribution_divergence
from workbench.measurement.evaluation import (
    FactScores,
    FirstTokenReads,
    evaluate_facts,
    multiple_choice_accuracy,
    retain_reads_and_kl,
)
from workbench.measurement.results import (
    BinWidthRatios,
    CadCalibration,
    CadScores,
    ForgetRetain,
    MultipleChoiceScores,
    OracleAccuracies,
    ParaphraseAccuracies,
    Property,
    PtqGapDecomposition,
    QuantizationAnalysis,
    ReportCard,
    RunMetrics,
    UpdateMetrics,
    VariantAccuracies,
    VariantLogprobs,
)
from workbench.models.loaded import LoadedModel
from workbench.models.update import SparseDelta, SumAtForward, Update
from workbench.quant import (
    QuantConfig,
    compare_quantization,
    quantize_dequantize,
    single_use_linear_owners,
)
from workbench.quant.compact import compact_quantized_copy
from workbench.unlearning.result import ALREADY_AT_TARGET

DEFAULT_CAD_MIN = 0.1
"""τ where no retrain oracle calibrates it (docs/SCIENCE.md §7.3)."""


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail thresholds of the four-property report card.

    Attributes:
        forget_max: forgetting passes when forget top-1 is at most this in full precision
            *and* quantized. ``None``: the retrain oracle's forget top-1 + 0.1 when an
            oracle exists, else 0.2 — but never above half the base's forget top-1.
        retain_tolerance: retain top-1 may drop at most this much (full precision and
            quantized, each against the base in the same precision).
        ptq_max_gap: the PTQ gap (quantized − full-precision forget top-1) must be at most this.
        cad_min: structural erasure passes when CAD (full precision and quantized) is at least
            this. ``None``: calibrated on the retrain oracle when there is one (half-way from
            the retain-set noise floor to CAD(base, oracle), docs/SCIENCE.md §7.4), else
            ``DEFAULT_CAD_MIN``.
    """

    forget_max: float | None = None
    retain_tolerance: float = 0.05
    ptq_max_gap: float = 0.0
    cad_min: float | None = None

    def __post_init__(self) -> None:
        if self.forget_max is not None and not 0 <= self.forget_max <= 1:
            raise WorkbenchError(f"forget_max must be in [0, 1], got {self.forget_max}")
        if not 0 <= self.retain_tolerance <= 1:
            raise WorkbenchError(f"retain_tolerance must be in [0, 1], got {self.retain_tolerance}")
        if self.cad_min is not None and not 0 <= self.cad_min <= 1:
            raise WorkbenchError(f"cad_min must be in [0, 1], got {self.cad_min}")

    def structural_threshold(self, cad: CadScores) -> float:
        """τ for this run: the one given, else the oracle's calibration, else ``DEFAULT_CAD_MIN``."""
        if self.cad_min is not None:
            return self.cad_min
        calibrated = cad.calibration.threshold if cad.calibration is not None else None
        return calibrated if calibrated is not None else DEFAULT_CAD_MIN


VARIANTS = ("base_fp", "base_q", "after_fp", "after_qbase_delta", "after_q")
"""The five models of the module docstring, in the order they are measured."""


QUANTIZED_VARIANTS = ("base_q", "after_qbase_delta", "after_q")
"""The variants that hold Q(w) wherever the update does not write."""


def quantized_base(model: LoadedModel, quant: QuantConfig,
                   only: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Q(w) of every weight the quantizer touches (the only tensors the quantized variants
    share), or of those in ``only``."""
    base = model.state()
    tr = model.adapter.transposed
    return {n: quantize_dequantize(base[n], quant, transposed=n in tr) for n in model.adapter.quantizable(quant)
            if only is None or n in only}


def variant_state(model: LoadedModel, update: Update, quant: QuantConfig, vname: str,
                  qbase: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of variant ``vname`` that differ from the base (``qbase`` from :func:`quantized_base`).

    Parameters the quantizer leaves alone keep their exact update (as in a bnb deployment)."""
    if vname not in VARIANTS:
        raise WorkbenchError(f"unknown variant {vname!r}; choose from {', '.join(VARIANTS)}")
    if vname == "base_fp":
        return {}
    if vname == "base_q":
        return qbase
    base = model.state()
    if vname == "after_qbase_delta":
        return {**qbase, **{n: (q := qbase.get(n, base[n])) + d.to(q.device, q.dtype)
                            for n, d in update.deltas.items()}}
    # w+Δ of every updated tensor, only for the variants built on it (on a large update it is
    # the size of the update's tensors, and Q(w)+Δ was holding it beside its own for nothing)
    after = update.after_state(base)
    if vname == "after_fp":
        return after
    tr, quantized = model.adapter.transposed, set(model.adapter.quantizable(quant))
    # (``quantized``, not ``qbase``'s names: the measurement lets go of Q(w) where the update
    # writes once Q(w)+Δ is built, and Q(w+Δ) replaces those tensors)
    return {**qbase, **{n: quantize_dequantize(a, quant, transposed=n in tr) if n in quantized else a
                        for n, a in after.items()}}


def variant_model(model: LoadedModel, update: Update, quant: QuantConfig, vname: str,
                  qbase: dict[str, torch.Tensor]) -> LoadedModel:
    """Variant ``vname`` as a model that shares every unchanged weight with ``model`` (no copy)."""
    if vname == "base_fp":
        return model
    return model.with_state(variant_state(model, update, quant, vname, qbase), _variant_label(model, quant, vname))


def variant_model_as_codes(model: LoadedModel, update: Update, quant: QuantConfig, vname: str) -> LoadedModel:
    """Quantized variant ``vname``, the model :func:`variant_model` gives, holding Q(w) as codes
    wherever the update does not write (:func:`~workbench.quant.compact.compact_quantized_copy`,
    dequantized by each forward, also when the bridge reads a weight): the same logits and
    attributions, without Q(w) as tensors, a second model's worth of them."""
    if vname not in QUANTIZED_VARIANTS:
        raise WorkbenchError(f"not a quantized variant: {vname!r}; choose from {', '.join(QUANTIZED_VARIANTS)}")
    own = variant_state(model, update, quant, vname, quantized_base(model, quant, only=update.deltas))
    copy = compact_quantized_copy(model.hf, quant, materialized=own)
    for name, value in own.items():  # the update's tensors, as variant_model holds them
        p = copy.get_parameter(name)
        p.data = value.detach().to(device=p.device, dtype=p.dtype)
    return model.with_tree(copy, _variant_label(model, quant, vname))


def after_model_summing(model: LoadedModel, update: Update) -> LoadedModel:
    """The after_fp variant, the model :func:`variant_model` gives, holding w+Δ of each weight the
    update keeps sparse and only its own Linear/Conv1D reads as the base's tensor and the delta,
    summed by each forward of its module (:class:`~workbench.models.update.SumAtForward`: the stored
    sum, bit for bit): the same logits and attributions without a copy of those weights."""
    sparse = [n for n in update.deltas if isinstance(update.held(n), SparseDelta)]
    owners = single_use_linear_owners(model.hf, sparse)
    base, copy = model.state(), sharing_copy(model.hf)
    for name in update.deltas:
        if name in owners:
            delta = update.held(name)
            assert isinstance(delta, SparseDelta)
            owner = copy.get_submodule(name.rpartition(".")[0])
            install(owner, SumAtForward(base[name], delta.to(base[name].device)))
        else:
            copy.get_parameter(name).data = update.added_to(name, base[name])
    for p in copy.parameters():
        p.requires_grad_(False)
    return model.with_tree(copy.eval(), f"{model.name}+Δ")  # _variant_label's


def _variant_label(model: LoadedModel, quant: QuantConfig, vname: str) -> str:
    return {"base_q": f"{model.name}|{quant.label}", "after_fp": f"{model.name}+Δ",
            "after_qbase_delta": f"{model.name}|{quant.label}+Δ", "after_q": f"{model.name}+Δ|{quant.label}"}[vname]


def quantized_states(
    model: LoadedModel, update: Update, quant: QuantConfig
) -> dict[str, dict[str, torch.Tensor]]:
    """Replacement states for the quantized variants (only names that differ from the base)."""
    qbase = quantized_base(model, quant)
    return {v: variant_state(model, update, quant, v, qbase) for v in ("base_q", "after_q", "after_qbase_delta")}


def build_variants(model: LoadedModel, update: Update, quant: QuantConfig) -> dict[str, LoadedModel]:
    """The five models of the module docstring, all at once (they share the base's weights and
    Q(w); :func:`measure_update` builds them one at a time instead)."""
    qbase = quantized_base(model, quant)
    return {v: variant_model(model, update, quant, v, qbase) for v in VARIANTS}


def retain_kl(base: LoadedModel, after: LoadedModel, facts: Sequence[Fact]) -> float:
    """Mean KL(p_base ‖ p_after) of the next-token distribution at the retain prompts' answer
    position (:func:`~workbench.measurement.evaluation.retain_reads_and_kl`, which the measurement
    calls to take w+Δ's retain reads from the same forwards)."""
    return retain_reads_and_kl(base, after, facts)[1]


# The base's own numbers (w and Q(w) on each fact set, their attributions for CAD) are the
# same for every update measured on one model: a paper table, an ablation table or an app
# session would otherwise recompute them per run (about a third of a SmolLM2 run's
# measurement). They go through core.memo's base_memo, keyed by the model's weight fingerprint.
BASE_VARIANTS = ("base_fp", "base_q")


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


@dataclass(frozen=True)
class _Accuracies:
    """Top-1 of the five variants on every fact set the split has, multiple choice on forget,
    and greedy exact match and answer log-probability on forget and retain."""

    forget: VariantAccuracies
    retain: VariantAccuracies
    paraphrase: ParaphraseAccuracies
    multiple_choice: MultipleChoiceScores
    multiple_choice_retain: MultipleChoiceScores | None
    exact: ForgetRetain[VariantAccuracies]
    logprob: ForgetRetain[VariantLogprobs]


_SETS = ("forget", "retain", "forget_paraphrase", "retain_paraphrase")


def _fact_sets(split: FactSplit) -> dict[str, Sequence[Fact]]:
    return {name: facts for name in _SETS if (facts := getattr(split, name))}


def _with_multiple_choice(sname: str, facts: Sequence[Fact]) -> bool:
    """Whether the measurement reads multiple choice on this set: on the forget set, and on
    the retain set only when it is judged by it."""
    return sname == "forget" or (sname == "retain" and answer_criterion(facts) == "mc")


VariantSource = Callable[[], LoadedModel]
"""A variant model, made when first called and the same model at every later call
(:class:`_MadeOnce`): a base variant whose numbers are memoised is then never made."""


class _MadeOnce:
    """The measurement's :data:`VariantSource`, which can tell whether its model outlived it."""

    def __init__(self, make: Callable[[], LoadedModel]) -> None:
        self._make: Callable[[], LoadedModel] | None = make
        self._made: LoadedModel | None = None

    def __call__(self) -> LoadedModel:
        if self._made is None:
            assert self._make is not None, "a variant source is not called after it let go of its model"
            self._made, self._make = self._make(), None
        return self._made

    def let_go(self, base: LoadedModel) -> Callable[[], bool]:
        """Drop the model made (not ``base``, which is not let go), and tell whether it outlived its
        last reference: then a reference cycle holds it or its bridge (TransformerLens' bridges over
        some families are cyclic), which only Python's cycle collector frees. A collection takes
        0.5–1 s in a process of many objects: asked for only when one is needed."""
        made, self._made = self._made, None
        if made is None or made is base:
            return lambda: False
        bridge = made.booted_bridge()
        refs = [weakref.ref(made)] + ([weakref.ref(bridge)] if bridge is not None else [])
        del bridge
        del made
        return lambda: any(ref() is not None for ref in refs)


def _variant_scores(vname: str, variant: VariantSource, split: FactSplit, quant: QuantConfig,
                    key_model: LoadedModel, reads: dict[str, FirstTokenReads] | None = None) -> dict[str, FactScores]:
    """Scores of one variant on every fact set of ``split`` (multiple choice on forget only);
    the base variants' through :func:`base_scores` (memoised under ``key_model``, the base).
    ``reads``: per set, its first-token reads already taken (see ``evaluate_facts``)."""
    if vname in BASE_VARIANTS:
        return base_scores(key_model, split, quant, variants=(vname,), built={vname: variant})[vname]
    given = reads or {}
    vmodel = variant()
    return {sname: evaluate_facts(vmodel, facts, multiple_choice=_with_multiple_choice(sname, facts),
                                  first_token=given.get(sname))
            for sname, facts in _fact_sets(split).items()}


def _base_variants(model: LoadedModel, quant: QuantConfig, built: dict[str, VariantSource] | None = None,
                   attributed: bool = False) -> Callable[[str], LoadedModel]:
    """``variant(name)``: the base variant, made on first use only (a memo hit needs no Q(w),
    which costs a pass over the weights); from ``built`` when it has the name. ``attributed``:
    the variants will be attributed (Q(w) held as codes beside the passes: :func:`_q_w_as_codes`)."""
    models: dict[str, LoadedModel] = {}

    def variant(vname: str) -> LoadedModel:
        if vname not in models and built is not None and vname in built:
            models[vname] = built[vname]()
        if vname not in models:
            if vname == "base_q" and _q_w_as_codes(model, quant, attributed):
                models[vname] = variant_model_as_codes(model, Update({}), quant, vname)
            else:  # (base_fp is the model: no Q(w) for it)
                qbase = quantized_base(model, quant) if vname == "base_q" else {}
                models[vname] = variant_model(model, Update({}), quant, vname, qbase)
        return models[vname]

    return variant


def _q_w_as_codes(model: LoadedModel, quant: QuantConfig, attributed: bool) -> bool:
    """Whether the measurement holds Q(w) as codes: when the variants are attributed (CAD), whose
    passes are sized to the whole working budget, so that Q(w) held beside them as tensors would
    not fit it with them (on SmolLM2 in float32, 425 MiB of tensors beside a CAD pass set the
    setup's and the measurement's peaks); otherwise above the budget
    (:meth:`LoadedModel.reads_quantized_as_codes`)."""
    return attributed or model.reads_quantized_as_codes(quant)


def base_measurement(model: LoadedModel, split: FactSplit, quant: QuantConfig,
                     attribution_config: AttributionConfig | None = None) -> None:
    """Take ahead of any run what :func:`measure_update` reads from the base alone (memoised):
    the scores of w and Q(w) (:func:`base_scores`) and their forget-set attributions for CAD.
    The app does this in the background from its start, so the first "Run MANSU" measures only
    the update's variants."""
    variant = _base_variants(model, quant, attributed=True)  # one Q(w) for the scores and the attribution
    base_scores(model, split, quant, built={v: functools.partial(variant, v) for v in BASE_VARIANTS})
    config = attribution_config or AttributionConfig()
    for vname in BASE_VARIANTS:
        base_memo(_attribution_key(vname, model, quant, split.forget, config),
                  lambda v=vname: attribute(variant(v), split.forget, config, progress=silent))


def base_scores(model: LoadedModel, split: FactSplit, quant: QuantConfig, *, multiple_choice: bool = True,
                variants: Sequence[str] = BASE_VARIANTS,
                built: dict[str, VariantSource] | None = None) -> dict[str, dict[str, FactScores]]:
    """The base's scores as :func:`measure_update` takes them: w and Q(w) on every fact set of
    ``split``, with multiple choice where the measurement reads it (``multiple_choice=False``:
    none, ``mc`` nan).

    Memoised under the base's weight fingerprint (Q(w) is fixed by w and the quantizer, and
    hashing a variant's weights would cost a pass over them), the multiple choice apart: the
    app's setup reads top-1 from the very scores every run's measurement then reuses, so the
    first "Run MANSU" does not evaluate the base again. ``built``: where to take variant models
    from, called only if a score is not memoised."""
    variant = _base_variants(model, quant, built)

    out: dict[str, dict[str, FactScores]] = {}
    for vname in variants:
        if vname not in BASE_VARIANTS:
            raise WorkbenchError(f"not a base variant: {vname!r}; choose from {', '.join(BASE_VARIANTS)}")
        out[vname] = {}
        for sname, facts in _fact_sets(split).items():
            key = (vname, model.fingerprint, quant, tuple(facts))
            scores = base_memo(("evaluate", *key),
                               lambda v=vname, f=facts: evaluate_facts(variant(v), f, multiple_choice=False))
            if multiple_choice and _with_multiple_choice(sname, facts):
                mc = base_memo(("multiple-choice", *key),
                               lambda v=vname, f=facts: multiple_choice_accuracy(variant(v), f))
                scores = replace(scores, mc=mc)
            out[vname][sname] = scores
    return out


def _accuracies(scores: dict[str, dict[str, FactScores]]) -> _Accuracies:
    """``scores[variant][set]`` as the metrics' typed accuracies (the scores already computed:
    exact match and log-probability cost no forward pass of their own here)."""
    acc: dict[str, dict[str, float]] = {}
    mc: dict[str, dict[str, float | None]] = {"forget": {}, "retain": {}}
    for vname, per_set in scores.items():
        for sname, sc in per_set.items():
            acc.setdefault(sname, {})[vname] = sc.top1
            if sname in mc:
                mc[sname][vname] = _finite(sc.mc)

    def of(sname: str) -> VariantAccuracies | None:
        return VariantAccuracies(**acc[sname]) if sname in acc else None

    forget, retain = of("forget"), of("retain")
    if forget is None or retain is None:
        raise WorkbenchError("measuring an update needs a forget set and a retain set")

    def exact(sname: str) -> VariantAccuracies:
        return VariantAccuracies(**{vname: sets[sname].exact for vname, sets in scores.items()})

    def logprob(sname: str) -> VariantLogprobs:
        return VariantLogprobs(**{vname: sets[sname].logprob for vname, sets in scores.items()})

    return _Accuracies(forget=forget, retain=retain,
                       paraphrase=ParaphraseAccuracies(forget=of("forget_paraphrase"), retain=of("retain_paraphrase")),
                       multiple_choice=MultipleChoiceScores(**mc["forget"]),
                       multiple_choice_retain=(MultipleChoiceScores(**mc["retain"])
                                               if any(v is not None for v in mc["retain"].values()) else None),
                       exact=ForgetRetain(forget=exact("forget"), retain=exact("retain")),
                       logprob=ForgetRetain(forget=logprob("forget"), retain=logprob("retain")))


@dataclass(frozen=True)
class _CodeChanges:
    """What the quantizer did with the update (the ``metrics.json`` fields of the comparison)."""

    bucket_overlap: float
    code_overlap: float
    codes_changed: int
    codes_changed_fraction: float
    params_changed: int
    params_changed_unquantized: int
    moved_code_changed_fraction: float | None
    absmax_changes: int | None
    update_to_bin_width: BinWidthRatios
    quantization: QuantizationAnalysis


def _code_changes(model: LoadedModel, update: Update, quant: QuantConfig) -> _CodeChanges:
    names = model.adapter.quantizable(quant)
    quantized = update.only(names)
    comparison = compare_quantization(model.state(), quantized.deltas, names, quant,
                                      transposed=model.adapter.transposed, progress=silent)
    analysis = comparison.to_dict()
    overall = analysis["overall"]
    return _CodeChanges(
        # Strict bucket overlap (code and block scale unchanged), as docs/SCIENCE.md §2.5 defines
        # it, and code overlap (code unchanged), the number QUAIL's ">99.9%" refers to: a
        # dense update nudges almost every block's absmax, so the two differ a lot.
        bucket_overlap=overall["bucket_overlap"],
        code_overlap=1.0 - overall["code_flips"] / max(1, overall["n_weights"]),
        codes_changed=overall["code_flips"],
        codes_changed_fraction=overall["code_flips"] / max(1, overall["n_weights"]),
        params_changed=update.nnz(),
        params_changed_unquantized=update.nnz() - quantized.nnz(),
        moved_code_changed_fraction=overall.get("changed_flip_fraction"),
        absmax_changes=overall.get("absmax_changes"),
        update_to_bin_width=BinWidthRatios(median=overall.get("ratio_median"), p90=overall.get("ratio_p90")),
        quantization=analysis,
    )


def measure_update(
    model: LoadedModel,
    split: FactSplit,
    update: Update,
    *,
    quant: QuantConfig,
    circuit: Iterable[Component] | None = None,
    oracle: LoadedModel | None = None,
    thresholds: Thresholds = Thresholds(),
    cad: bool = True,
    attribution_config: AttributionConfig | None = None,
    progress: Progress | None = None,
) -> UpdateMetrics:
    """All metrics of one update (the body of ``metrics.json`` minus run bookkeeping)."""

    report = progress or silent
    update.check_fits(model)
    circuit_list = list(circuit) if circuit is not None else None
    config = attribution_config or AttributionConfig()
    # Q(w) as codes when as tensors it would not fit the budget beside CAD's passes (the same numbers)
    as_codes = _q_w_as_codes(model, quant, attributed=cad)
    report(0.05, f"{quant.label} of the base weights" + (", held as codes" if as_codes else ""))
    qbase = {} if as_codes else quantized_base(model, quant)
    scores: dict[str, dict[str, FactScores]] = {}
    attributions: dict[str, Attribution] = {}
    kl = 0.0
    # One variant at a time, released before the next: each shares the base's weights (and
    # Q(w)) and holds only its own tensors, and only scores are kept. As codes, each quantized
    # variant quantizes the base again (one pass over the weights each, instead of Q(w) held throughout;
    # Q(w) itself only when its numbers are not memoised).
    for i, vname in enumerate(VARIANTS):
        report(0.1 + 0.6 * i / len(VARIANTS), f"evaluating {vname}")
        variant = _MadeOnce(lambda vname=vname, qbase=qbase: _measured_variant(model, update, quant, vname, qbase,
                                                                           as_codes))
        if vname not in BASE_VARIANTS:
            variant()  # the update's: always evaluated, and made now, before Q(w) is let go below
        if vname == "after_qbase_delta":
            # Q(w) where the update writes is read by no later variant (Q(w)+Δ holds its own sums,
            # Q(w+Δ) replaces them): let it go rather than hold it beside those tensors
            for n in update.deltas:
                qbase.pop(n, None)
        if vname == "after_fp":  # its retain forwards serve its evaluation and the retain KL
            reads, kl = retain_reads_and_kl(model, variant(), split.retain)
            scores[vname] = _variant_scores(vname, variant, split, quant, model, {"retain": reads})
        else:
            scores[vname] = _variant_scores(vname, variant, split, quant, model)
        if cad and vname in _CAD_VARIANTS:
            attributions[vname] = _variant_attribution(vname, variant, split.forget, config, quant, model)
        outlived = variant.let_go(model)
        del variant
        # the variant and its evaluation batches: freed and handed back, not kept under the next
        # variant's (collecting first when a reference cycle keeps the variant: an attributed one's bridge)
        hand_back_freed_memory(collect=outlived())
    del qbase
    accuracies = _accuracies(scores)
    report(0.68, "the exact update in float32 (storage-rounding term)")
    storage = _storage_term(model, update, split.forget)
    report(0.7, "quantization analysis of the update")
    changes = _code_changes(model, update, quant)
    oracle_accuracies = None
    if oracle is not None:
        oracle_accuracies = OracleAccuracies(
            forget_fp=evaluate_facts(oracle, split.forget, multiple_choice=False).top1,
            retain_fp=evaluate_facts(oracle, split.retain, multiple_choice=False).top1)
    cad_scores = None
    if cad:
        cad_scores = cad_of(attributions, circuit_list)
        if oracle is not None:
            report(0.85, "CAD of the retrain oracle (calibration)")
            calibration = cad_calibration(model, oracle, split, circuit_list, attribution_config)
            cad_scores = replace(cad_scores, calibration=calibration)
    f = accuracies.forget
    ptq_gap = f.after_q - f.after_fp
    basis = answer_criterion(split.forget)
    card = report_card(forget=f, retain=accuracies.retain, ptq_gap=ptq_gap, cad=cad_scores,
                       oracle=oracle_accuracies, thresholds=thresholds,
                       chosen=_chosen(accuracies.multiple_choice, split.forget) if basis == "mc" else None,
                       chosen_retain=accuracies.multiple_choice_retain)
    return UpdateMetrics(
        quant=quant, forget=f, retain=accuracies.retain, paraphrase=accuracies.paraphrase,
        multiple_choice=accuracies.multiple_choice, multiple_choice_retain=accuracies.multiple_choice_retain,
        ptq_gap=ptq_gap,
        ptq_gap_decomposition=PtqGapDecomposition(base_shift=f.after_qbase_delta - f.after_fp,
                                                  rounding=f.after_q - f.after_qbase_delta, storage=storage),
        **{field.name: getattr(changes, field.name) for field in fields(_CodeChanges)},
        update_norm=update.norm(), retain_kl=kl, oracle=oracle_accuracies, cad=cad_scores, properties=card,
        exact=accuracies.exact, logprob=accuracies.logprob, forgetting_basis=basis,
    )


def _measured_variant(model: LoadedModel, update: Update, quant: QuantConfig, vname: str,
                      qbase: dict[str, torch.Tensor], as_codes: bool) -> LoadedModel:
    """Variant ``vname`` as the measurement makes it: w+Δ summed at forward where the update is
    sparse, Q(w) as codes when ``as_codes``; the numbers of :func:`variant_model`'s."""
    if vname == "after_fp":
        return after_model_summing(model, update)
    if as_codes and vname in QUANTIZED_VARIANTS:
        return variant_model_as_codes(model, update, quant, vname)
    return variant_model(model, update, quant, vname, qbase)


def _storage_term(model: LoadedModel, update: Update, forget: Sequence[Fact]) -> float:
    """forget top-1 of w+Δ rounded to the storage dtype − of w+Δ exact, both run in float32 (so
    the difference is the rounding alone, not the 16-bit arithmetic); exactly 0 for a float32 model.

    Runs on :func:`~workbench.core.sharing.widened_copy`: float32 arithmetic, one module's
    float32 weights held at a time (a float32 copy of the model held twice a 16-bit model's bytes)."""
    if update.is_empty() or all(p.dtype == torch.float32 for p in model.hf.parameters()):
        return 0.0
    base = model.state()

    def top1(rounded: bool) -> float:
        after = {name: update.added_to(name, base[name] if rounded else base[name].float())
                 for name in update.deltas}
        wide = widened_copy(model.hf, after)
        return evaluate_facts(wide, forget, tokenizer=model.tokenizer, multiple_choice=False).top1

    return top1(rounded=True) - top1(rounded=False)


_CAD_PAIRS = {"fp": ("base_fp", "after_fp"), "quantized": ("base_q", "after_q")}
_CAD_VARIANTS = ("base_fp", "base_q", "after_fp", "after_q")


def _variant_attribution(vname: str, variant: VariantSource, forget: Sequence[Fact], config: AttributionConfig,
                         quant: QuantConfig | None, key_model: LoadedModel) -> Attribution:
    """The variant's attribution on the forget set; the base variants' memoised (as in :func:`_variant_scores`)."""
    def compute() -> Attribution:
        return attribute(variant(), forget, config, progress=silent)

    if vname in BASE_VARIANTS and quant is not None:
        return base_memo(_attribution_key(vname, key_model, quant, forget, config), compute)
    return compute()


def _attribution_key(vname: str, model: LoadedModel, quant: QuantConfig, forget: Sequence[Fact],
                     config: AttributionConfig) -> tuple[Any, ...]:
    return ("attribute", vname, model.fingerprint, quant, tuple(forget), repr(config))


def cad_of(attributions: dict[str, Attribution], circuit: list[Component] | None) -> CadScores:
    """CAD in full precision (base_fp vs after_fp) and quantized (base_q vs after_q) from the
    four variants' attributions."""
    out: dict[str, CADResult] = {}
    for label, (b, a) in _CAD_PAIRS.items():
        before, after = attributions[b], attributions[a]
        out[label] = circuit_attribution_divergence(
            before.scores, after.scores, circuit=circuit,
            metric_before=before.clean_metric, metric_after=after.clean_metric,
        )
    return CadScores(fp=out["fp"].cad, quantized=out["quantized"].cad, fp_detail=out["fp"].to_dict(),
                     quantized_detail=out["quantized"].to_dict())


def cad_for_variants(variants: dict[str, LoadedModel], forget: Sequence[Fact], circuit: list[Component] | None,
                     attribution_config: AttributionConfig | None = None,
                     quant: QuantConfig | None = None) -> CadScores:
    """CAD in full precision (base_fp vs after_fp) and quantized (base_q vs after_q).

    With ``quant`` (the quantizer that built ``base_q``) the base attributions are memoised
    across calls on the same model."""
    config = attribution_config or AttributionConfig()
    base = variants["base_fp"]
    return cad_of({v: _variant_attribution(v, lambda v=v: variants[v], forget, config, quant, base)
                   for v in _CAD_VARIANTS}, circuit)


def cad_calibration(model: LoadedModel, oracle: LoadedModel, split: FactSplit, circuit: list[Component] | None,
                    attribution_config: AttributionConfig | None = None) -> CadCalibration:
    """CAD(base, retrain oracle) on the forget set and on the retain set (memoised: it does not
    depend on the update, so every run on this model, split and circuit shares it)."""

    config = attribution_config or AttributionConfig()

    def divergence(facts: Sequence[Fact]) -> float:
        before = attribute(model, facts, config, progress=silent)
        after = attribute(oracle, facts, config, progress=silent)
        return circuit_attribution_divergence(before.scores, after.scores, circuit=circuit,
                                              metric_before=before.clean_metric,
                                              metric_after=after.clean_metric).cad

    key = ("cad-calibration", model.fingerprint, oracle.fingerprint, tuple(split.forget), tuple(split.retain),
           tuple(circuit) if circuit is not None else None, repr(config))
    return base_memo(key, lambda: CadCalibration(forget=divergence(split.forget), retain=divergence(split.retain)))


@dataclass(frozen=True)
class ChoiceForgetting:
    """What a multiple-choice forget set's report card is judged on: the variants' multiple-choice
    accuracy and the set's chance level."""

    base_fp: float
    after_fp: float
    after_q: float
    chance: float


def _chosen(mc: MultipleChoiceScores, forget: Sequence[Fact]) -> ChoiceForgetting:
    if mc.base_fp is None or mc.after_fp is None or mc.after_q is None:
        raise WorkbenchError("a multiple-choice forget set was measured without its choice accuracies")
    return ChoiceForgetting(base_fp=mc.base_fp, after_fp=mc.after_fp, after_q=mc.after_q, chance=chance_level(forget))


def _property(passed: bool, value: float, threshold: float, margin: float) -> Property:
    return Property(passed=passed, value=value, threshold=threshold, margin=margin)


def report_card(*, forget: VariantAccuracies, retain: VariantAccuracies, ptq_gap: float, cad: CadScores | None,
                oracle: OracleAccuracies | None, thresholds: Thresholds = Thresholds(),
                chosen: ChoiceForgetting | None = None,
                chosen_retain: MultipleChoiceScores | None = None) -> ReportCard:
    """The four properties of docs/SCIENCE.md §5 with pass/fail and margin (positive = passes by that much).

    With ``chosen`` (a multiple-choice forget set) forgetting and the PTQ gap are judged on
    multiple-choice accuracy, and the default threshold is the chance level + 0.1 (never above
    half-way from chance to the base): the retrain oracle of a question it never learned guesses.
    With ``chosen_retain`` (a multiple-choice retain set) retain is judged on its multiple-choice
    accuracy."""
    forget_max = thresholds.forget_max
    if chosen is not None:
        if forget_max is None:
            forget_max = chosen.chance + min(0.1, 0.5 * (chosen.base_fp - chosen.chance))
        worst_forget, ptq_gap = max(chosen.after_fp, chosen.after_q), chosen.after_q - chosen.after_fp
    else:
        if forget_max is None:
            forget_max = oracle.forget_fp + 0.1 if oracle is not None else 0.2
            forget_max = min(forget_max, 0.5 * forget.base_fp)
        worst_forget = max(forget.after_fp, forget.after_q)
    drop = max(retain.base_fp - retain.after_fp, retain.base_q - retain.after_q)
    if chosen_retain is not None:
        r = chosen_retain
        if r.base_fp is None or r.after_fp is None or r.base_q is None or r.after_q is None:
            raise WorkbenchError("a multiple-choice retain set was measured without its choice accuracies")
        drop = max(r.base_fp - r.after_fp, r.base_q - r.after_q)
    tolerance, max_gap = thresholds.retain_tolerance, thresholds.ptq_max_gap
    unmeasured_min = thresholds.cad_min if thresholds.cad_min is not None else DEFAULT_CAD_MIN
    structural = Property(passed=None, value=None, threshold=unmeasured_min, margin=None)
    if cad is not None:
        worst_cad, cad_min = min(cad.fp, cad.quantized), thresholds.structural_threshold(cad)
        structural = _property(worst_cad >= cad_min, worst_cad, cad_min, worst_cad - cad_min)
    return ReportCard(
        forgetting=_property(worst_forget <= forget_max, worst_forget, forget_max, forget_max - worst_forget),
        retain=_property(drop <= tolerance, drop, tolerance, tolerance - drop),
        ptq=_property(ptq_gap <= max_gap, ptq_gap, max_gap, max_gap - ptq_gap),
        structural=structural,
    )


PROPERTY_LABELS = {
    "forgetting": "forgetting (first-token top-1, fp and quantized)",
    "retain": "retain preserved",
    "ptq": "PTQ gap ≤ threshold",
    "structural": "structural erasure (CAD)",
}
BASIS_NAMES = {"top1": "first-token top-1", "mc": "multiple-choice accuracy"}
"""What a card's forgetting property was judged on (:attr:`UpdateMetrics.forgetting_basis`)."""


def property_label(name: str, basis: AnswerCriterion = "top1", retain_basis: AnswerCriterion = "top1") -> str:
    """A property's name on the card; the forgetting, PTQ and retain ones say which accuracy they judge."""
    if retain_basis == "mc" and name == "retain":
        return "retain preserved (multiple-choice accuracy)"
    if basis == "mc" and name == "forgetting":
        return "forgetting (multiple-choice accuracy, fp and quantized)"
    if basis == "mc" and name == "ptq":
        return "PTQ gap (multiple-choice accuracy) ≤ threshold"
    return PROPERTY_LABELS.get(name, name)


def retain_basis(metrics: UpdateMetrics) -> AnswerCriterion:
    """What the card's retain property was judged on (multiple choice when the retain set was)."""
    return "top1" if metrics.multiple_choice_retain is None else "mc"


def report_card_rows(metrics: UpdateMetrics) -> list[dict[str, Any]]:
    """The report card as table rows: property, verdict (``PASS``/``fail``/``–`` when not
    measured), value, threshold, margin (positive = passes by that much)."""
    basis, retained = metrics.forgetting_basis, retain_basis(metrics)
    return [{"property": property_label(name, basis, retained), "verdict": p.verdict, "value": p.value,
             "threshold": p.threshold, "margin": p.margin} for name, p in metrics.properties.items()]


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _secs(x: float) -> str:
    # hundredths below a second, so a short run's phases do not all read 0.0
    return f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def _cad_line(cad: CadScores, threshold: float) -> str:
    line = f"CAD fp {cad.fp:.3f} · quantized {cad.quantized:.3f} · τ {threshold:.3f}"
    calibration = cad.calibration
    if calibration is None:
        return line + " (no retrain oracle: the default τ)"
    ratio = cad.oracle_ratio
    share = f"{100 * ratio:.0f}% of it" if ratio is not None else "n/a"
    return (line + f" · retrain oracle: CAD {calibration.forget:.3f} on the forget set ({share}), "
            f"{calibration.retain:.3f} on the retain set (noise floor)")


def _verdict_line(card: ReportCard, basis: AnswerCriterion, retained: AnswerCriterion) -> str:
    """Which properties failed and by how much (the margin is how far the value is past its threshold)."""
    failed = [(name, p) for name, p in card.items() if p.passed is False]
    measured = sum(1 for _, p in card.items() if p.passed is not None)
    if not failed:
        return f"passes all {measured} measured properties"
    by = ", ".join(f"{property_label(name, basis, retained)} by {abs(p.margin or 0.0):.3f} "
                   f"(value {_fmt(p.value)}, threshold {_fmt(p.threshold)})" for name, p in failed)
    return f"passes {measured - len(failed)} of {measured} measured properties; fails {by}"


ANSWER_METRIC_NAMES = {
    "exact": "greedy exact match (whole answer)",
    "logprob": "answer log-prob (mean, summed over answer tokens)",
}
"""How the card's companion lines name the span metrics (the card judges first-token top-1, or
multiple-choice accuracy on a multiple-choice forget set)."""


def _fp_q(name: str, scores: ForgetRetain[Any]) -> str:
    """``name: forget fp … · quantized … · retain fp … · quantized …`` (fp = w+Δ, quantized = Q(w+Δ))."""
    f, r = scores.forget, scores.retain
    return (f"{name}: forget fp {f.after_fp:.3f} · quantized {f.after_q:.3f} · "
            f"retain fp {r.after_fp:.3f} · quantized {r.after_q:.3f}")


def answer_span_lines(metrics: UpdateMetrics) -> list[str]:
    """Greedy exact match and answer log-probability of the after-model in full precision and
    quantized, on forget and retain (none for a run saved before they were measured). They are
    shown beside the card, not judged by it (see :attr:`UpdateMetrics.forgetting_basis`)."""
    lines = []
    if metrics.forgetting_basis == "mc":
        mc = metrics.multiple_choice
        line = (f"multiple-choice accuracy (judged by the card): forget base {_fmt(mc.base_fp)} → fp "
                f"{_fmt(mc.after_fp)} · quantized {_fmt(mc.after_q)}")
        r = metrics.multiple_choice_retain
        if r is not None:
            line += f" · retain base {_fmt(r.base_fp)} → fp {_fmt(r.after_fp)} · quantized {_fmt(r.after_q)}"
        lines.append(line)
    if metrics.exact is not None:
        lines.append(_fp_q(ANSWER_METRIC_NAMES["exact"], metrics.exact)
                     + f" (beside the card; forgetting is judged on {BASIS_NAMES[metrics.forgetting_basis]})")
    if metrics.logprob is not None:
        lines.append(_fp_q(ANSWER_METRIC_NAMES["logprob"], metrics.logprob))
    return lines


def summary_lines(metrics: RunMetrics) -> list[str]:
    """The headline numbers of a run in words, one line each (the CLI and the app print these)."""

    d, ratio = metrics.ptq_gap_decomposition, metrics.update_to_bin_width
    lines = [
        _verdict_line(metrics.properties, metrics.forgetting_basis, retain_basis(metrics)),
        *answer_span_lines(metrics),
        # the decomposition is of the top-1 gap; a multiple-choice card's PTQ row is the MC gap
        f"PTQ gap{' (first-token top-1)' if metrics.forgetting_basis == 'mc' else ''} {metrics.ptq_gap:+.3f} = "
        f"base shift {d.base_shift:+.3f} + rounding {d.rounding:+.3f}"
        + (f" (before it, storage rounding {d.storage:+.3f})" if d.storage else ""),
        f"params changed {metrics.params_changed:,} · codes changed {metrics.codes_changed:,} "
        f"({100 * metrics.codes_changed_fraction:.4f}%) · code overlap "
        f"{metrics.code_overlap:.6f} · bucket overlap {metrics.bucket_overlap:.6f}",
        f"|Δw|/bin width: median {_fmt(ratio.median)} · p90 {_fmt(ratio.p90)} · "
        f"moved weights whose code changed: {_fmt(metrics.moved_code_changed_fraction)}",
        f"retain KL {metrics.retain_kl:.4g}",
    ]
    if metrics.stopped == ALREADY_AT_TARGET:
        if metrics.forgetting_basis == "mc":
            mc = metrics.multiple_choice
            missed = f"multiple-choice accuracy {_fmt(mc.base_fp)} fp / {_fmt(mc.base_q)} quantized"
        else:
            missed = f"top-1 {metrics.forget.base_fp:.3f} fp / {metrics.forget.base_q:.3f} quantized"
        lines.insert(0, f"nothing was unlearned: the base model already misses the forget set ({missed}, at or "
                        "below the method's forget target), so the forgetting property holds without a step; give "
                        "facts the model knows (`workbench eval --data FILE` shows which)")
    if metrics.cad is not None:
        lines.append(_cad_line(metrics.cad, metrics.properties.structural.threshold))
    if metrics.unlearning_seconds is not None:
        # where the time went: MANSU reports its phases, so slow runs can be read, not guessed at
        phases = metrics.seconds_by_phase
        detail = f" ({', '.join(f'{k} {_secs(v)}' for k, v in phases.items())})" if phases else ""
        lines.append(f"time: unlearning {_secs(metrics.unlearning_seconds)} s{detail} · measuring "
                     f"{_secs(metrics.seconds - metrics.unlearning_seconds)} s")
    return lines
