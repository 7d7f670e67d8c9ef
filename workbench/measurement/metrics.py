"""Everything measured about one unlearning update: the numbers behind ``metrics.json``.

Five models are compared, all built from the base without modifying it:

========================  ===========================================================
``base_fp``               w — the base in full precision
``base_q``                Q(w) — the base quantized
``after_fp``              w + Δ — the unlearned model in full precision
``after_qbase_delta``     Q(w) + Δ — the exact, unrounded update on the quantized base
``after_q``               Q(w + Δ) — the unlearned model quantized (what gets deployed)
========================  ===========================================================

The PTQ gap ``forget(after_q) − forget(after_fp)`` is decomposed (REFERENCE.md §6) into
``base_shift = forget(Q(w)+Δ) − forget(w+Δ)`` — the base's own quantization noise — and
``rounding = forget(Q(w+Δ)) − forget(Q(w)+Δ)`` — the update being rounded away. Only the
second is "quantization undoing the update".

Parameters the quantizer does not touch (embeddings, norms, biases) keep their exact
update in every quantized model, as they would in a bitsandbytes 4-bit deployment.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from workbench.core.components import Component
from workbench.core.errors import WorkbenchError
from workbench.core.progress import silent
from workbench.data.facts import FactSplit
from workbench.interpretability.attribution import AttributionConfig, attribute
from workbench.interpretability.cad import circuit_attribution_divergence
from workbench.measurement.evaluation import evaluate_facts
from workbench.models.loaded import LoadedModel
from workbench.models.scoring import encode_prompts, last_token_logits
from workbench.models.update import Update
from workbench.quant import (
    QuantConfig,
    compare_quantization,
    quantizable_parameters,
    quantize_dequantize,
    transposed_parameters,
)

VARIANTS = ("base_fp", "base_q", "after_fp", "after_qbase_delta", "after_q")


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
        cad_min: structural erasure passes when CAD (full precision and quantized) is at least this.
    """

    forget_max: float | None = None
    retain_tolerance: float = 0.05
    ptq_max_gap: float = 0.0
    cad_min: float = 0.1

    def __post_init__(self) -> None:
        if self.forget_max is not None and not 0 <= self.forget_max <= 1:
            raise WorkbenchError(f"forget_max must be in [0, 1], got {self.forget_max}")
        if not 0 <= self.retain_tolerance <= 1:
            raise WorkbenchError(f"retain_tolerance must be in [0, 1], got {self.retain_tolerance}")
        if not 0 <= self.cad_min <= 1:
            raise WorkbenchError(f"cad_min must be in [0, 1], got {self.cad_min}")


def quantized_states(
    model: LoadedModel, update: Update, quant: QuantConfig
) -> dict[str, dict[str, torch.Tensor]]:
    """Replacement states for the quantized variants (only names that differ from the base)."""

    base = model.state()
    names = quantizable_parameters(model.hf, quant)
    tr = transposed_parameters(model.hf)
    qbase = {n: quantize_dequantize(base[n], quant, transposed=n in tr) for n in names}
    after_q = dict(qbase)
    for n, d in update.deltas.items():
        # Parameters the quantizer leaves alone keep their exact update (as in a bnb deployment).
        after_q[n] = quantize_dequantize(base[n] + d, quant, transposed=n in tr) if n in qbase else base[n] + d
    qbase_delta = dict(qbase)
    for n, d in update.deltas.items():
        qbase_delta[n] = qbase.get(n, base[n]) + d
    return {"base_q": qbase, "after_q": after_q, "after_qbase_delta": qbase_delta}


def build_variants(model: LoadedModel, update: Update, quant: QuantConfig) -> dict[str, LoadedModel]:
    """The five models of the module docstring."""
    states = quantized_states(model, update, quant)
    return {
        "base_fp": model,
        "base_q": model.with_state(states["base_q"], f"{model.name}|{quant.label}"),
        "after_fp": update.apply(model, f"{model.name}+Δ"),
        "after_qbase_delta": model.with_state(states["after_qbase_delta"], f"{model.name}|{quant.label}+Δ"),
        "after_q": model.with_state(states["after_q"], f"{model.name}+Δ|{quant.label}"),
    }


def retain_kl(base: LoadedModel, after: LoadedModel, facts: Any) -> float:
    """Mean KL(p_base ‖ p_after) of the next-token distribution at the retain prompts' answer position."""

    ids, last, _ = encode_prompts(base.tokenizer, [f.prompt for f in facts])
    lb = torch.log_softmax(last_token_logits(base.hf, ids, last).float(), -1)
    la = torch.log_softmax(last_token_logits(after.hf, ids, last).float(), -1)
    return float((lb.exp() * (lb - la)).sum(-1).mean())


# The base's own numbers (w and Q(w) on each fact set, their attributions for CAD) are the
# same for every update measured on one model: a paper table, an ablation table or an app
# session would otherwise recompute them per run (about a third of a SmolLM2 run's
# measurement). Memoised in-process by the model's weight fingerprint, never on disk, so a
# cached number always comes from weights this process holds.
_BASE_MEMO: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_BASE_MEMO_SIZE = 64
_BASE_MEMO_LOCK = threading.Lock()  # app sessions measure from several threads
BASE_VARIANTS = ("base_fp", "base_q")


def base_memo(key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
    """``compute()`` once per ``key`` (least recently used entries are dropped).

    Two threads asking for a missing key may both compute it (the lock is not held while
    computing); the results are equal, so either may stay."""
    with _BASE_MEMO_LOCK:
        if key in _BASE_MEMO:
            _BASE_MEMO.move_to_end(key)
            return _BASE_MEMO[key]
    value = compute()
    with _BASE_MEMO_LOCK:
        _BASE_MEMO[key] = value
        while len(_BASE_MEMO) > _BASE_MEMO_SIZE:
            _BASE_MEMO.popitem(last=False)
    return value


def clear_base_memo() -> None:
    with _BASE_MEMO_LOCK:
        _BASE_MEMO.clear()


def _evaluate_variant(vname: str, vmodel: LoadedModel, facts: Any, quant: QuantConfig,
                      multiple_choice: bool) -> Any:
    if vname not in BASE_VARIANTS:
        return evaluate_facts(vmodel, facts, multiple_choice=multiple_choice)
    key = ("evaluate", vname, vmodel.fingerprint, quant.label, tuple(facts), multiple_choice)
    return base_memo(key, lambda: evaluate_facts(vmodel, facts, multiple_choice=multiple_choice))


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


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
    attribution_config: Any = None,
    progress: Any = None,
) -> dict[str, Any]:
    """All metrics of one update (the body of ``metrics.json`` minus run bookkeeping)."""

    report = progress or silent
    update.check_fits(model)
    report(0.05, "building full-precision and quantized variants")
    variants = build_variants(model, update, quant)
    sets = {"forget": split.forget, "retain": split.retain,
            "forget_paraphrase": split.forget_paraphrase, "retain_paraphrase": split.retain_paraphrase}
    acc: dict[str, dict[str, Any]] = {k: {} for k in sets if sets[k]}
    mc: dict[str, dict[str, Any]] = {"forget": {}}
    for i, (vname, vmodel) in enumerate(variants.items()):
        report(0.1 + 0.4 * i / len(variants), f"evaluating {vname}")
        for sname, facts in sets.items():
            if not facts:
                continue
            scores = _evaluate_variant(vname, vmodel, facts, quant, multiple_choice=(sname == "forget"))
            acc[sname][vname] = scores.top1
            if sname == "forget":
                mc["forget"][vname] = _finite(scores.mc)
    f = acc["forget"]
    metrics: dict[str, Any] = {
        "quant": quant.to_dict(),
        "forget": {
            "base_fp": f["base_fp"], "base_q": f["base_q"], "after_fp": f["after_fp"], "after_q": f["after_q"],
            "after_qbase_delta": f["after_qbase_delta"],
        },
        "retain": dict(acc["retain"]),
        "paraphrase": {k: v for k, v in acc.items() if k.endswith("paraphrase")},
        "multiple_choice": mc,
        "ptq_gap": f["after_q"] - f["after_fp"],
        "ptq_gap_decomposition": {
            "base_shift": f["after_qbase_delta"] - f["after_fp"],
            "rounding": f["after_q"] - f["after_qbase_delta"],
        },
    }
    report(0.55, "quantization analysis of the update")
    names = quantizable_parameters(model.hf, quant)
    qdeltas = {n: d for n, d in update.deltas.items() if n in names}
    comparison = compare_quantization(model.state(), qdeltas, names, quant,
                                      transposed=transposed_parameters(model.hf), progress=silent)
    overall = comparison.to_dict()["overall"]
    metrics.update({
        # Strict bucket overlap (code and block scale unchanged), as REFERENCE.md §2 defines
        # it, and code overlap (code unchanged), the number QUAIL's ">99.9%" refers to: a
        # dense update nudges almost every block's absmax, so the two differ a lot.
        "bucket_overlap": overall["bucket_overlap"],
        "code_overlap": 1.0 - overall["code_flips"] / max(1, overall["n_weights"]),
        "codes_changed": overall["code_flips"],
        "codes_changed_fraction": overall["code_flips"] / max(1, overall["n_weights"]),
        "params_changed": update.nnz(),
        "params_changed_unquantized": update.nnz() - sum(int((d != 0).sum()) for d in qdeltas.values()),
        "moved_code_changed_fraction": overall.get("changed_flip_fraction"),
        "absmax_changes": overall.get("absmax_changes"),
        "update_to_bin_width": {"median": overall.get("ratio_median"), "p90": overall.get("ratio_p90")},
        "update_norm": update.norm(),
        "quantization": comparison.to_dict(),
    })
    report(0.65, "retain KL")
    metrics["retain_kl"] = retain_kl(model, variants["after_fp"], split.retain)
    if oracle is not None:
        metrics["oracle"] = {"forget_fp": evaluate_facts(oracle, split.forget, multiple_choice=False).top1,
                             "retain_fp": evaluate_facts(oracle, split.retain, multiple_choice=False).top1}
    circuit_list = list(circuit) if circuit is not None else None
    if cad:
        report(0.7, "attribution before/after for CAD")
        metrics["cad"] = cad_for_variants(variants, split.forget, circuit_list, attribution_config, quant=quant)
    metrics["properties"] = report_card(metrics, thresholds)
    return metrics


def cad_for_variants(variants: dict[str, LoadedModel], forget: Any, circuit: list[Component] | None,
                     attribution_config: Any = None, quant: QuantConfig | None = None) -> dict[str, Any]:
    """CAD in full precision (base_fp vs after_fp) and quantized (base_q vs after_q).

    With ``quant`` (the quantizer that built ``base_q``) the base attributions are memoised
    across calls on the same model."""

    config = attribution_config or AttributionConfig()
    out: dict[str, Any] = {}
    for label, (b, a) in {"fp": ("base_fp", "after_fp"), "quantized": ("base_q", "after_q")}.items():
        def attribute_base(b: str = b) -> Any:
            return attribute(variants[b], forget, config, progress=silent)

        before = (base_memo(("attribute", b, variants[b].fingerprint, quant.label, tuple(forget), repr(config)),
                            attribute_base) if quant is not None else attribute_base())
        after = attribute(variants[a], forget, config, progress=silent)
        result = circuit_attribution_divergence(
            before.scores, after.scores, circuit=circuit,
            metric_before=before.clean_metric, metric_after=after.clean_metric,
        )
        out[label] = result.cad
        out[f"{label}_detail"] = result.to_dict()
    return out


def report_card(metrics: dict[str, Any], thresholds: Thresholds = Thresholds()) -> dict[str, dict[str, Any]]:
    """The four properties of REFERENCE.md §3 with pass/fail and margin (positive = passes by that much)."""
    f, r = metrics["forget"], metrics["retain"]
    forget_max = thresholds.forget_max
    if forget_max is None:
        oracle = metrics.get("oracle", {}).get("forget_fp")
        forget_max = oracle + 0.1 if oracle is not None else 0.2
        forget_max = min(forget_max, 0.5 * f["base_fp"])
    worst_forget = max(f["after_fp"], f["after_q"])
    drop = max(r["base_fp"] - r["after_fp"], r["base_q"] - r["after_q"])
    card: dict[str, dict[str, Any]] = {
        "forgetting": {"pass": worst_forget <= forget_max, "margin": forget_max - worst_forget,
                       "threshold": forget_max, "value": worst_forget},
        "retain": {"pass": drop <= thresholds.retain_tolerance, "margin": thresholds.retain_tolerance - drop,
                   "threshold": thresholds.retain_tolerance, "value": drop},
        "ptq": {"pass": metrics["ptq_gap"] <= thresholds.ptq_max_gap,
                "margin": thresholds.ptq_max_gap - metrics["ptq_gap"],
                "threshold": thresholds.ptq_max_gap, "value": metrics["ptq_gap"]},
    }
    if "cad" in metrics:
        worst_cad = min(metrics["cad"]["fp"], metrics["cad"]["quantized"])
        card["structural"] = {"pass": worst_cad >= thresholds.cad_min, "margin": worst_cad - thresholds.cad_min,
                              "threshold": thresholds.cad_min, "value": worst_cad}
    else:
        card["structural"] = {"pass": None, "margin": None, "threshold": thresholds.cad_min, "value": None}
    return card


PROPERTY_LABELS = {
    "forgetting": "forgetting (fp and quantized)",
    "retain": "retain preserved",
    "ptq": "PTQ gap ≤ threshold",
    "structural": "structural erasure (CAD)",
}


def report_card_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The report card as table rows: property, verdict (``PASS``/``fail``/``–`` when not
    measured), value, threshold, margin (positive = passes by that much)."""
    rows = []
    for name, p in metrics["properties"].items():
        verdict = "–" if p["pass"] is None else ("PASS" if p["pass"] else "fail")
        rows.append({"property": PROPERTY_LABELS.get(name, name), "verdict": verdict, "value": p["value"],
                     "threshold": p["threshold"], "margin": p["margin"]})
    return rows


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The headline numbers of a run in words, one line each (the CLI and the app print these)."""

    def fmt(x: Any) -> str:
        return "–" if x is None else f"{x:.3g}"

    d = metrics.get("ptq_gap_decomposition", {})
    ratio = metrics.get("update_to_bin_width", {})
    lines = [
        f"PTQ gap {metrics['ptq_gap']:+.3f} = base shift {d.get('base_shift', float('nan')):+.3f} "
        f"+ rounding {d.get('rounding', float('nan')):+.3f}",
        f"params changed {metrics.get('params_changed', 0):,} · codes changed {metrics.get('codes_changed', 0):,} "
        f"({100 * metrics.get('codes_changed_fraction', 0.0):.4f}%) · code overlap "
        f"{metrics.get('code_overlap', float('nan')):.6f} · bucket overlap {metrics.get('bucket_overlap', float('nan')):.6f}",
        f"|Δw|/bin width: median {fmt(ratio.get('median'))} · p90 {fmt(ratio.get('p90'))} · "
        f"moved weights whose code changed: {fmt(metrics.get('moved_code_changed_fraction'))}",
    ]
    if "retain_kl" in metrics:
        lines.append(f"retain KL {metrics['retain_kl']:.4g}")
    if "cad" in metrics:
        lines.append(f"CAD fp {metrics['cad']['fp']:.3f} · quantized {metrics['cad']['quantized']:.3f}")
    if "unlearning_seconds" in metrics and "seconds" in metrics:
        # where the time went: MANSU reports its phases, so slow runs can be read, not guessed at
        def secs(x: float) -> str:
            return f"{x:.1f}" if x >= 1 else f"{x:.2f}"

        phases = (metrics.get("diagnostics") or {}).get("seconds_by_phase") or {}
        detail = f" ({', '.join(f'{k} {secs(v)}' for k, v in phases.items())})" if phases else ""
        lines.append(f"time: unlearning {secs(metrics['unlearning_seconds'])} s{detail} · measuring "
                     f"{secs(metrics['seconds'] - metrics['unlearning_seconds'])} s")
    return lines


def thresholds_to_dict(t: Thresholds) -> dict[str, Any]:
    return asdict(t)
