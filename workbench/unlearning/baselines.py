"""Gradient unlearning baselines (REFERENCE.md §4), as objectives for the shared loop.

Defaults follow the literature scaled to small models: Adam, retain weight α = 1,
NPO β = 0.1. Every method stops by the shared rule of :mod:`workbench.unlearning.loop`,
so methods are compared at equal full-precision forgetting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.unlearning import losses
from workbench.unlearning.batches import FactBatch, answer_logits
from workbench.unlearning.loop import Objective


@dataclass(frozen=True)
class BaselineConfig:
    """Loss weights of the baselines.

    Attributes:
        alpha: weight of the retain term (GDR: NLL on retain; KLR: KL to the base on retain).
        beta: NPO / SimNPO inverse temperature.
        gamma: SimNPO reward margin.
    """

    alpha: float = 1.0
    beta: float = 0.1
    gamma: float = 0.0

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise WorkbenchError(f"alpha must be >= 0, got {self.alpha}")
        if not self.beta > 0:
            raise WorkbenchError(f"beta must be > 0, got {self.beta}")


def objective_for(method: str, cfg: BaselineConfig = BaselineConfig()) -> Objective:
    """The loss of a named baseline (``ga``, ``graddiff``, ``ga_klr``, ``npo``, ``npo_gdr``, ``npo_klr``, ``simnpo``)."""

    def forget_term(logits: torch.Tensor, ref: torch.Tensor, batch: FactBatch) -> torch.Tensor:
        if method.startswith("npo"):
            return losses.npo(logits, ref, batch.answers, beta=cfg.beta)
        if method == "simnpo":
            return losses.simnpo(logits, batch.answers, beta=cfg.beta, gamma=cfg.gamma)
        return losses.gradient_ascent(logits, batch.answers)

    retain_kind = {"ga": None, "graddiff": "gdr", "ga_klr": "klr", "npo": None, "npo_gdr": "gdr",
                   "npo_klr": "klr", "simnpo": None}
    if method not in retain_kind:
        raise WorkbenchError(f"unknown baseline {method!r}; choose from {', '.join(retain_kind)}")
    kind = retain_kind[method]

    def objective(model: torch.nn.Module, fb: FactBatch, ref_f: torch.Tensor, rb: FactBatch, ref_r: torch.Tensor) -> torch.Tensor:
        loss = forget_term(answer_logits(model, fb), ref_f, fb)
        if kind == "gdr":
            loss = loss + cfg.alpha * losses.nll(answer_logits(model, rb), rb.answers)
        elif kind == "klr":
            loss = loss + cfg.alpha * losses.kl_to_reference(answer_logits(model, rb), ref_r)
        return loss

    return objective
