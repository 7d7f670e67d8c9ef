"""NPO + GDR: NPO on forget, NLL on retain."""

from __future__ import annotations

from workbench.unlearning.methods.graddiff import GradDiff
from workbench.unlearning.methods.npo import NPO


class NpoGDR(NPO, GradDiff):
    """NPO's forget term (from :class:`NPO`), GradDiff's retain term (from :class:`GradDiff`)."""

    name = "npo_gdr"
    label = "NPO + GD retain"
    summary = "NPO + retain NLL"
