"""Recomputing each block's forward in the backward (activation checkpointing), and measuring
what a forward saves for its backward (issue 17).

A backward needs what its forward saved: per token and block, the norms' inputs, q/k/v, the
attention pattern, the MLP's hidden values. On SmolLM2 one fact of 21 tokens saves ~20 MiB in
float32 and one of 218 tokens ~200 MiB, so a gradient over 16 long facts holds GiBs beside the
model for the length of its backward. :func:`blocks_recomputed` has each block keep only its
input and run its forward again when the backward reaches it (``torch.utils.checkpoint``,
non-reentrant): one more forward per backward, and the gradients are the same to the bit on the
CPU, because the recomputation is the same computation on the same tensors (tested against the
plain backward; on a GPU it holds as far as the forward's kernels are deterministic). Through
weights computed at forward (:mod:`workbench.core.computed_weight`) a recomputed gradient holds
about what it holds through plain weights (measured at the dispatcher, tests/test_recompute.py).

:func:`saved_bytes` measures what one forward saves, so a caller can recompute only when the
saved activations would outweigh its budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from workbench.core.errors import WorkbenchError
from workbench.models.adapter import ModelAdapter


@contextlib.contextmanager
def blocks_recomputed(model: torch.nn.Module, adapter: ModelAdapter) -> Iterator[None]:
    """Inside the ``with``, every forward of ``model``'s transformer blocks saves only the block's
    input, and the backward runs the block again to get the rest. Without grad the blocks run
    as they always do. The blocks' own forwards (an instance's own one too) are restored on exit,
    whatever happens."""
    blocks = model.get_submodule(adapter.blocks)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise WorkbenchError(f"{adapter.blocks!r} is not a list of blocks in this model")
    previous = [block.__dict__.get("forward") for block in blocks]  # an instance's own forward, if any
    try:
        for block in blocks:
            block.forward = _checkpointed(block.forward)
        yield
    finally:
        for block, own in zip(blocks, previous):
            if own is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = own


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # non-reentrant: blocks take keyword arguments (masks, position embeddings) and inputs
        # that need no gradient, and a gradient w.r.t. the weights alone flows through it
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def saved_bytes(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors ``forward()`` saves for its backward (each storage once; ``model``'s
    parameters and buffers, which exist anyway, not counted). The graph is let go unused.
    Tensors saved under hooks set inside the forward (a weight computed at forward, outside a
    recomputed block) are not seen, nor what a custom autograd function keeps on its ``ctx``."""
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in held and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    del out
    return total
