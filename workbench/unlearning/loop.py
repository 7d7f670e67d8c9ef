"""The shared optimisation loop of the gradient-based methods, and the result every method returns.

The loop trains a *deep copy* of the base model and returns the difference as an
:class:`~workbench.update.Update`; the base is never touched. Methods differ only in their
objective (a function of forget and retain logits) and in which parameters may move.

Stopping rule (shared, so methods are compared at equal forgetting): stop as soon as the
full-precision forget top-1 accuracy is at or below ``forget_target`` (checked every
``eval_every`` steps), or when ``max_steps`` is reached, or when ``should_stop()`` says so.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from workbench.errors import WorkbenchError
from workbench.unlearning.batches import FactBatch, answer_logits
from workbench.update import Update

if TYPE_CHECKING:
    from workbench.facts import FactSplit
    from workbench.models import LoadedModel

Progress = Callable[[float, str], None]
TrainableSet = Literal["quantized", "all"]
"""``quantized``: only the weights the quantizer quantizes (decoder Linear/Conv1D weights), so every
change is exposed to quantization; ``all``: every parameter (embeddings, norms and biases too)."""


@dataclass(frozen=True)
class StopRule:
    """When a run ends.

    Attributes:
        max_steps: step budget.
        forget_target: stop once full-precision forget top-1 <= this (None: run the budget).
        eval_every: check the forget accuracy every this many steps.
    """

    max_steps: int = 100
    forget_target: float | None = 0.1
    eval_every: int = 1

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise WorkbenchError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.forget_target is not None and not 0.0 <= self.forget_target <= 1.0:
            raise WorkbenchError(f"forget_target must be in [0, 1], got {self.forget_target}")
        if self.eval_every < 1:
            raise WorkbenchError(f"eval_every must be >= 1, got {self.eval_every}")


@dataclass
class UnlearningResult:
    """What an unlearning method produced.

    Attributes:
        update: the change to the base (after = base + update).
        method: method name.
        steps: optimisation steps (or MANSU rounds) taken.
        stopped: why the run ended ("target", "budget", "cancelled", ...).
        seconds: wall time.
        history: per-step records (step, loss, forget_top1, ...), for live plots.
        diagnostics: method-specific numbers (e.g. MANSU's Fisher bound and floor checks).
    """

    update: Update
    method: str
    steps: int
    stopped: str
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Batches:
    """The split as tensors, plus the frozen base's logits on them (for reference-based losses)."""

    forget: FactBatch
    retain: FactBatch
    ref_forget: torch.Tensor
    ref_retain: torch.Tensor

    @classmethod
    def build(cls, model: LoadedModel, split: FactSplit) -> Batches:
        if not split.forget:
            raise WorkbenchError("the forget set is empty")
        if not split.retain:
            raise WorkbenchError("the retain set is empty")
        from workbench.device import module_device

        # on the model's device: every loss and evaluation of a run then stays there
        device = module_device(model.hf)
        forget = FactBatch.from_facts(model.tokenizer, split.forget).to(device)
        retain = FactBatch.from_facts(model.tokenizer, split.retain).to(device)
        with torch.no_grad():
            ref_f = answer_logits(model.hf, forget)
            ref_r = answer_logits(model.hf, retain)
        return cls(forget, retain, ref_f, ref_r)


Objective = Callable[[torch.nn.Module, FactBatch, torch.Tensor, FactBatch, torch.Tensor], torch.Tensor]
"""(trainable model, forget batch, its reference logits, retain batch, its reference logits) -> loss."""


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and batching of a gradient method.

    Attributes:
        lr: Adam learning rate.
        forget_batch: forget rows per step (all if larger than the set).
        retain_batch: retain rows per step.
        trainable: see :data:`TrainableSet`.
        seed: seeds the batch sampling.
    """

    lr: float = 1e-5
    forget_batch: int = 64
    retain_batch: int = 64
    trainable: TrainableSet = "quantized"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise WorkbenchError(f"lr must be > 0, got {self.lr}")
        if self.forget_batch < 1 or self.retain_batch < 1:
            raise WorkbenchError("batch sizes must be >= 1")
        if self.trainable not in ("quantized", "all"):
            raise WorkbenchError(f"trainable must be 'quantized' or 'all', got {self.trainable!r}")


def trainable_names(model: LoadedModel, trainable: TrainableSet, quant: Any = None) -> list[str]:
    """Parameter names a gradient method may move."""
    if trainable == "all":
        return [n for n, _ in model.hf.named_parameters()]
    from workbench.quant import QuantConfig, quantizable_parameters

    return quantizable_parameters(model.hf, quant or QuantConfig("nf4"))


def forget_top1(module: torch.nn.Module, batch: FactBatch) -> float:
    with torch.no_grad():
        return float((answer_logits(module, batch).argmax(-1) == batch.answers).float().mean())


def run_gradient_method(
    model: LoadedModel,
    batches: Batches,
    objective: Objective,
    *,
    method: str,
    optim: OptimConfig = OptimConfig(),
    stop: StopRule = StopRule(),
    names: list[str] | None = None,
    grad_mask: dict[str, torch.Tensor] | None = None,
    work: torch.nn.Module | None = None,
    finish: Callable[[torch.nn.Module], dict[str, torch.Tensor]] | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> UnlearningResult:
    """Minimise ``objective`` on a copy of the model; return the change as an update.

    Args:
        names: parameters that may move (default: by ``optim.trainable``); names of
            ``work``'s parameters when ``work`` is given.
        grad_mask: optional per-name boolean masks; gradients outside them are zeroed
            (used by SURE's row selection and by circuit-restricted variants). Adam's
            moments of a masked entry stay 0, so it never moves.
        work: a prepared trainable module the caller owns (e.g. a copy carrying LoRA
            adapters); default a deep copy of ``model.hf``. Never the base itself.
        finish: maps the trained ``work`` to after-tensors under the *base's* HF names
            (LoRA: merge the adapters); default the trained ``names`` of ``work``.
    """
    start = time.perf_counter()
    if work is not None and work is model.hf:
        raise WorkbenchError("the shared loop must train a copy, never the base model itself")
    names = names if names is not None else trainable_names(model, optim.trainable)
    if not names:
        raise WorkbenchError("no parameter may move: the trainable set is empty")
    work = work if work is not None else copy.deepcopy(model.hf)
    work.train()
    params = dict(work.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise WorkbenchError(f"{method}: trainable names not in the model: {unknown[:3]}")
    for n, p in params.items():
        p.requires_grad_(n in names)
    trained = [params[n] for n in names]
    opt = torch.optim.Adam(trained, lr=optim.lr)
    gen = torch.Generator().manual_seed(optim.seed)

    from tqdm.auto import tqdm

    history: list[dict[str, float]] = []
    stopped = "budget"
    bar = tqdm(total=stop.max_steps, desc=f"unlearning ({method})", disable=progress is not None, leave=False)
    step = 0
    try:
        for step in range(1, stop.max_steps + 1):
            if should_stop is not None and should_stop():
                stopped = "cancelled"
                step -= 1
                break
            f_idx = torch.randperm(len(batches.forget), generator=gen)[: optim.forget_batch]
            r_idx = torch.randperm(len(batches.retain), generator=gen)[: optim.retain_batch]
            fb, rb = batches.forget.subset(f_idx), batches.retain.subset(r_idx)
            loss = objective(work, fb, batches.ref_forget[f_idx], rb, batches.ref_retain[r_idx])
            if not torch.isfinite(loss):
                raise WorkbenchError(
                    f"{method}: the loss became {float(loss)} at step {step}; the run was stopped and "
                    "nothing was saved (the base model is untouched). Try a smaller learning rate."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_mask is not None:
                for n in names:
                    if n in grad_mask and params[n].grad is not None:
                        params[n].grad.mul_(grad_mask[n].to(params[n].grad.dtype))
            opt.step()
            record: dict[str, float] = {"step": step, "loss": float(loss.detach())}
            if step % stop.eval_every == 0 or step == stop.max_steps:
                work.eval()
                record["forget_top1"] = forget_top1(work, batches.forget)
                work.train()
            history.append(record)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k != "step"})
            if progress is not None:
                msg = f"{method} step {step}: loss {record['loss']:.3f}"
                if "forget_top1" in record:
                    msg += f", forget top-1 {record['forget_top1']:.3f}"
                progress(step / stop.max_steps, msg)
            if stop.forget_target is not None and record.get("forget_top1", 1.0) <= stop.forget_target:
                stopped = "target"
                break
    finally:
        bar.close()
    work.eval()
    base = model.state()
    with torch.no_grad():
        after = finish(work) if finish is not None else {n: params[n].detach() for n in names}
    update = Update.between(base, after)
    update.meta.update({"method": method, "base_fingerprint": model.fingerprint})
    return UnlearningResult(
        update=update, method=method, steps=step, stopped=stopped,
        seconds=time.perf_counter() - start, history=history,
    )
