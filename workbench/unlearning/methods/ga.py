"""GA: gradient ascent, −NLL on the forget set (pushes the answers' likelihood down without bound)."""

from __future__ import annotations

import torch

from workbench.models.scoring import FactBatch
from workbench.unlearning import losses
from workbench.unlearning.objectives import ForgetRetainObjective


class GradientAscent(ForgetRetainObjective):
    name = "ga"
    label = "gradient ascent"
    summary = "gradient ascent: −NLL on forget"

    def forget_loss(self, logits: torch.Tensor, ref_logits: torch.Tensor | None, batch: FactBatch) -> torch.Tensor:
        return losses.gradient_ascent(logits, batch.targets, batch.mask)
