"""The typed results of measuring an update, and of a saved run: what ``metrics.json`` holds.

:func:`~workbench.measurement.metrics.measure_update` returns an :class:`UpdateMetrics`;
:func:`~workbench.experiments.flow.run_unlearning` adds the run's bookkeeping (method,
model, steps, seconds, the method's diagnostics, the circuit) to make a :class:`RunMetrics`,
which the run store saves with :meth:`RunMetrics.to_json` and reads back with
:meth:`RunMetrics.from_json`.

The file's layout is versioned by ``schema_version`` (:data:`SCHEMA_VERSION`). Version 1 is
the layout written before the key existed (files without ``schema_version``); version 2 is
the same layout with the key, so both read into the same objects and :meth:`to_json`
writes exactly the keys and numbers version 1 had, plus ``schema_version``. Version 3 adds
two keys, ``exact`` and ``logprob`` (greedy exact match and mean answer log-probability of
each variant on the forget and retain sets, :class:`ForgetRetain`); files of versions 1 and 2
have neither, and read with both ``None`` (the file is not rewritten). Version 4 adds
``forgetting_basis: "mc"`` to a run whose forget set is multiple choice (its forgetting and
PTQ properties were judged on multiple-choice accuracy; a file without the key was judged on
first-token top-1), and ``multiple_choice.retain`` to a run whose retain set is (its retain
property was judged on it). Anything else
(a newer version, a missing key, a value of the wrong type, a key this version does not
know) is refused with a :class:`~workbench.core.errors.WorkbenchError` that names the file
and the key.

Three parts stay JSON objects, by design: the quantization analysis
(:data:`QuantizationAnalysis`), CAD's per-node detail (:data:`CadDetail`) and the method's
diagnostics (:data:`MethodDiagnostics`). They are nested payloads whose shape belongs to
another module (``QuantComparison``, ``CADResult``, each method) and that the plots read
whole; what the faces read from them by name is a typed property here
(:attr:`RunMetrics.seconds_by_phase`, :attr:`RunMetrics.mansu_diagnostics`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Generic, Self, TypeVar

from workbench.core.errors import WorkbenchError
from workbench.data.facts import AnswerCriterion
from workbench.quant import QuantConfig
from workbench.unlearning.mansu import MansuDiagnostics, is_mansu_method

SCHEMA_VERSION = 4
"""The ``metrics.json`` layout this workbench writes."""
READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4)
"""Layouts it reads: 1 (no ``schema_version`` key) and 2 are the same layout; 3 adds
``exact`` and ``logprob``; 4 adds ``forgetting_basis``."""

VARIANTS = ("base_fp", "base_q", "after_fp", "after_qbase_delta", "after_q")
"""The five models every update is measured on (see :mod:`workbench.measurement.metrics`)."""
FORGET_JSON_ORDER = ("base_fp", "base_q", "after_fp", "after_q", "after_qbase_delta")
"""The order of the forget accuracies in ``metrics.json`` (as version 1 wrote them)."""

JsonObject = dict[str, Any]
QuantizationAnalysis = JsonObject
"""``QuantComparison.to_dict()``: per-module code flips, bin occupancy and |Δw|/bin-width
histograms. Its shape is :class:`~workbench.quant.compare.ModuleComparison`'s; the plots
read it module by module."""
CadDetail = JsonObject
"""``CADResult.to_dict()``: CAD with its per-node attributions before and after."""
MethodDiagnostics = JsonObject
"""A method's own numbers (MANSU: ``MansuDiagnostics.to_dict()``; RMU: its layer and
steering coefficient; ...): each method has its own keys, so there is no one type."""


class JsonFields:
    """One JSON object of ``metrics.json``, read key by key.

    Every error names the file (``source``) and the key's path (``forget.after_q``); every
    key read is remembered, so :meth:`no_other_keys` can refuse keys nobody read."""

    def __init__(self, data: object, source: str, path: str = "") -> None:
        self.source, self.path = source, path
        self._read: set[str] = set()
        if not isinstance(data, dict):
            raise self.error(f"{path or 'metrics.json'} must be a JSON object, got {_kind(data)}")
        self.data: JsonObject = data

    def error(self, message: str) -> WorkbenchError:
        return WorkbenchError(f"{self.source}: {message}")

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.data

    def value(self, key: str) -> object:
        if key not in self.data:
            raise self.error(f"'{self.key_path(key)}' is missing")
        self._read.add(key)
        return self.data[key]

    def _typed(self, key: str, ok: bool, value: object, expected: str) -> None:
        if not ok:
            raise self.error(f"'{self.key_path(key)}' must be {expected}, got {_kind(value)}")

    def number(self, key: str) -> float:
        value = self.value(key)
        self._typed(key, _is_number(value), value, "a number")
        return value  # type: ignore[return-value]  # an int or a float, kept as written

    def number_or_none(self, key: str) -> float | None:
        value = self.value(key)
        self._typed(key, value is None or _is_number(value), value, "a number or null")
        return value  # type: ignore[return-value]

    def integer(self, key: str) -> int:
        value = self.value(key)
        self._typed(key, isinstance(value, int) and not isinstance(value, bool), value, "a whole number")
        return value  # type: ignore[return-value]

    def integer_or_none(self, key: str) -> int | None:
        return None if self.value(key) is None else self.integer(key)

    def text(self, key: str) -> str:
        value = self.value(key)
        self._typed(key, isinstance(value, str), value, "a string")
        return value  # type: ignore[return-value]

    def flag_or_none(self, key: str) -> bool | None:
        value = self.value(key)
        self._typed(key, value is None or isinstance(value, bool), value, "true, false or null")
        return value  # type: ignore[return-value]

    def texts_or_none(self, key: str) -> tuple[str, ...] | None:
        value = self.value(key)
        ok = value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        self._typed(key, ok, value, "a list of strings or null")
        return None if value is None else tuple(value)  # type: ignore[arg-type]

    def object(self, key: str) -> JsonObject:
        """A nested object kept as JSON (checked to be an object, not read further)."""
        return self.child(key).data

    def child(self, key: str) -> JsonFields:
        return JsonFields(self.value(key), self.source, self.key_path(key))

    def no_other_keys(self) -> None:
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            where = f"'{self.path}'" if self.path else "metrics.json"
            raise self.error(f"{where} has key(s) this workbench does not know: {', '.join(unknown)}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: object) -> str:
    """A JSON value described for an error message."""
    if value is None:
        return "null"
    names = {bool: "true/false", str: "a string", list: "a list", dict: "an object", int: "a number",
             float: "a number"}
    text = repr(value)
    return f"{names.get(type(value), type(value).__name__)} ({text[:40]}{'…' if len(text) > 40 else ''})"


# --------------------------------------------------------------------------- accuracies


@dataclass(frozen=True)
class PerVariant:
    """One number on one fact set for each of the five models (:data:`VARIANTS`)."""

    base_fp: float
    base_q: float
    after_fp: float
    after_qbase_delta: float
    after_q: float

    def by_variant(self) -> dict[str, float]:
        """Variant name → number, in :data:`VARIANTS` order (for plots and tables)."""
        return {v: getattr(self, v) for v in VARIANTS}

    def to_json(self, order: tuple[str, ...] = VARIANTS) -> JsonObject:
        return {v: getattr(self, v) for v in order}

    @classmethod
    def from_json(cls, f: JsonFields) -> Self:
        out = cls(**{v: f.number(v) for v in VARIANTS})
        f.no_other_keys()
        return out


@dataclass(frozen=True)
class VariantAccuracies(PerVariant):
    """An accuracy (a fraction of facts) of each of the five models on one fact set: first-token
    top-1 in ``forget``/``retain``, greedy exact match in ``exact``."""


@dataclass(frozen=True)
class VariantLogprobs(PerVariant):
    """Mean answer log-probability (nats, summed over each answer's tokens, teacher-forced) of
    each of the five models on one fact set."""


V = TypeVar("V", bound=PerVariant)


@dataclass(frozen=True)
class ForgetRetain(Generic[V]):
    """One per-variant metric on the forget set and on the retain set (``metrics.json``'s
    ``exact`` and ``logprob``: ``{"forget": {variant: value}, "retain": {...}}``)."""

    forget: V
    retain: V

    def to_json(self) -> JsonObject:
        return {"forget": self.forget.to_json(), "retain": self.retain.to_json()}

    @staticmethod
    def from_json(f: JsonFields, kind: type[V]) -> ForgetRetain[V]:
        out = ForgetRetain(forget=kind.from_json(f.child("forget")), retain=kind.from_json(f.child("retain")))
        f.no_other_keys()
        return out


@dataclass(frozen=True)
class MultipleChoiceScores:
    """Multiple-choice accuracy of each variant on one fact set (the forget set; the retain set
    too when it is multiple choice); ``None`` when the facts have no choices (cloze-only files)."""

    base_fp: float | None
    base_q: float | None
    after_fp: float | None
    after_qbase_delta: float | None
    after_q: float | None

    def to_json(self) -> JsonObject:
        return {v: getattr(self, v) for v in VARIANTS}

    @classmethod
    def from_json(cls, f: JsonFields) -> MultipleChoiceScores:
        out = cls(**{v: f.number_or_none(v) for v in VARIANTS})
        f.no_other_keys()
        return out


@dataclass(frozen=True)
class ParaphraseAccuracies:
    """Top-1 of each variant on the paraphrased forget and retain facts (``None``: the split has none)."""

    forget: VariantAccuracies | None = None
    retain: VariantAccuracies | None = None

    def to_json(self) -> JsonObject:
        pairs = (("forget_paraphrase", self.forget), ("retain_paraphrase", self.retain))
        return {key: acc.to_json() for key, acc in pairs if acc is not None}

    @classmethod
    def from_json(cls, f: JsonFields) -> ParaphraseAccuracies:
        def read(key: str) -> VariantAccuracies | None:
            return VariantAccuracies.from_json(f.child(key)) if f.has(key) else None

        out = cls(forget=read("forget_paraphrase"), retain=read("retain_paraphrase"))
        f.no_other_keys()
        return out


@dataclass(frozen=True)
class PtqGapDecomposition:
    """The PTQ gap split in two (docs/SCIENCE.md §6.2): ``base_shift`` = forget(Q(w)+Δ) −
    forget(w+Δ), the base's own quantization noise, and ``rounding`` = forget(Q(w+Δ)) −
    forget(Q(w)+Δ), the update being rounded away.

    ``storage`` = forget(w+Δ as stored) − forget(w+Δ exact), both run in float32: what
    rounding the after-model to a 16-bit storage dtype (before it is quantized) does to the
    update (exactly 0 for float32 models). It is the pipeline's third term, reported beside
    the PTQ gap's two (which compare models as stored)."""

    base_shift: float
    rounding: float
    storage: float | None = None  # None: a run written before the term existed (float32: it was 0)

    def to_json(self) -> JsonObject:
        out: JsonObject = {"base_shift": self.base_shift, "rounding": self.rounding}
        if self.storage is not None:
            out["storage"] = self.storage
        return out

    @classmethod
    def from_json(cls, f: JsonFields) -> PtqGapDecomposition:
        storage = f.number("storage") if f.has("storage") else None
        out = cls(base_shift=f.number("base_shift"), rounding=f.number("rounding"), storage=storage)
        f.no_other_keys()
        return out


@dataclass(frozen=True)
class BinWidthRatios:
    """Quantiles of |Δw| / local bin width over the changed quantized weights (``None``: none changed)."""

    median: float | None
    p90: float | None

    def to_json(self) -> JsonObject:
        return {"median": self.median, "p90": self.p90}

    @classmethod
    def from_json(cls, f: JsonFields) -> BinWidthRatios:
        out = cls(median=f.number_or_none("median"), p90=f.number_or_none("p90"))
        f.no_other_keys()
        return out


@dataclass(frozen=True)
class OracleAccuracies:
    """Top-1 of the retrain oracle (trained without the forget facts) in full precision."""

    forget_fp: float
    retain_fp: float

    def to_json(self) -> JsonObject:
        return {"forget_fp": self.forget_fp, "retain_fp": self.retain_fp}

    @classmethod
    def from_json(cls, f: JsonFields) -> OracleAccuracies:
        out = cls(forget_fp=f.number("forget_fp"), retain_fp=f.number("retain_fp"))
        f.no_other_keys()
        return out


@dataclass(frozen=True)
class CadCalibration:
    """CAD between the base and its retrain oracle, on the same circuit and attribution settings.

    ``forget``: on the forget set, what erasure by never having learned the facts looks like.
    ``retain``: on the retain set, the noise floor of two trainings (the oracle should know
    these facts as the base does). docs/SCIENCE.md §7.4 explains the threshold.
    """

    forget: float
    retain: float

    @property
    def threshold(self) -> float | None:
        """τ half-way from the noise floor to the oracle; ``None`` when the oracle's CAD does
        not rise above the noise floor (CAD cannot tell erasure from noise on this model)."""
        if self.forget <= self.retain:
            return None
        return self.retain + 0.5 * (self.forget - self.retain)

    def to_json(self) -> JsonObject:
        return {"forget": self.forget, "retain": self.retain}

    @classmethod
    def from_json(cls, f: JsonFields) -> CadCalibration:
        out = cls(forget=f.number("forget"), retain=f.number("retain"))
        f.no_other_keys()
        return out


@dataclass(frozen=True)
class CadScores:
    """Circuit attribution divergence in full precision (w vs w+Δ) and quantized (Q(w) vs Q(w+Δ)).

    ``calibration``: CAD(base, retrain oracle) when the model has an oracle, else ``None``.
    """

    fp: float
    quantized: float
    fp_detail: CadDetail
    quantized_detail: CadDetail
    calibration: CadCalibration | None = None

    def detail(self, quantized: bool) -> CadDetail:
        return self.quantized_detail if quantized else self.fp_detail

    @property
    def oracle_ratio(self) -> float | None:
        """The weaker of the two CADs as a fraction of the oracle's forget-set CAD."""
        if self.calibration is None or self.calibration.forget <= 0:
            return None
        return min(self.fp, self.quantized) / self.calibration.forget

    def to_json(self) -> JsonObject:
        out: JsonObject = {"fp": self.fp, "fp_detail": self.fp_detail, "quantized": self.quantized,
                           "quantized_detail": self.quantized_detail}
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_json()
        return out

    @classmethod
    def from_json(cls, f: JsonFields) -> CadScores:
        calibration = CadCalibration.from_json(f.child("calibration")) if f.has("calibration") else None
        out = cls(fp=f.number("fp"), fp_detail=f.object("fp_detail"), quantized=f.number("quantized"),
                  quantized_detail=f.object("quantized_detail"), calibration=calibration)
        f.no_other_keys()
        return out


# --------------------------------------------------------------------------- report card


@dataclass(frozen=True)
class Property:
    """One property of the report card (docs/SCIENCE.md §5).

    Attributes:
        passed: whether it holds; ``None`` when it was not measured (``"pass"`` in JSON).
        value: the measured value (``None`` when not measured).
        threshold: what the value is held against.
        margin: how far it passes by (negative: fails by), ``None`` when not measured.
    """

    passed: bool | None
    value: float | None
    threshold: float
    margin: float | None

    @property
    def verdict(self) -> str:
        """``PASS``, ``fail``, or ``–`` (not measured), as the tables print it."""
        return "–" if self.passed is None else ("PASS" if self.passed else "fail")

    def to_json(self) -> JsonObject:
        return {"pass": self.passed, "margin": self.margin, "threshold": self.threshold, "value": self.value}

    @classmethod
    def from_json(cls, f: JsonFields) -> Property:
        out = cls(passed=f.flag_or_none("pass"), margin=f.number_or_none("margin"),
                  threshold=f.number("threshold"), value=f.number_or_none("value"))
        f.no_other_keys()
        return out


@dataclass(frozen=True)
class ReportCard:
    """The four properties: forgetting (first-token top-1, or multiple-choice accuracy on a
    multiple-choice forget set; fp and quantized), retain preserved, PTQ gap, structural erasure."""

    forgetting: Property
    retain: Property
    ptq: Property
    structural: Property

    NAMES = ("forgetting", "retain", "ptq", "structural")

    def items(self) -> list[tuple[str, Property]]:
        """(name, property) in the card's order."""
        return [(name, getattr(self, name)) for name in self.NAMES]

    def passes(self) -> int:
        return sum(1 for _, p in self.items() if p.passed)

    def to_json(self) -> JsonObject:
        return {name: p.to_json() for name, p in self.items()}

    @classmethod
    def from_json(cls, f: JsonFields) -> ReportCard:
        out = cls(**{name: Property.from_json(f.child(name)) for name in cls.NAMES})
        f.no_other_keys()
        return out


# --------------------------------------------------------------------------- one measured update


@dataclass(frozen=True, kw_only=True)
class UpdateMetrics:
    """Everything measured about one update (see :mod:`workbench.measurement.metrics`).

    Attributes:
        quant: the quantizer of the ``_q`` variants.
        forget, retain: first-token top-1 of the five variants on each set (the report card's).
        paraphrase: top-1 on the paraphrased sets (when the split has them).
        multiple_choice: multiple-choice accuracy on the forget set.
        exact: greedy exact match of the whole answer span of the five variants on forget and
            retain (equal to top-1 where every answer is one token); ``None``: a run saved
            before version 3.
        logprob: mean answer log-probability of the five variants on forget and retain
            (``None``: saved before version 3).
        ptq_gap: forget(Q(w+Δ)) − forget(w+Δ); ``ptq_gap_decomposition`` splits it.
        bucket_overlap: fraction of quantized weights whose code and block scale are unchanged.
        code_overlap: fraction whose code is unchanged (QUAIL's overlap).
        codes_changed, codes_changed_fraction: quantized weights whose code changed.
        params_changed: non-zero entries of the update; ``params_changed_unquantized`` of them
            in parameters the quantizer leaves alone.
        moved_code_changed_fraction: of the moved quantized weights, the fraction whose code
            changed (``None``: none moved).
        absmax_changes: blocks whose scale changed.
        update_to_bin_width: |Δw| / bin width quantiles.
        update_norm: ‖Δ‖ over every parameter.
        quantization: the full analysis, per module (:data:`QuantizationAnalysis`).
        retain_kl: mean KL(base ‖ w+Δ) at the retain prompts' answer position.
        oracle: the retrain oracle's accuracies (when there is one).
        cad: CAD scores (when measured).
        properties: the report card.
        forgetting_basis: what its forgetting and PTQ properties were judged on: ``top1``
            (``forget``'s first-token top-1), or ``mc`` (``multiple_choice``'s accuracy, for a
            multiple-choice forget set; :func:`~workbench.data.facts.answer_criterion`).
        multiple_choice_retain: multiple-choice accuracy on the retain set, measured (and
            judged by the retain property) when the retain set is multiple choice; else ``None``.
    """

    quant: QuantConfig
    forget: VariantAccuracies
    retain: VariantAccuracies
    paraphrase: ParaphraseAccuracies
    multiple_choice: MultipleChoiceScores
    ptq_gap: float
    ptq_gap_decomposition: PtqGapDecomposition
    bucket_overlap: float
    code_overlap: float
    codes_changed: int
    codes_changed_fraction: float
    params_changed: int
    params_changed_unquantized: int
    moved_code_changed_fraction: float | None
    absmax_changes: int | None
    update_to_bin_width: BinWidthRatios
    update_norm: float
    quantization: QuantizationAnalysis
    retain_kl: float
    oracle: OracleAccuracies | None = None
    cad: CadScores | None = None
    properties: ReportCard
    exact: ForgetRetain[VariantAccuracies] | None = None
    logprob: ForgetRetain[VariantLogprobs] | None = None
    forgetting_basis: AnswerCriterion = "top1"
    multiple_choice_retain: MultipleChoiceScores | None = None

    def to_json(self) -> JsonObject:
        """The measured part of ``metrics.json``, key for key as version 1 wrote it (plus version 3's
        ``exact`` and ``logprob`` when measured)."""
        out: JsonObject = {
            "quant": self.quant.to_dict(),
            "forget": self.forget.to_json(FORGET_JSON_ORDER),
            "retain": self.retain.to_json(),
            "paraphrase": self.paraphrase.to_json(),
            "multiple_choice": {"forget": self.multiple_choice.to_json()},
        }
        if self.multiple_choice_retain is not None:  # version 4: a multiple-choice retain set
            out["multiple_choice"]["retain"] = self.multiple_choice_retain.to_json()
        # version 3's keys, absent from a run read from an older file (so it writes back unchanged)
        if self.exact is not None:
            out["exact"] = self.exact.to_json()
        if self.logprob is not None:
            out["logprob"] = self.logprob.to_json()
        out.update({
            "ptq_gap": self.ptq_gap,
            "ptq_gap_decomposition": self.ptq_gap_decomposition.to_json(),
        })
        for name in ("bucket_overlap", "code_overlap", "codes_changed", "codes_changed_fraction", "params_changed",
                     "params_changed_unquantized", "moved_code_changed_fraction", "absmax_changes"):
            out[name] = getattr(self, name)
        out.update({"update_to_bin_width": self.update_to_bin_width.to_json(), "update_norm": self.update_norm,
                    "quantization": self.quantization, "retain_kl": self.retain_kl})
        if self.oracle is not None:
            out["oracle"] = self.oracle.to_json()
        if self.cad is not None:
            out["cad"] = self.cad.to_json()
        out["properties"] = self.properties.to_json()
        if self.forgetting_basis != "top1":  # version 4's key, written only where it says something
            out["forgetting_basis"] = self.forgetting_basis
        return out


def _read_update_metrics(f: JsonFields) -> dict[str, Any]:
    """The :class:`UpdateMetrics` fields of a ``metrics.json`` object, as constructor arguments."""
    choices = f.child("multiple_choice")
    out: dict[str, Any] = {
        "quant": _read_quant(f),
        "forget": VariantAccuracies.from_json(f.child("forget")),
        "retain": VariantAccuracies.from_json(f.child("retain")),
        "paraphrase": ParaphraseAccuracies.from_json(f.child("paraphrase")),
        "multiple_choice": MultipleChoiceScores.from_json(choices.child("forget")),
        "multiple_choice_retain": (MultipleChoiceScores.from_json(choices.child("retain"))
                                   if choices.has("retain") else None),
        "exact": ForgetRetain.from_json(f.child("exact"), VariantAccuracies) if f.has("exact") else None,
        "logprob": ForgetRetain.from_json(f.child("logprob"), VariantLogprobs) if f.has("logprob") else None,
        "ptq_gap_decomposition": PtqGapDecomposition.from_json(f.child("ptq_gap_decomposition")),
        "update_to_bin_width": BinWidthRatios.from_json(f.child("update_to_bin_width")),
        "quantization": f.object("quantization"),
        "oracle": OracleAccuracies.from_json(f.child("oracle")) if f.has("oracle") else None,
        "cad": CadScores.from_json(f.child("cad")) if f.has("cad") else None,
        "properties": ReportCard.from_json(f.child("properties")),
        "forgetting_basis": _read_basis(f),
    }
    choices.no_other_keys()
    for name in ("ptq_gap", "bucket_overlap", "code_overlap", "codes_changed_fraction", "update_norm", "retain_kl"):
        out[name] = f.number(name)
    for name in ("codes_changed", "params_changed", "params_changed_unquantized"):
        out[name] = f.integer(name)
    out["moved_code_changed_fraction"] = f.number_or_none("moved_code_changed_fraction")
    out["absmax_changes"] = f.integer_or_none("absmax_changes")
    return out


def _read_basis(f: JsonFields) -> AnswerCriterion:
    if not f.has("forgetting_basis"):
        return "top1"
    basis = f.text("forgetting_basis")
    if basis not in ("top1", "mc"):
        raise f.error(f"'forgetting_basis' must be 'top1' or 'mc', not {basis!r}")
    return "mc" if basis == "mc" else "top1"


def _read_quant(f: JsonFields) -> QuantConfig:
    data = f.object("quant")
    try:
        return QuantConfig.from_dict(data)
    except (WorkbenchError, TypeError) as exc:
        raise f.error(f"'quant' is not a quantizer ({exc})") from None


# --------------------------------------------------------------------------- one saved run


@dataclass(frozen=True, kw_only=True)
class RunMetrics(UpdateMetrics):
    """A run's ``metrics.json``: the measured update plus the run's bookkeeping.

    Attributes:
        method: the method's name (a MANSU ablation's label, e.g. ``mansu-no_floor``).
        model, model_fingerprint: the base model's name and weight fingerprint.
        split: the split's name; ``n_forget``/``n_retain`` its sizes.
        steps: optimisation steps or MANSU rounds; ``stopped`` why the run ended.
        seconds: wall time of the run (unlearning and measuring).
        unlearning_seconds: the unlearning part (``None``: saved before runs recorded it).
        diagnostics: the method's own numbers (:data:`MethodDiagnostics`).
        circuit: the circuit's component names (``None``: the method used none).
        run_id: the id in the run store (``None`` until saved).
        schema_version: the layout version read (1 to 4); new metrics are :data:`SCHEMA_VERSION`.
    """

    method: str
    model: str
    model_fingerprint: str
    split: str
    n_forget: int
    n_retain: int
    steps: int
    stopped: str
    seconds: float
    unlearning_seconds: float | None = None
    diagnostics: MethodDiagnostics
    circuit: tuple[str, ...] | None
    run_id: str | None = None
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def of_update(cls, measured: UpdateMetrics, *, method: str, model: str, model_fingerprint: str, split: str,
                  n_forget: int, n_retain: int, steps: int, stopped: str, seconds: float,
                  unlearning_seconds: float | None, diagnostics: MethodDiagnostics,
                  circuit: tuple[str, ...] | None) -> RunMetrics:
        """``measured`` with the run's bookkeeping (not yet saved: no ``run_id``)."""
        return cls(**{f.name: getattr(measured, f.name) for f in fields(UpdateMetrics)}, method=method,
                   model=model, model_fingerprint=model_fingerprint, split=split, n_forget=n_forget,
                   n_retain=n_retain, steps=steps, stopped=stopped, seconds=seconds,
                   unlearning_seconds=unlearning_seconds, diagnostics=diagnostics, circuit=circuit)

    def saved_as(self, run_id: str) -> RunMetrics:
        return replace(self, run_id=run_id)

    @property
    def seconds_by_phase(self) -> dict[str, float]:
        """Where the unlearning time went, for methods that time their phases (MANSU); else empty."""
        return dict(self.diagnostics.get("seconds_by_phase") or {})

    @property
    def mansu_diagnostics(self) -> MansuDiagnostics | None:
        """MANSU's diagnostics, typed (``None`` for other methods); a
        :class:`~workbench.core.errors.WorkbenchError` when they lack a field (a run saved
        before the field existed)."""
        return MansuDiagnostics.from_dict(self.diagnostics) if is_mansu_method(self.method) else None

    def to_json(self) -> JsonObject:
        """``metrics.json``: version 1's keys and numbers, plus ``schema_version``."""
        out: JsonObject = {"schema_version": self.schema_version, **super().to_json()}
        for name in ("method", "model", "model_fingerprint", "split", "n_forget", "n_retain", "steps", "stopped",
                     "seconds"):
            out[name] = getattr(self, name)
        if self.unlearning_seconds is not None:
            out["unlearning_seconds"] = self.unlearning_seconds
        out["diagnostics"] = self.diagnostics
        out["circuit"] = list(self.circuit) if self.circuit is not None else None
        if self.run_id is not None:
            out["run_id"] = self.run_id
        return out

    @classmethod
    def from_json(cls, data: object, *, source: str) -> RunMetrics:
        """Read a ``metrics.json`` object of version 1 to 4; ``source`` (the file or run)
        starts every error message."""
        f = JsonFields(data, source)
        version = _schema_version(f)
        out = cls(**_read_update_metrics(f), method=f.text("method"), model=f.text("model"),
                  model_fingerprint=f.text("model_fingerprint"), split=f.text("split"), n_forget=f.integer("n_forget"),
                  n_retain=f.integer("n_retain"), steps=f.integer("steps"), stopped=f.text("stopped"),
                  seconds=f.number("seconds"),
                  unlearning_seconds=f.number("unlearning_seconds") if f.has("unlearning_seconds") else None,
                  diagnostics=f.object("diagnostics"), circuit=f.texts_or_none("circuit"),
                  run_id=f.text("run_id") if f.has("run_id") else None, schema_version=version)
        f.no_other_keys()
        _check_diagnostics(out, f)
        return out


def _schema_version(f: JsonFields) -> int:
    if not f.has("schema_version"):
        return 1  # written before the key existed: version 1, the same layout
    version = f.integer("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        newer = " (written by a newer workbench: upgrade to read it)" if version > SCHEMA_VERSION else ""
        raise f.error(f"schema_version {version} is not one this workbench reads "
                      f"({', '.join(map(str, READABLE_SCHEMA_VERSIONS))}){newer}")
    return version


def _check_diagnostics(metrics: RunMetrics, f: JsonFields) -> None:
    """What the faces read from the diagnostics by name must have its type (refused at read,
    not where a figure is drawn). MANSU's other fields are checked by :attr:`RunMetrics.mansu_diagnostics`
    when asked for: runs saved before a field existed stay readable."""
    phases = metrics.diagnostics.get("seconds_by_phase")
    if phases is not None and not (isinstance(phases, dict) and all(_is_number(v) for v in phases.values())):
        raise f.error(f"'diagnostics.seconds_by_phase' must map phases to seconds, got {_kind(phases)}")
