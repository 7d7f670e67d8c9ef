"""The gradient-ascent family's shape: a forget loss, plus α times a retain loss.

Each baseline of the family (:mod:`workbench.unlearning.methods`) is one subclass of
:class:`ForgetRetainObjective` that overrides only its forget or retain term, as in
open-unlearning's trainers; the shared loop (:mod:`workbench.unlearning.loop`) minimises it.
Defaults follow the literature scaled to small models: retain weight α = 1, NPO β = 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from workbench.core.checks import Range, check_config
from workbench.core.errors import WorkbenchError
from workbench.models.scoring import FactBatch, span_logits


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
        check_config(self, {"alpha": Range(0, 10**6), "beta": Range(0, 10**6, low_open=True),
                            "gamma": Range(-(10**6), 10**6)})


class ForgetRetainObjective:
    """``loss = forget_loss + α · retain_loss`` (no retain term when :meth:`retain_loss` is None).

    Called by the shared loop as ``objective(model, forget batch, its reference logits,
    retain batch, its reference logits)``. Logits are the answer spans, teacher-forced
    (``[n, A, vocab]``, :func:`~workbench.models.scoring.span_logits`); the terms read the
    batch's ``targets`` and ``mask``, so a multi-token answer counts with all its tokens.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    summary: ClassVar[str]
    forget_reference: ClassVar[bool] = False
    """Whether :meth:`forget_loss` reads the reference logits (else it is given ``None``)."""
    retain_reference: ClassVar[bool] = False
    """Whether :meth:`retain_loss` reads the reference logits (else it is given ``None``)."""

    def __init__(self, config: BaselineConfig | None = None) -> None:
        self.config = config or BaselineConfig()

    def forget_loss(self, logits: torch.Tensor, ref_logits: torch.Tensor | None, batch: FactBatch) -> torch.Tensor:
        raise NotImplementedError

    def retain_loss(self, model: torch.nn.Module, batch: FactBatch,
                    ref_logits: torch.Tensor | None) -> torch.Tensor | None:
        """The retain term, or ``None`` for a forget-only method (no retain forward is run then)."""
        return None

    def __call__(self, model: torch.nn.Module, fb: FactBatch, ref_f: torch.Tensor | None, rb: FactBatch,
                 ref_r: torch.Tensor | None) -> torch.Tensor:
        loss = self.forget_loss(span_logits(model, fb), reference_span(ref_f, fb), fb)
        retain = self.retain_loss(model, rb, reference_span(ref_r, rb))
        return loss if retain is None else loss + self.config.alpha * retain


def reference_span(ref_logits: torch.Tensor | None, batch: FactBatch) -> torch.Tensor | None:
    """The reference logits' answer positions that ``batch`` keeps (a sampled subset trims the
    span to its own longest answer); ``None`` when not given."""
    return None if ref_logits is None else ref_logits[:, : batch.targets.shape[1]]


def given(ref_logits: torch.Tensor | None, method: str) -> torch.Tensor:
    """``ref_logits``, which a loss reads: a method whose loss reads them but does not say so
    (``forget_reference``/``retain_reference``) gets this error instead of a wrong loss."""
    if ref_logits is None:
        raise WorkbenchError(f"{method}: a loss read the reference logits without declaring it")
    return ref_logits
