"""Copies of a module that share its weights: the workbench's only way of copying a model.

A bridge, a quantized variant, an after-model or MANSU's working model differs from the base
in a few tensors at most; :func:`sharing_copy` copies the module tree and points its
parameters at the base's storage, so each costs only the tensors that differ (issue 17:
memory bounded by the work, not by the model).
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def sharing_copy(module: torch.nn.Module, *, same_parameters: bool = False) -> Any:
    """A copy of ``module``'s tree whose parameters use the original's storage (no weight is copied).

    With ``same_parameters`` the copy holds the very ``Parameter`` objects of ``module`` (a
    bridge booted on it follows every later weight swap of ``module``); otherwise each is a
    new frozen ``Parameter`` over the same tensor, so replacing one in the copy
    (``copy.get_parameter(name).data = t``) leaves ``module`` untouched. Writing *into* a
    shared tensor in place (``copy_``) would change both: give such a parameter its own
    tensor first. Buffers (rotary tables, masks) are small and copied. Tied weights stay tied.
    """
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = p if same_parameters else torch.nn.Parameter(p.detach(), requires_grad=False)
    return copy.deepcopy(module, memo)
