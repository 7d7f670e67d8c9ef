"""SimNPO: reference-free, length-normalised NPO, −(2/β)·log σ(−β·log p_θ/|y| − γ)."""

from __future__ import annotations

import torch

from workbench.models.scoring import FactBatch
from workbench.unlearning import losses
from workbench.unlearning.methods.ga import GradientAscent


class SimNPO(GradientAscent):
    name = "simnpo"
    label = "SimNPO"
    summary = "reference-free, length-normalised NPO (β = 0.1, γ = 0)"

    def forget_loss(self, logits: torch.Tensor, ref_logits: torch.Tensor | None, batch: FactBatch) -> torch.Tensor:
        return losses.simnpo(logits, batch.targets, beta=self.config.beta, gamma=self.config.gamma,
                             mask=batch.mask)
