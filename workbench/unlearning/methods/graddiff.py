"""GradDiff: gradient ascent on forget plus gradient descent on retain (GA + GDR)."""

from __future__ import annotations

import torch

from workbench.models.scoring import FactBatch, span_logits
from workbench.unlearning import losses
from workbench.unlearning.methods.ga import GradientAscent


class GradDiff(GradientAscent):
    name = "graddiff"
    label = "GradDiff"
    summary = "GA + GDR: −NLL_f + α·NLL_r"

    def retain_loss(self, model: torch.nn.Module, batch: FactBatch, ref_logits: torch.Tensor | None) -> torch.Tensor:
        return losses.nll(span_logits(model, batch), batch.targets, batch.mask)
