"""What the gradient loop measures beside the forget accuracy its stopping rule reads: the retain
accuracy on a fixed sample, and the forget and retain accuracy of the model a user would deploy,
Q(w+Δ). They fill the live progress and the run's history (``--report-to`` logs them per step);
no decision reads them, so a run takes the same steps with them or without them.

Steps, in the order a reading takes them: :func:`deployed_quantized` (the quantized after-model,
as the final measurement builds it), then :func:`take_reading`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from workbench.core.checks import Range, check_config
from workbench.core.errors import WorkbenchError
from workbench.models.loaded import LoadedModel
from workbench.models.scoring import top1
from workbench.models.update import stored_sum
from workbench.quant import QuantConfig, quantizable_parameters
from workbench.quant.compact import compact_quantized_copy
from workbench.unlearning.batches import RETAIN_SAMPLE, Batches, ScoredSet


@dataclass(frozen=True)
class LoopReadings:
    """How often the gradient loop takes a reading (:func:`take_reading`).

    Attributes:
        every: every this many steps, and at the step a run ends on; 0: never. A reading is a
            quantizer pass and forwards over the sample (twice) and the forget set: on SmolLM2
            on two threads 8–10 s, most of a GradDiff step (9–13 s), so every tenth step adds
            ~10% to a run's wall time (docs/results/bench.md); it is not counted in the run's
            ``seconds``.
        retain_sample: retain facts read (the same seeded sample at every reading; by default
            the sample MANSU's retain guard reads, :meth:`Batches.retain_sample`).
    """

    every: int = 10
    retain_sample: int = RETAIN_SAMPLE

    def __post_init__(self) -> None:
        check_config(self, {"every": Range(0, 100_000, integer=True), "retain_sample": Range(1, 10**6, integer=True)})

    def due(self, step: int, *, last: bool) -> bool:
        """Is a reading taken at ``step`` (``last``: the step the run ends on)?"""
        return self.every > 0 and (last or step % self.every == 0)

    def sample(self, batches: Batches) -> ScoredSet:
        """The retain facts every reading of a run measures."""
        return batches.retain_sample(self.retain_sample)


class StoredAfter(Mapping[str, torch.Tensor]):
    """The after-model's tensors as a saved model stores them: ``w + (after − w)`` summed in
    float32 and rounded to ``w``'s dtype (:func:`~workbench.models.update.stored_sum`), exactly
    the final measurement's ``Update.between(base, after).after_state(base)``; computed when
    read, so a caller that reads one at a time holds one at a time."""

    def __init__(self, base: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> None:
        self._base, self._after = base, after

    def __getitem__(self, name: str) -> torch.Tensor:
        base, after = self._base[name].detach(), self._after[name].detach()
        if after.shape != base.shape:
            raise WorkbenchError(f"a trained value of shape {tuple(after.shape)} for {name!r}, a weight of shape "
                                 f"{tuple(base.shape)}")
        return stored_sum(base, after.float() - base.float())

    def __contains__(self, name: object) -> bool:  # without computing the value (Mapping's would)
        return name in self._after

    def __iter__(self) -> Iterator[str]:
        return iter(self._after)

    def __len__(self) -> int:
        return len(self._after)


def deployed_quantized(model: LoadedModel, after: Mapping[str, torch.Tensor], quant: QuantConfig) -> torch.nn.Module:
    """Q(w+Δ) for the trained tensors ``after`` (the base's names): each stored as a saved model
    would be (:class:`StoredAfter`), then quantized; held as codes (half a byte per 4-bit weight),
    so the copy holds no second model (``after`` itself may be one: LoRA's merged copy, which the
    run's end makes too). Trained tensors the quantizer leaves alone (``trainable="all"``:
    embeddings, norms, biases) are set as stored where they changed. The base is not modified."""
    base = model.state()
    stored = StoredAfter(base, after)
    deployed = compact_quantized_copy(model.hf, quant, materialized=(), weights=stored)
    quantized = set(quantizable_parameters(model.hf, quant))
    with torch.no_grad():
        for name in after:
            # an unchanged tensor is stored as the base's (w + 0): keep sharing it, not a copy
            if name not in quantized and not torch.equal(after[name].detach().float(), base[name].detach().float()):
                deployed.get_parameter(name).data = stored[name]
    return deployed


@dataclass(frozen=True)
class Reading:
    """One reading: retain on the sample, in full precision (the training copy, as the loop's
    forget accuracy: before the after-model is rounded to a 16-bit storage dtype) and at Q(w+Δ);
    forget at Q(w+Δ) (top-1, and multiple choice on a multiple-choice forget set)."""

    retain: float
    retain_q: float
    forget_top1_q: float
    forget_mc_q: float | None
    retain_key: str  # retain_top1, or retain_mc on a multiple-choice retain set

    def record(self) -> dict[str, float]:
        """The history entries (the names MANSU's rounds and the trackers use)."""
        out = {self.retain_key: self.retain, f"{self.retain_key}_q": self.retain_q, "forget_top1_q": self.forget_top1_q}
        if self.forget_mc_q is not None:
            out["forget_mc_q"] = self.forget_mc_q
        return out


def take_reading(model: LoadedModel, batches: Batches, quant: QuantConfig, work: torch.nn.Module,
                 trained: Callable[[], Mapping[str, torch.Tensor]], sample: ScoredSet) -> Reading:
    """Read the training copy ``work`` (in eval mode) and its deployed Q(w+Δ); ``trained()``
    gives the after-tensors under the base's names (the loop's ``finish``)."""
    with torch.no_grad():
        retain = sample.accuracy(work)
        deployed = deployed_quantized(model, trained(), quant)
        forget_mc_q = batches.forget_accuracy(deployed) if batches.choices is not None else None
        return Reading(retain=retain, retain_q=sample.accuracy(deployed), forget_top1_q=top1(deployed, batches.forget),
                       forget_mc_q=forget_mc_q, retain_key=f"retain_{sample.criterion}")
