"""GA + KLR: gradient ascent on forget, KL to the frozen base on retain."""

from __future__ import annotations

import torch

from workbench.models.scoring import FactBatch, span_logits
from workbench.unlearning import losses
from workbench.unlearning.methods.ga import GradientAscent
from workbench.unlearning.objectives import given


class GradAscentKLR(GradientAscent):
    name = "ga_klr"
    label = "GA + KL retain"
    summary = "GA + KL(p_ref ‖ p_θ) on retain"
    retain_reference = True

    def retain_loss(self, model: torch.nn.Module, batch: FactBatch, ref_logits: torch.Tensor | None) -> torch.Tensor:
        return losses.kl_to_reference(span_logits(model, batch), given(ref_logits, self.name), batch.mask)
