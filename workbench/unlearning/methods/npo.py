"""NPO: negative preference optimisation on forget, −(2/β)·log σ(−β(log p_θ − log p_ref))."""

from __future__ import annotations

import torch

from workbench.models.scoring import FactBatch
from workbench.unlearning import losses
from workbench.unlearning.methods.ga import GradientAscent
from workbench.unlearning.objectives import given


class NPO(GradientAscent):
    name = "npo"
    label = "NPO"
    summary = "NPO (β = 0.1)"
    forget_reference = True

    def forget_loss(self, logits: torch.Tensor, ref_logits: torch.Tensor | None, batch: FactBatch) -> torch.Tensor:
        return losses.npo(logits, given(ref_logits, self.name), batch.targets, beta=self.config.beta, mask=batch.mask)
