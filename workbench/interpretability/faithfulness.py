"""How much of the clean behaviour a circuit of heads and MLPs carries alone, how much is
lost without it (:func:`faithfulness`), and how that grows with circuit size
(:func:`faithfulness_curve`); :class:`FaithfulnessMeter` keeps one set of pairs' baselines for
many circuits (a session's edits).

The embedding and unembedding are never ablated: a circuit of heads and MLPs can only
act on what the embedding writes (the subject enters the residual stream there) and can
only be read through the unembedding, so ablating them would measure the embedding, not
the circuit. The reference point is therefore the *floor* — every head and MLP ablated,
embedding and unembedding kept — not the fully corrupt run (see docs/SCIENCE.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from workbench.core.components import EMBED, LOGITS, Component, all_components
from workbench.core.errors import WorkbenchError
from workbench.core.progress import Progress, Steps
from workbench.data.facts import Fact
from workbench.interpretability.attribution import (
    AblationMetric,
    ActivationMeans,
    Attribution,
    CorruptActivations,
    PromptPairs,
    ablated_metric,
    corrupt_activations,
    dataset_means,
    make_prompt_pairs,
    metric_baselines,
)
from workbench.interpretability.circuit import Circuit, _check_fits, component_order
from workbench.models.loaded import LoadedModel

Ablation = Literal["corrupt", "mean"]


@dataclass(frozen=True)
class Faithfulness:
    """How well a circuit accounts for the clean behaviour (embedding and unembedding always kept).

    Attributes:
        recovered: ``(m_circuit_only - m_floor) / (m_clean - m_floor)``: every head and MLP
            outside the circuit ablated. 1 = the circuit alone reproduces the clean metric,
            0 = no better than no heads and MLPs at all. Not clipped: a circuit can
            overshoot (> 1) or do worse than the floor (< 0).
        drop: ``(m_clean - m_without_circuit) / (m_clean - m_floor)``: the circuit's heads and
            MLPs ablated, everything else kept. 1 = removing the circuit loses everything the
            heads and MLPs add, 0 = nothing is lost.
        clean_metric, corrupt_metric: the clean runs and the baseline (corrupt or mean) runs.
        floor_metric: every head and MLP ablated, the embedding kept.
        circuit_only_metric, without_circuit_metric: the two ablated runs.
        ablation: ``"corrupt"`` (each pair's baseline activations) or ``"mean"`` (dataset means).
        n_components: size of the circuit (as selected; the embed is always kept regardless).
        metric: ``logit_diff``, ``logprob`` or ``kl`` (minus the KL divergence from the clean model).
    """

    recovered: float
    drop: float
    clean_metric: float
    corrupt_metric: float
    circuit_only_metric: float
    without_circuit_metric: float
    ablation: str
    n_components: int
    floor_metric: float = math.nan
    metric: str = "logit_diff"


def _pairs(model: LoadedModel, pairs: PromptPairs | Sequence[Fact]) -> PromptPairs:
    return pairs if isinstance(pairs, PromptPairs) else make_prompt_pairs(model, list(pairs))


def _check(circuit: Circuit, model: LoadedModel, ablation: str, allow_other_model: bool) -> None:
    if ablation not in ("corrupt", "mean"):
        raise WorkbenchError(f"ablation must be 'corrupt' or 'mean', got {ablation!r}")
    if not allow_other_model and circuit.model_fingerprint != model.fingerprint:
        raise WorkbenchError(
            f"the circuit was computed on a model with fingerprint {circuit.model_fingerprint}, "
            f"not on {model.name!r} ({model.fingerprint})"
        )
    for comp in circuit.selected:
        _check_fits(comp, model.n_layers, model.n_heads, "circuit: ")


KEEP_CORRUPT_BYTES = 256 * 2**20
"""Largest corrupt-run activations a :class:`FaithfulnessMeter` keeps, on the model's device (66 MiB
on SmolLM2's default forget set); above it every ablated run makes its own corrupt run, as before."""


class FaithfulnessMeter:
    """The baselines of one set of pairs — dataset means, clean and baseline metrics, the floor —
    measured once, so that every circuit then costs two ablated runs (a curve's k points, a
    session's edits); with ``corrupt`` ablation the pairs' corrupt runs are kept too (up to
    :data:`KEEP_CORRUPT_BYTES`), so each of those runs is one patched forward.
    Raises :class:`WorkbenchError` when faithfulness is undefined on ``pairs``."""

    def __init__(self, model: LoadedModel, pairs: PromptPairs, ablation: Ablation = "corrupt",
                 metric: AblationMetric | None = None):
        if ablation not in ("corrupt", "mean"):
            raise WorkbenchError(f"ablation must be 'corrupt' or 'mean', got {ablation!r}")
        # metric_baselines is called without a metric when none is given: the pairs' own.
        self.model, self.pairs = model, pairs
        self.ablation: Ablation = ablation
        self.metric_arg: AblationMetric | None = metric
        self.metric: str = metric or pairs.metric
        self._corrupt_runs: CorruptActivations | None = None
        self._corrupt_tried = False
        needs_means = ablation == "mean" or pairs.has_mean
        self.means: ActivationMeans | None = dataset_means(model, pairs) if needs_means else None
        self.everything = set(all_components(model.n_layers, model.n_heads, include_embed=True))
        # Given the means just taken, metric_baselines does not take them again (a pass over the pairs).
        baselines = (metric_baselines(model, pairs, means=self.means) if metric is None
                     else metric_baselines(model, pairs, metric=metric, means=self.means))
        clean, corrupt = (float(x) for x in baselines)
        self.clean, self.corrupt = clean, corrupt
        self.floor = self.run({EMBED})
        gap = clean - self.floor
        if not math.isfinite(gap) or abs(gap) <= 1e-6 * max(1.0, abs(clean), abs(self.floor)):
            raise WorkbenchError(
                f"faithfulness is undefined: the clean metric ({clean:.6g}) equals the corrupt metric reached "
                f"with every head and MLP ablated ({self.floor:.6g}), so there is no behaviour for a circuit "
                "to recover; use prompt pairs whose corrupt answer differs"
            )
        self.gap = gap

    def run(self, keep: set[Component]) -> float:
        return float(ablated_metric(self.model, self.pairs, keep=keep, ablation=self.ablation,
                                    metric=self.metric_arg, means=self.means, corrupt=self._corrupt()))

    def _corrupt(self) -> CorruptActivations | None:
        if self.ablation == "corrupt" and not self._corrupt_tried:
            self._corrupt_runs = corrupt_activations(self.model, self.pairs, max_bytes=KEEP_CORRUPT_BYTES)
            self._corrupt_tried = True
        return self._corrupt_runs

    @property
    def keeps_corrupt_runs(self) -> bool:
        """Whether the pairs' corrupt-run activations are held (taken at the first ablated run)."""
        return self._corrupt_runs is not None

    def release(self) -> None:
        """Let the kept corrupt-run activations go (e.g. before unlearning, which needs the memory);
        the next ablated run takes them again. The baselines stay."""
        self._corrupt_runs, self._corrupt_tried = None, False

    def measures(self, model: LoadedModel, pairs: PromptPairs, ablation: str, metric: str | None) -> bool:
        """Whether this meter's baselines are those of ``model``, ``pairs``, ``ablation`` and ``metric``."""
        return (self.model is model and self.pairs is pairs and self.ablation == ablation
                and self.metric == (metric or pairs.metric))

    def of(self, circuit: Circuit, *, allow_other_model: bool = False) -> Faithfulness:
        """:func:`faithfulness` of ``circuit`` on this meter's model, pairs, ablation and metric."""
        _check(circuit, self.model, self.ablation, allow_other_model)
        return self.measure(set(circuit.selected))

    def measure(self, selected: set[Component]) -> Faithfulness:
        heads_mlps = {c for c in selected if c not in (EMBED, LOGITS)}
        circuit_only = self.run(heads_mlps | {EMBED})
        without = self.run(self.everything - heads_mlps)
        return Faithfulness(
            recovered=(circuit_only - self.floor) / self.gap,
            drop=(self.clean - without) / self.gap,
            clean_metric=self.clean,
            corrupt_metric=self.corrupt,
            circuit_only_metric=circuit_only,
            without_circuit_metric=without,
            ablation=self.ablation,
            n_components=len(selected),
            floor_metric=self.floor,
            metric=self.metric,
        )


def faithfulness(
    circuit: Circuit,
    model: LoadedModel,
    pairs: PromptPairs | Sequence[Fact],
    ablation: Ablation = "corrupt",
    *,
    metric: AblationMetric | None = None,
    allow_other_model: bool = False,
) -> Faithfulness:
    """Ablate every head and MLP outside the circuit (→ ``recovered``) and the circuit's
    own (→ ``drop``), the embedding and unembedding always kept (module docstring).

    ``pairs`` are the clean/baseline pairs of
    :func:`workbench.interpretability.attribution.make_prompt_pairs`, or facts (paired here
    with that function). Uses :func:`workbench.interpretability.attribution.ablated_metric`.
    ``metric`` overrides the pairs' metric (``kl`` included). The circuit must come from
    ``model`` (same fingerprint) unless ``allow_other_model`` (e.g. asking whether a
    base-model circuit still carries the behaviour in an unlearned model of the same shape).
    """
    _check(circuit, model, ablation, allow_other_model)
    pairs = _pairs(model, pairs)
    return FaithfulnessMeter(model, pairs, ablation, metric).measure(set(circuit.selected))


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness of the top-k heads and MLPs of a ranking, for k = 1..N.

    Attributes:
        ranking: the heads and MLPs by ``|score|``, strongest first (the embed is always kept).
        ks: the circuit sizes measured.
        recovered, drop: per k, as in :class:`Faithfulness`.
        ablation, metric: how.
        clean_metric, floor_metric: the two ends of the scale.
    """

    ranking: tuple[Component, ...]
    ks: tuple[int, ...]
    recovered: tuple[float, ...]
    drop: tuple[float, ...]
    ablation: str
    metric: str
    clean_metric: float
    floor_metric: float

    def rows(self) -> list[dict[str, object]]:
        """One row per k: k, the component added, recovered, drop."""
        return [{"k": k, "added": self.ranking[k - 1].name, "recovered": r, "drop": d}
                for k, r, d in zip(self.ks, self.recovered, self.drop)]


def faithfulness_curve(
    source: Circuit | Attribution,
    model: LoadedModel,
    pairs: PromptPairs | Sequence[Fact],
    *,
    max_k: int = 20,
    ablation: Ablation = "corrupt",
    metric: AblationMetric | None = None,
    allow_other_model: bool = False,
    progress: Progress | None = None,
    meter: FaithfulnessMeter | None = None,
) -> FaithfulnessCurve:
    """Faithfulness of the top-k heads and MLPs (by ``|score|`` of ``source``) for k = 1..max_k
    (at most every head and MLP): two ablated runs per k, the baselines shared. ``meter``: the
    baselines already measured on this model, pairs, ablation and metric (a session's readout)."""
    if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
        raise WorkbenchError(f"max_k must be an integer >= 1, got {max_k!r}")
    circuit = source if isinstance(source, Circuit) else Circuit.from_attribution(source)
    _check(circuit, model, ablation, allow_other_model)
    pairs = _pairs(model, pairs)
    if meter is not None and not meter.measures(model, pairs, ablation, metric):
        raise WorkbenchError("the faithfulness meter given was measured on another model, pairs, ablation or metric "
                             "than this curve's")
    ranking = _ranking(circuit.scores)
    ks = tuple(range(1, min(max_k, len(ranking)) + 1))
    tracker = Steps(len(ks) + 1, "faithfulness curve", progress)
    try:
        ablator = meter if meter is not None else FaithfulnessMeter(model, pairs, ablation, metric)
        tracker.step("baselines")
        points = []
        for k in ks:
            points.append(ablator.measure(set(ranking[:k])))
            tracker.step(f"top-{k}")
    finally:
        tracker.close()
    return FaithfulnessCurve(
        ranking=tuple(ranking[: len(ks)]), ks=ks,
        recovered=tuple(p.recovered for p in points), drop=tuple(p.drop for p in points),
        ablation=ablation, metric=ablator.metric, clean_metric=ablator.clean, floor_metric=ablator.floor,
    )


def _ranking(scores: Mapping[Component, float]) -> list[Component]:
    comps = [c for c, s in scores.items() if c not in (EMBED, LOGITS) and math.isfinite(s)]
    return sorted(comps, key=lambda c: (-abs(scores[c]), component_order(c)))
