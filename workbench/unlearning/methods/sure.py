"""SURE — saliency-based unlearning with a large learning rate (Zhang et al., ICLR 2025,
"Catastrophic Failure of LLM Unlearning via Quantization"), docs/SCIENCE.md §4.

Zhang et al. argue that updates survive quantization when they are *large*, and keep
them from damaging utility by making them *few*: a saliency map over weight rows picks
where the update may go, and a larger learning rate makes it big there.

1. Saliency (once, at the base): the gradient of the forget loss (NLL of the forget
   answers over the whole forget set) with respect to every trainable weight; per
   *output row* its L2 norm. An output row is ``W[i, :]`` of an ``nn.Linear`` weight
   ``[out, in]`` and ``W[:, j]`` of a GPT-2 ``Conv1D`` weight ``[in, out]``.
2. Selection: the top ``row_fraction`` of all rows, ranked globally across matrices
   (the paper thresholds one saliency map over all modules).
3. Training: the chosen objective (GA+GDR by default, as in the paper's strongest
   utility-constrained setting) through the shared loop, with gradients outside the
   selected rows zeroed and the learning rate multiplied by ``lr_scale``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from workbench.core.checks import Range, check_config
from workbench.core.errors import WorkbenchError
from workbench.models.loaded import LoadedModel
from workbench.models.scoring import span_logits
from workbench.unlearning import losses
from workbench.unlearning.batches import Batches
from workbench.unlearning.loop import run_gradient_method, trainable_names
from workbench.unlearning.methods import GRADIENT_OBJECTIVES
from workbench.unlearning.result import UnlearningResult
from workbench.unlearning.task import UnlearningTask


@dataclass(frozen=True)
class SureConfig:
    """SURE's hyper-parameters.

    Attributes:
        row_fraction: fraction of all trainable weight rows that may move (paper: ~10%).
        lr_scale: learning rate multiplier over the method-independent default.
        objective: the baseline objective trained on the selected rows.
    """

    row_fraction: float = 0.1
    lr_scale: float = 5.0
    objective: str = "graddiff"

    def __post_init__(self) -> None:
        check_config(self, {"row_fraction": Range(0, 1, low_open=True), "lr_scale": Range(0, 10**4, low_open=True)})
        if self.objective not in GRADIENT_OBJECTIVES:
            raise WorkbenchError(f"SureConfig.objective must be one of {', '.join(GRADIENT_OBJECTIVES)}, "
                                 f"got {self.objective!r}")


def row_saliency(model: LoadedModel, batches: Batches, names: list[str]) -> dict[str, torch.Tensor]:
    """Per trainable weight, ``[n_out]`` L2 norms of the forget-NLL gradient per output row."""

    work = copy.deepcopy(model.hf).eval()
    params = dict(work.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    loss = losses.nll(span_logits(work, batches.forget), batches.forget.targets, batches.forget.mask)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    conv1d = model.adapter.transposed
    out: dict[str, torch.Tensor] = {}
    for n, g in zip(names, grads):
        if g is None:
            g = torch.zeros_like(params[n])
        g = g.detach()
        if g.ndim == 1:
            out[n] = g.abs()
        else:
            # Conv1D stores [in, out]: its output rows are columns.
            out[n] = g.norm(dim=0) if n in conv1d else g.norm(dim=1)
    return out


def row_masks(model: LoadedModel, saliency: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Boolean masks of each weight's shape: True on the globally top-``fraction`` rows."""

    flat = torch.cat([s.reshape(-1) for s in saliency.values()])
    k = max(1, round(fraction * flat.numel()))
    threshold = torch.topk(flat, k).values[-1]
    conv1d = model.adapter.transposed
    shapes = {n: p.shape for n, p in model.hf.named_parameters()}
    masks: dict[str, torch.Tensor] = {}
    taken = 0
    for n, s in saliency.items():
        rows = s >= threshold
        # ties at the threshold could overshoot k; keep the count exact
        rows &= torch.cumsum(rows.long(), 0) <= max(0, k - taken)
        taken += int(rows.sum())
        shape = shapes[n]
        if len(shape) == 1:
            masks[n] = rows.clone()
        elif n in conv1d:
            masks[n] = rows[None, :].expand(shape).clone()
        else:
            masks[n] = rows[:, None].expand(shape).clone()
    return masks


def sure(task: UnlearningTask, config: SureConfig | None = None) -> UnlearningResult:
    """Select salient rows at the base, then train only them with a larger learning rate."""
    config = config or SureConfig()
    model, batches, optim = task.model, task.batches, task.optim
    names = trainable_names(model, optim.trainable)
    if not names:
        raise WorkbenchError("SURE: the trainable set is empty")
    saliency = row_saliency(model, batches, names)
    masks = row_masks(model, saliency, config.row_fraction)
    scaled = replace(optim, lr=optim.lr * config.lr_scale)
    objective = GRADIENT_OBJECTIVES[config.objective](task.baseline)
    result = run_gradient_method(task, objective, method="sure", optim=scaled, names=names, grad_mask=masks)
    conv1d = model.adapter.transposed
    chosen = {n: int(m.reshape(-1).sum()) if m.ndim == 1 else int(m.any(dim=0 if n in conv1d else 1).sum())
              for n, m in masks.items()}
    result.diagnostics.update({
        "rows_total": sum(int(s.numel()) for s in saliency.values()), "rows_selected": sum(chosen.values()),
        "rows_by_param": chosen, "lr": scaled.lr, "config": config.__dict__,
    })
    return result

