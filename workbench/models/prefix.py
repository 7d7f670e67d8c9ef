"""Exact prefix caching: forwards of a model whose first decoder blocks never change, run
without those blocks for a batch already seen.

MANSU's working models (w+Δ and Q(w+Δ)) differ from the base only in their candidate weights,
all inside the circuit's layers, and every round runs the same batches (the retain guard's
sample and the forget set, scored; the retain gradient's chunks, differentiated). The blocks
before the first layer that holds a candidate weight (``start``) compute the same tensor for
a batch every time. A :class:`PrefixCache` keeps, per batch, the output of block
``start - 1`` from one full forward, and afterwards runs the model's own forward with blocks
``0 … start-1`` handing back that tensor instead of computing it.

Why it is exact: the model's forward is unchanged (embeddings, masks, rotary tables, the blocks
from ``start`` on, the final norm, the unembedding at the picked positions); blocks from
``start`` on receive the very values the full forward gives them (the same token ids, shapes
and kernels: deterministic for equal inputs), so the logits are bit-identical, and so is
top-1. With grad the forward starts no later than the first block with a weight that takes
a gradient, so a full forward builds no graph before it either, and gradients are equal too.
It holds while no weight before block ``start`` changes: the cache's owner names every weight
before changing it (:meth:`PrefixCache.changing`), and ``start`` only moves down.

:func:`full_forwards` turns caching off (``workbench bench flow``'s reference path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from workbench.core.errors import WorkbenchError
from workbench.models.adapter import ModelAdapter
from workbench.models.scoring import FactBatch, answer_logits, correct_by_chunks, span_logits

T = TypeVar("T")

_enabled = True  # process-wide: the bench's reference path may run its click in any thread


@contextmanager
def full_forwards() -> Iterator[None]:
    """Within it, every :class:`PrefixCache` runs full forwards (the reference path)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


def first_changing_block(adapter: ModelAdapter, names: Iterable[str]) -> int:
    """The first decoder block holding one of the weights ``names`` (0 when one lies before the
    blocks, e.g. a quantized embedding; ``n_layers`` when none does)."""
    start = adapter.n_layers
    for name in names:
        layer = adapter.layer_of(name)
        # Outside the blocks: the embeddings come before them; the untied unembedding after.
        after_blocks = layer is None and name == adapter.unembed_weight and not adapter.tied_embeddings
        start = min(start, adapter.n_layers if after_blocks else 0 if layer is None else layer)
    return start


class PrefixCache:
    """Forwards of ``model`` on batches run again and again, while some of its weights change
    (see the module docstring). Whoever changes a weight says so first (:meth:`changing`);
    ``start`` is then the first block holding a weight that was ever changed (``n_layers``
    while none was). A batch is recognised by its token ids (all that the blocks before
    ``start`` see); each one seen holds its residual stream at block ``start``
    (``[n, seq, d_model]``) for the cache's life, so use it for the few batches every round
    runs, not for one-off ones.
    """

    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter) -> None:
        blocks = model.get_submodule(adapter.blocks)
        if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) != adapter.n_layers:
            raise WorkbenchError(f"prefix cache: {adapter.blocks!r} is not the model's {adapter.n_layers} blocks")
        self.model = model
        self.adapter = adapter
        self.blocks = blocks
        self.start = adapter.n_layers
        self._held: list[tuple[torch.Tensor, int, Any]] = []  # token ids, the block it enters, the stream

    def changing(self, names: Iterable[str]) -> None:
        """The weights ``names`` are about to change: later forwards run every block from the
        first of theirs on (a batch's stream is captured again there when next needed)."""
        self.start = min(self.start, first_changing_block(self.adapter, names))
        # A stream held for a later block is stale (and kept for nothing once ``start`` is 0).
        self._held = [held for held in self._held if held[1] <= self.start]

    def run(self, batch: FactBatch, forward: Callable[[torch.nn.Module, FactBatch], T]) -> T:
        """``forward(model, batch)``, any forward of the model over ``batch.ids``, with blocks
        ``0 … start-1`` replayed when ``batch``'s ids were seen. With grad enabled it starts no
        later than the first block with a weight that requires grad."""
        start = self.start
        if torch.is_grad_enabled():
            # A weight that takes a gradient needs its block run (and a graph built there).
            start = min(start, first_changing_block(
                self.adapter, (n for n, p in self.model.named_parameters() if p.requires_grad)))
        if not _enabled or start == 0:
            return forward(self.model, batch)
        ids = batch.ids
        seen = next((i for i, (held_ids, _, _) in enumerate(self._held)
                     if held_ids.shape == ids.shape and torch.equal(held_ids, ids)), None)
        if seen is not None and self._held[seen][1] <= start:  # held for this block or an earlier one
            _, block, stream = self._held[seen]
            return self._replay(batch, forward, block, stream)
        if seen is not None:
            del self._held[seen]  # held for a later block than this forward starts at
        return self._capture(batch, forward, start)

    def logits(self, batch: FactBatch) -> torch.Tensor:
        """``[n, vocab]`` answer logits, as :func:`~workbench.models.scoring.answer_logits` (no grad)."""
        with torch.no_grad():
            return self.run(batch, answer_logits)

    def span_logits(self, batch: FactBatch) -> torch.Tensor:
        """As :func:`~workbench.models.scoring.span_logits` (with grad if the model has it)."""
        return self.run(batch, span_logits)

    def correct(self, batch: FactBatch) -> torch.Tensor:
        """``[n]`` bool, as :func:`~workbench.models.scoring.correct` (the same chunks: each is
        a batch of its own here, captured and replayed as such)."""
        return correct_by_chunks(batch, self.logits)

    def top1(self, batch: FactBatch) -> float:
        """As :func:`~workbench.models.scoring.top1`."""
        return float(self.correct(batch).float().mean())

    def _capture(self, batch: FactBatch, forward: Callable[[torch.nn.Module, FactBatch], T], start: int) -> T:
        """A full forward that keeps block ``start - 1``'s output for ``batch``."""
        captured: list[Any] = []

        def keep(_module: torch.nn.Module, _inputs: Any, out: Any) -> None:
            # No weight before ``start`` takes a gradient, so nothing flows back through it.
            captured.append(out.detach() if isinstance(out, torch.Tensor) else out)

        hook = self.blocks[start - 1].register_forward_hook(keep)
        try:
            result = forward(self.model, batch)
        finally:
            hook.remove()
        self._held.append((batch.ids.clone(), start, captured[-1]))
        return result

    def _replay(self, batch: FactBatch, forward: Callable[[torch.nn.Module, FactBatch], T], start: int,
                held: Any) -> T:
        """The model's forward with blocks ``0 … start-1`` returning ``held`` uncomputed. Their
        ``forward`` is replaced on the instance only for the call, so the blocks keep every
        attribute their model's loop reads (e.g. a layer's attention type)."""
        def replay(*_args: Any, **_kwargs: Any) -> Any:
            # A copy: a block downstream may write into its input in place.
            return held.clone() if isinstance(held, torch.Tensor) else held

        skipped = list(self.blocks)[:start]
        own = [block.__dict__.get("forward") for block in skipped]
        try:
            for block in skipped:
                block.forward = replay  # type: ignore[method-assign]  # restored below
            return forward(self.model, batch)
        finally:
            for block, forward_of in zip(skipped, own):
                del block.forward
                if forward_of is not None:
                    block.forward = forward_of  # type: ignore[method-assign]  # an instance forward it had
