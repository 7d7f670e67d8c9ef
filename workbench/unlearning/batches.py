"""The forget and retain sets as tensors on the model's device, with the frozen base's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.core.device import module_device
from workbench.core.errors import WorkbenchError
from workbench.data.facts import FactSplit
from workbench.models.loaded import LoadedModel
from workbench.models.scoring import FactBatch, span_logits


@dataclass(frozen=True)
class Batches:
    """The split as tensors, plus the frozen base's answer-span logits on them
    (``[n, A, vocab]``, for reference-based losses)."""

    forget: FactBatch
    retain: FactBatch
    ref_forget: torch.Tensor
    ref_retain: torch.Tensor

    @classmethod
    def build(cls, model: LoadedModel, split: FactSplit) -> Batches:
        if not split.forget:
            raise WorkbenchError("the forget set is empty")
        if not split.retain:
            raise WorkbenchError("the retain set is empty")

        # on the model's device: every loss and evaluation of a run then stays there
        device = module_device(model.hf)
        forget = FactBatch.from_facts(model.tokenizer, split.forget).to(device)
        retain = FactBatch.from_facts(model.tokenizer, split.retain).to(device)
        with torch.no_grad():
            ref_f = span_logits(model.hf, forget)
            ref_r = span_logits(model.hf, retain)
        return cls(forget, retain, ref_f, ref_r)
