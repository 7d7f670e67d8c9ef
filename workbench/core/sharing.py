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


def widened_copy(module: torch.nn.Module, replace: dict[str, torch.Tensor] | None = None) -> Any:
    """A copy of ``module`` that computes in float32 while holding one module's float32 weights at a time.

    Each module's own parameters are cast to float32 (or taken from ``replace``, by parameter
    name, cast to float32) just before its forward and put back after it, so a forward runs
    exactly as a float32 copy of the whole model would, but holds one extra weight, not a
    float32 model (twice a 16-bit model's bytes). The copy shares ``module``'s storage
    (:func:`sharing_copy`); ``module`` itself is never touched. For a model whose modules use
    only their own weights in their forward (every transformers causal LM the workbench
    supports; tested against a float32 copy).
    """
    copy_ = sharing_copy(module)
    replace = replace or {}
    stash: dict[int, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
    # a tied weight has several names: a replacement may use any of them
    replaced = {id(p): replace[n] for n, p in copy_.named_parameters(remove_duplicate=False) if n in replace}

    def widen(m: torch.nn.Module, _args: Any) -> None:
        held = []
        for p in m.parameters(recurse=False):
            held.append((p, p.data))
            p.data = replaced.get(id(p), p.data).float()
        stash[id(m)] = held

    def restore(m: torch.nn.Module, _args: Any, _out: Any) -> None:
        for p, data in stash.pop(id(m), []):
            p.data = data

    for m in copy_.modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.register_forward_pre_hook(widen)
            m.register_forward_hook(restore)
    return copy_
