"""The shared optimisation loop of the gradient-based methods.

The loop trains a *deep copy* of the base model and returns the difference as an
:class:`~workbench.models.update.Update`; the base is never touched. Methods differ only in their
objective (a function of forget and retain logits) and in which parameters may move.

Stopping rule (shared, so methods are compared at equal forgetting): stop as soon as the
full-precision forget accuracy is at or below ``forget_target`` (checked every ``eval_every``
steps), or when ``max_steps`` is reached, or when ``should_stop()`` says so. The accuracy is
first-token top-1, or multiple-choice accuracy on a multiple-choice forget set, where the
target is never below chance (:class:`~workbench.unlearning.batches.Batches`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workbench.core.errors import WorkbenchError
from workbench.core.progress import Steps
from workbench.models.loaded import LoadedModel
from workbench.models.recompute import blocks_recomputed, saved_bytes
from workbench.models.scoring import FactBatch, span_logits, top1
from workbench.models.update import Update
from workbench.quant import QuantConfig
from workbench.unlearning.batches import ScoredSet
from workbench.unlearning.readings import take_reading
from workbench.unlearning.result import UnlearningResult, accuracy_text, already_at_target, nothing_to_unlearn
from workbench.unlearning.task import OptimConfig, TrainableSet, UnlearningTask

Objective = Callable[[torch.nn.Module, FactBatch, torch.Tensor | None, FactBatch, torch.Tensor | None], torch.Tensor]
"""(trainable model, forget batch, its reference logits, retain batch, its reference logits) -> loss.

The frozen base's reference logits of a side are ``None`` when the objective says it does not
read them (a ``forget_reference``/``retain_reference`` attribute that is False, as
:class:`~workbench.unlearning.objectives.ForgetRetainObjective`'s methods say): on SmolLM2's
default split they take ~0.9 GB, computed once per run, for nothing when no loss reads them."""


@dataclass(frozen=True)
class DeclaredObjective:
    """An objective function with what it reads of the reference logits said (a function cannot
    carry the ``forget_reference``/``retain_reference`` a class of objectives says)."""

    loss: Objective
    forget_reference: bool
    retain_reference: bool

    def __call__(self, model: torch.nn.Module, fb: FactBatch, ref_f: torch.Tensor | None, rb: FactBatch,
                 ref_r: torch.Tensor | None) -> torch.Tensor:
        return self.loss(model, fb, ref_f, rb, ref_r)


def reads_reference(objective: Objective, side: str) -> bool:
    """Whether ``objective`` reads the reference logits of ``side`` (``forget``/``retain``); an
    objective that does not say is given them."""
    return bool(getattr(objective, f"{side}_reference", True))


def trainable_names(model: LoadedModel, trainable: TrainableSet, quant: QuantConfig | None = None) -> list[str]:
    """Parameter names a gradient method may move."""
    if trainable == "all":
        return [n for n, _ in model.hf.named_parameters()]
    return model.adapter.quantizable(quant or QuantConfig("nf4"))


def run_gradient_method(
    task: UnlearningTask,
    objective: Objective,
    *,
    method: str,
    optim: OptimConfig | None = None,
    names: list[str] | None = None,
    grad_mask: dict[str, torch.Tensor] | None = None,
    work: torch.nn.Module | None = None,
    finish: Callable[[torch.nn.Module], dict[str, torch.Tensor]] | None = None,
) -> UnlearningResult:
    """Minimise ``objective`` on a copy of the model; return the change as an update.

    Args:
        optim: overrides ``task.optim`` (SURE and LoRA scale its learning rate).
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
    model, batches, stop = task.model, task.batches, task.stop
    optim = optim or task.optim
    if already_at_target(batches, model.hf, stop.forget_target):
        return nothing_to_unlearn(model, method, start)
    if work is not None and work is model.hf:
        raise WorkbenchError("the shared loop must train a copy, never the base model itself")
    names = names if names is not None else trainable_names(model, optim.trainable)
    if not names:
        raise WorkbenchError("no parameter may move: the trainable set is empty")
    # The default copy trains in float32 whatever the storage dtype: updates accumulate there
    # (the after-model is w+Δ rounded once to the storage dtype, models.update.stored_sum).
    work = work if work is not None else copy.deepcopy(model.hf).float()
    work.train()
    params = dict(work.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise WorkbenchError(f"{method}: trainable names not in the model: {unknown[:3]}")
    for n, p in params.items():
        p.requires_grad_(n in names)
    opt = torch.optim.Adam([params[n] for n in names], lr=optim.lr)
    gen = torch.Generator().manual_seed(optim.seed)
    memory = step_memory(model, work, optim, batches.forget, batches.retain)
    if memory.recompute and task.progress is not None:
        task.progress(0.0, memory.message(method))

    def trained() -> dict[str, torch.Tensor]:
        """The trained tensors under the base's names (``work`` in eval mode)."""
        with torch.no_grad():
            return finish(work) if finish is not None else {n: params[n].detach() for n in names}

    history: list[dict[str, float]] = []
    stopped = "budget"
    step = 0
    reading_seconds = 0.0
    sample = task.readings.sample(batches) if task.readings.every else None
    target = None if stop.forget_target is None else batches.target(stop.forget_target)
    with Steps(stop.max_steps, f"unlearning ({method})", task.progress) as steps:
        for step in range(1, stop.max_steps + 1):
            if task.should_stop is not None and task.should_stop():
                stopped = "cancelled"
                step -= 1
                break
            with blocks_recomputed(work, model.adapter) if memory.recompute else contextlib.nullcontext():
                loss = _step(objective, work, task, optim, gen, opt, names, params, grad_mask, method, step)
            record: dict[str, float] = {"step": step, "loss": float(loss.detach())}
            work.eval()
            if step % stop.eval_every == 0 or step == stop.max_steps:
                record["forget_top1"] = top1(work, batches.forget)
                if batches.choices is not None:
                    record["forget_mc"] = batches.forget_accuracy(work)
            reached = target is not None and record.get(batches.record_key, 1.0) <= target
            if sample is not None and task.readings.due(step, last=reached or step == stop.max_steps):
                reading_seconds += _read(task, work, trained, sample, record)
            work.train()
            history.append(record)
            task.publish(record)
            steps.postfix(**{k: f"{v:.3f}" for k, v in record.items() if k != "step"})
            steps.step(_step_message(method, record))
            if reached:
                stopped = "target"
                break
    work.eval()
    update = Update.between(model.state(), trained())
    update.meta.update({"method": method, "base_fingerprint": model.fingerprint})
    diagnostics: dict[str, object] = {"reading_seconds": reading_seconds} if sample is not None else {}
    if memory.recompute:
        diagnostics["blocks_recomputed"] = True
    return UnlearningResult(update=update, method=method, steps=step, stopped=stopped,
                            seconds=time.perf_counter() - start - reading_seconds, history=history,
                            diagnostics=diagnostics)


@dataclass(frozen=True)
class StepMemory:
    """What one step's forward saves for its backward (estimated from the longest fact of each
    side, times the rows a step takes of it), against the model's working budget
    (:meth:`~workbench.models.loaded.LoadedModel.working_budget_bytes`). Over it, the step
    recomputes each block in its backward (:func:`~workbench.models.recompute.blocks_recomputed`):
    the same gradients, one more forward per step. On SmolLM2 a GradDiff step of 64 + 64 facts
    saved ~2.4 GiB in float32 beside a 513 MiB budget."""

    saved: int
    budget: int

    @property
    def recompute(self) -> bool:
        return self.saved > self.budget

    def message(self, method: str) -> str:
        return (f"{method}: each step recomputes the blocks in its backward: its facts would save "
                f"{self.saved / 2**20:,.0f} MiB, over the {self.budget / 2**20:,.0f} MiB budget "
                "(same numbers, one more forward)")


def step_memory(model: LoadedModel, work: torch.nn.Module, optim: OptimConfig, forget: FactBatch,
                retain: FactBatch) -> StepMemory:
    """:class:`StepMemory` of a step on ``forget_batch`` forget and ``retain_batch`` retain rows
    (both sides counted, as the family's objectives run both; a forget-only objective is
    overestimated, which costs it time, never numbers). ``work``'s trainable parameters take
    the gradient already; one forward per side with grad, its graph let go."""
    saved = 0
    training = work.training
    work.eval()  # no dropout: the estimate draws nothing from the random stream the steps' dropout reads
    try:
        for batch, rows in ((forget, optim.forget_batch), (retain, optim.retain_batch)):
            if len(batch) > 0:
                longest = batch.longest()
                saved += min(rows, len(batch)) * saved_bytes(work, functools.partial(span_logits, work, longest))
    finally:
        work.train(training)
    return StepMemory(saved, model.working_budget_bytes())


def _step(objective: Objective, work: torch.nn.Module, task: UnlearningTask, optim: OptimConfig,
          gen: torch.Generator, opt: torch.optim.Optimizer, names: list[str], params: dict[str, torch.nn.Parameter],
          grad_mask: dict[str, torch.Tensor] | None, method: str, step: int) -> torch.Tensor:
    """One optimiser step on a random forget batch and retain batch; returns the loss."""
    batches = task.batches
    f_idx = torch.randperm(len(batches.forget), generator=gen)[: optim.forget_batch]
    r_idx = torch.randperm(len(batches.retain), generator=gen)[: optim.retain_batch]
    fb, rb = batches.forget.subset(f_idx), batches.retain.subset(r_idx)
    ref_f = batches.ref_forget[f_idx] if reads_reference(objective, "forget") else None
    ref_r = batches.ref_retain[r_idx] if reads_reference(objective, "retain") else None
    loss = objective(work, fb, ref_f, rb, ref_r)
    if not torch.isfinite(loss):
        raise WorkbenchError(
            f"{method}: the loss became {float(loss.detach())} at step {step}; the run was stopped and "
            "nothing was saved (the base model is untouched). Try a smaller learning rate."
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_mask is not None:
        for n in names:
            grad = params[n].grad
            if n in grad_mask and grad is not None:
                grad.mul_(grad_mask[n].to(grad.dtype))
    opt.step()
    return loss


def _read(task: UnlearningTask, work: torch.nn.Module, trained: Callable[[], dict[str, torch.Tensor]],
          sample: ScoredSet, record: dict[str, float]) -> float:
    """Add a reading (:func:`~workbench.unlearning.readings.take_reading`) to ``record``; return
    its seconds, which the run's ``seconds`` leave out (it is for display: no decision reads it)."""
    tick = time.perf_counter()
    record.update(take_reading(task.model, task.batches, task.quant, work, trained, sample).record())
    return time.perf_counter() - tick


def _step_message(method: str, record: dict[str, float]) -> str:
    """A step's progress line: the loss, and each accuracy the step measured (quantized beside it,
    or alone when only a reading measured it: a reading step need not be an ``eval_every`` step)."""
    parts = [accuracy_text(record, key, label) for label, key in (
        ("forget top-1", "forget_top1"), ("forget MC", "forget_mc"), ("retain top-1", "retain_top1"),
        ("retain MC", "retain_mc"))]
    return ", ".join([f"{method} step {int(record['step'])}: loss {record['loss']:.3f}", *filter(None, parts)])
