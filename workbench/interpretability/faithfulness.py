"""How much of the clean-vs-corrupt behaviour a circuit carries alone, and how much is lost
without it (:func:`faithfulness`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from workbench.core.components import all_components
from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact
from workbench.interpretability.attribution import PromptPairs, ablated_metric, make_prompt_pairs, metric_baselines
from workbench.interpretability.circuit import Circuit, _check_fits
from workbench.models.loaded import LoadedModel


@dataclass(frozen=True)
class Faithfulness:
    """How well a circuit accounts for the clean-vs-corrupt behaviour.

    Attributes:
        recovered: ``(m_circuit_only - m_corrupt) / (m_clean - m_corrupt)``, with everything
            outside the circuit ablated: 1 = the circuit alone reproduces the clean metric,
            0 = no better than the corrupt run.
        drop: ``(m_clean - m_without_circuit) / (m_clean - m_corrupt)``, with the circuit
            itself ablated and everything else kept: 1 = removing the circuit loses the
            whole gap, 0 = nothing is lost.
        clean_metric, corrupt_metric: the two baselines.
        circuit_only_metric: metric with only the circuit kept.
        without_circuit_metric: metric with the circuit ablated.
        ablation: ``"corrupt"`` (patch in corrupt-run activations) or ``"mean"``.
        n_components: size of the circuit.
    """

    recovered: float
    drop: float
    clean_metric: float
    corrupt_metric: float
    circuit_only_metric: float
    without_circuit_metric: float
    ablation: str
    n_components: int


def faithfulness(
    circuit: Circuit,
    model: LoadedModel,
    pairs: PromptPairs | Sequence[Fact],
    ablation: Literal["corrupt", "mean"] = "corrupt",
    *,
    metric: str | None = None,
    allow_other_model: bool = False,
) -> Faithfulness:
    """Ablate everything outside the circuit (→ ``recovered``) and the circuit itself (→ ``drop``).

    ``pairs`` are the clean/corrupt prompt pairs of
    :func:`workbench.interpretability.attribution.make_prompt_pairs`, or facts (paired here with
    that function). Uses :func:`workbench.interpretability.attribution.ablated_metric` with the
    kept set; the writer components are the model's embed, heads and MLPs. ``metric`` overrides the pairs'
    metric (default: the one the pairs were built for). The circuit must come from
    ``model`` (same fingerprint) unless ``allow_other_model`` (e.g. asking whether a
    base-model circuit still carries the behaviour in an unlearned model of the same shape).
    """

    if not isinstance(pairs, PromptPairs):
        pairs = make_prompt_pairs(model, list(pairs))
    if ablation not in ("corrupt", "mean"):
        raise WorkbenchError(f"ablation must be 'corrupt' or 'mean', got {ablation!r}")
    if not allow_other_model and circuit.model_fingerprint != model.fingerprint:
        raise WorkbenchError(
            f"the circuit was computed on a model with fingerprint {circuit.model_fingerprint}, "
            f"not on {model.name!r} ({model.fingerprint})"
        )
    keep = circuit.selected
    for comp in keep:
        _check_fits(comp, model.n_layers, model.n_heads, "circuit: ")
    everything = set(all_components(model.n_layers, model.n_heads, include_embed=True))
    extra: dict[str, Any] = {} if metric is None else {"metric": metric}
    clean, corrupt = (float(x) for x in metric_baselines(model, pairs, **extra))
    gap = clean - corrupt
    if not math.isfinite(gap) or abs(gap) <= 1e-6 * max(1.0, abs(clean), abs(corrupt)):
        raise WorkbenchError(
            f"faithfulness is undefined: the clean metric ({clean:.6g}) equals the corrupt metric "
            f"({corrupt:.6g}), so there is no behaviour for the circuit to recover; use prompt "
            "pairs whose corrupt answer differs"
        )
    circuit_only = float(ablated_metric(model, pairs, keep=set(keep), ablation=ablation, **extra))
    without = float(ablated_metric(model, pairs, keep=everything - set(keep), ablation=ablation, **extra))
    return Faithfulness(
        recovered=(circuit_only - corrupt) / gap,
        drop=(clean - without) / gap,
        clean_metric=clean,
        corrupt_metric=corrupt,
        circuit_only_metric=circuit_only,
        without_circuit_metric=without,
        ablation=ablation,
        n_components=len(keep),
    )
