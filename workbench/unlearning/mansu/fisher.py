"""(c) The diagonal-Fisher retain bound.

``F_i = E_retain[(∂ log p(y|x)/∂θ_i)²]``; to second order the retain KL of a change Δ is
``½ Σ F_i Δ_i²`` (:func:`fisher_bound`). MANSU ranks candidates by forget gain per retain
cost and moves them only while that bound stays within the Fisher budget.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from workbench.core.errors import WorkbenchError
from workbench.models.scoring import FactBatch, answer_logits
from workbench.models.update import Update
from workbench.quant import single_use_linear_owners, transposed_parameters
from workbench.unlearning.losses import answer_logprob

FISHER_CHUNK = 16
"""Examples per forward/backward of the batched Fisher unless the caller sizes it to memory."""


def fisher_rows(batch: FactBatch, samples: int) -> FactBatch:
    """The facts :func:`diagonal_fisher` averages over: the first ``samples`` (all if fewer)."""
    return batch.subset(torch.arange(min(samples, len(batch))))


def per_example_bytes(work: torch.nn.Module, names: list[str]) -> int:
    """What the batched Fisher holds per fact besides the forward's saved tensors: the largest
    per-example gradient it forms (float32, one weight's size), 0 when no weight is batched."""
    return max((4 * _weight(m).numel() for m in single_use_linear_owners(work, names).values()), default=0)


def diagonal_fisher(work: torch.nn.Module, names: list[str], batch: FactBatch, samples: int, *,
                    transposed: Collection[str] | None = None, chunk: int = FISHER_CHUNK) -> dict[str, torch.Tensor]:
    """``E[(∂ log p(y|x)/∂θ)²]`` over the first ``samples`` retain facts (all if fewer).

    The empirical Fisher with the true answers (the facts the model knows). The square must
    be of a *per-example* gradient, as the definition requires. For the weight of an
    ``nn.Linear`` or GPT-2 ``Conv1D`` used once per forward, the per-example gradient is
    ``Σ_t g_{b,t} x_{b,t}ᵀ`` (output gradient times input, summed over the example's tokens),
    so one batched forward/backward gives every example's gradient; examples do not
    interact in a causal LM, and padding after an example's last token gets no gradient.
    Any other weight (embeddings, shared tensors) takes one backward per example
    (:func:`diagonal_fisher_per_example`, the reference the batched path is tested against).
    ``transposed``: the Conv1D weights (``model.adapter.transposed``); by default read off
    ``work``'s modules. ``chunk``: examples per batched forward/backward (the Fisher does not
    depend on it beyond float rounding; its memory does, in proportion).
    """
    rows = fisher_rows(batch, samples)
    count = len(rows)
    if count == 0:
        raise WorkbenchError("the diagonal Fisher needs at least one retain example")
    owners = single_use_linear_owners(work, names)
    rest = [n for n in names if n not in owners]
    fisher = diagonal_fisher_per_example(work, rest, rows, count) if rest else {}
    if owners:
        layout = transposed_parameters(work) if transposed is None else frozenset(transposed)
        fisher.update(_batched_linear_fisher(work, owners, rows, layout, chunk))
    return {n: fisher[n] for n in names}


def diagonal_fisher_per_example(work: torch.nn.Module, names: list[str], batch: FactBatch,
                                samples: int) -> dict[str, torch.Tensor]:
    """:func:`diagonal_fisher` by one backward pass per example: slow, for any parameter."""
    params = dict(work.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    fisher = {n: torch.zeros_like(params[n]) for n in names}
    count = min(samples, len(batch))
    try:
        for i in range(count):
            row = batch.subset(torch.tensor([i]))
            logp = answer_logprob(answer_logits(work, row), row.answers)[0]
            grads = torch.autograd.grad(logp, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    fisher[n] += g.detach() ** 2
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return {n: f / count for n, f in fisher.items()}


def _weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise WorkbenchError(f"{type(module).__name__} has no weight matrix")
    return weight


def _batched_linear_fisher(
    work: torch.nn.Module, owners: dict[str, torch.nn.Module], batch: FactBatch, transposed: frozenset[str],
    chunk: int = FISHER_CHUNK,
) -> dict[str, torch.Tensor]:
    """Per-example squared gradients of Linear/Conv1D weights, one forward/backward per ``chunk`` examples.

    Memory: one ``[chunk, out, in]`` per-example gradient at a time, squared in place.
    """

    fisher = {n: torch.zeros_like(_weight(m), dtype=torch.float32) for n, m in owners.items()}  # any storage dtype
    params = list(work.parameters())
    flags = [p.requires_grad for p in params]
    # Only the moved weights need grad: that puts their modules' outputs in the graph.
    wanted = {id(m.weight) for m in owners.values()}
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def capture(key: str) -> Callable[..., None]:
        def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if key in inputs:
                raise WorkbenchError(f"{key}: its module ran twice in one forward; this Fisher needs one use")
            inputs[key], outputs[key] = args[0].detach(), out
        return hook

    handles = [m.register_forward_hook(capture(n)) for n, m in owners.items()]
    try:
        for p in params:
            p.requires_grad_(id(p) in wanted)
        for start in range(0, len(batch), chunk):
            part = batch.subset(torch.arange(start, min(start + chunk, len(batch))))
            inputs.clear()
            outputs.clear()
            logp = answer_logprob(answer_logits(work, part), part.answers).sum()
            keys = list(outputs)
            # Row b of the gradient of Σ_b log p_b at a module's output is example b's own.
            grads = torch.autograd.grad(logp, [outputs[k] for k in keys], allow_unused=True)
            for k, g in zip(keys, grads):
                if g is None:
                    continue
                x, g = inputs[k].float(), g.float()
                if k in transposed:  # Conv1D weight [in, out]
                    per_example = torch.einsum("bti,bto->bio", x, g)
                else:  # nn.Linear weight [out, in]
                    per_example = torch.einsum("bto,bti->boi", g, x)
                # squared in place: one [chunk, out, in] tensor at a time, not two (0.74 GB each on a 1B MLP)
                fisher[k] += per_example.square_().sum(0).to(fisher[k].dtype)
    finally:
        for h in handles:
            h.remove()
        inputs.clear()
        outputs.clear()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    for f in fisher.values():  # in place: the sums and the means are not held at once (the same bits)
        f.div_(len(batch))
    return fisher


def fisher_bound(fisher: dict[str, torch.Tensor], update: Update) -> float:
    """Second-order retain KL estimate ½ Σ F_i Δ_i² of an update, in float32 (a 16-bit Fisher is
    widened) on the Fisher's device (an :class:`Update` keeps its deltas on the CPU)."""
    def term(f: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return 0.5 * (f.float() * d.to(f.device).float() ** 2).sum()

    return float(sum(term(fisher[n], d) for n, d in update.deltas.items() if n in fisher))
