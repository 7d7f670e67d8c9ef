"""One unlearning baseline per module.

The gradient-ascent family (``ga``, ``graddiff``, ``ga_klr``, ``npo``, ``npo_gdr``,
``npo_klr``, ``simnpo``) are objectives for the shared loop; RMU, SURE, QUAIL and LoRA
have their own run functions. :data:`GRADIENT_OBJECTIVES` lists the family by name (SURE
and LoRA train one of them); the full method registry is :mod:`workbench.unlearning.registry`.
"""

from __future__ import annotations

from workbench.unlearning.methods.ga import GradientAscent
from workbench.unlearning.methods.ga_klr import GradAscentKLR
from workbench.unlearning.methods.graddiff import GradDiff
from workbench.unlearning.methods.npo import NPO
from workbench.unlearning.methods.npo_gdr import NpoGDR
from workbench.unlearning.methods.npo_klr import NpoKLR
from workbench.unlearning.methods.simnpo import SimNPO
from workbench.unlearning.objectives import ForgetRetainObjective

GRADIENT_OBJECTIVES: dict[str, type[ForgetRetainObjective]] = {
    cls.name: cls for cls in (GradientAscent, GradDiff, GradAscentKLR, NPO, NpoGDR, NpoKLR, SimNPO)
}
"""The gradient-ascent family by name, in the order tables list them."""
