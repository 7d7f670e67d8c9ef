"""NPO + KLR: NPO on forget, KL to the frozen base on retain."""

from __future__ import annotations

from workbench.unlearning.methods.ga_klr import GradAscentKLR
from workbench.unlearning.methods.npo import NPO


class NpoKLR(NPO, GradAscentKLR):
    """NPO's forget term (from :class:`NPO`), the KL retain term (from :class:`GradAscentKLR`)."""

    name = "npo_klr"
    label = "NPO + KL retain"
    summary = "NPO + retain KL"
