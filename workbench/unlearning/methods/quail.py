"""QUAIL — quantization-aware unlearning (Mishra & Mehreen, 2026), docs/SCIENCE.md §4.

GA+GDR plus a hinge in logit space: every forget example's answer logit must end at
least a margin ``m_i`` below the original model's,

    loss = −NLL_f + α·NLL_r + λ · mean_i max(0, m_i − (z_ref,i − z_θ,i))

(:func:`workbench.unlearning.losses.quail_hinge`), with ``m_i`` = **half the local
quantization step**, carried into logit units. The paper states the margin as "half the
quantization step" Δ/2 without saying how a weight-space step becomes a logit; our
reading, which keeps units consistent:

    the answer logit is ``z_y = W_U[y] · h`` (``W_U`` the unembedding ``[vocab, d]``, ``h``
    the final-norm hidden state at the answer position). Rounding each weight of the row
    ``W_U[y]`` to its code moves it by at most half its local bin width ``Δ_{y,k}/2``
    (:class:`workbench.quant.BinGeometry`), so ``z_y`` moves by at most

        m_i = ½ · Σ_k Δ_{y_i,k} · |h_{i,k}|        (the logit image of half a local step)

``Δ`` comes from :func:`workbench.quant.bin_geometry` of the unembedding under the run's
quantizer, ``h`` from the frozen base; both are fixed before training. bitsandbytes
deployments usually keep the head in full precision, so ``m_i`` is a *scale* — how far
an answer logit must move to be distinguishable at the quantizer's resolution — not a
literal rounding bound of the deployed model. ``margin_scale`` multiplies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.core.checks import Range, check_config
from workbench.core.errors import WorkbenchError
from workbench.models.loaded import LoadedModel
from workbench.models.scoring import FactBatch, span_logits, uncached
from workbench.quant import QuantConfig, bin_geometry
from workbench.unlearning import losses
from workbench.unlearning.loop import DeclaredObjective, run_gradient_method
from workbench.unlearning.objectives import given
from workbench.unlearning.result import UnlearningResult
from workbench.unlearning.task import UnlearningTask


@dataclass(frozen=True)
class QuailConfig:
    """QUAIL's hyper-parameters.

    Attributes:
        alpha: weight of the retain NLL (GDR) term.
        hinge_weight: λ, weight of the logit hinge.
        margin_scale: multiplies the half-step margin (1.0 = the paper's Δ/2).
    """

    alpha: float = 1.0
    hinge_weight: float = 1.0
    margin_scale: float = 1.0

    def __post_init__(self) -> None:
        check_config(self, {"alpha": Range(0, 10**6), "hinge_weight": Range(0, 10**6),
                            "margin_scale": Range(0, 10**6, low_open=True)})


def final_hidden(module: torch.nn.Module, batch: FactBatch) -> torch.Tensor:
    """``[n, d]`` final-norm hidden state at each prompt's last token (the unembedding's input)."""
    body = getattr(module, "base_model", module)
    with torch.no_grad():
        hidden = body(batch.ids, **uncached(body)).last_hidden_state
        return hidden[torch.arange(len(batch), device=batch.last.device), batch.last]


def local_logit_steps(model: LoadedModel, batch: FactBatch, quant: QuantConfig) -> torch.Tensor:
    """``[n]`` full local quantization step of each row's answer logit, ``Σ_k Δ_{y,k} |h_k|``."""

    head = model.hf.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise WorkbenchError(f"model {model.name!r} has no output embedding to measure the logit step on")
    widths = bin_geometry(head.weight.detach().float(), quant, transposed=False).bin_width  # [vocab, d]
    h = final_hidden(model.hf, batch).float()  # [n, d]
    return (widths[batch.answers] * h.abs()).sum(-1)


def quail_margins(model: LoadedModel, batch: FactBatch, quant: QuantConfig, scale: float = 1.0) -> torch.Tensor:
    """``[n]`` QUAIL margins: ``scale`` × half the local logit step."""
    return 0.5 * scale * local_logit_steps(model, batch, quant)


def _row_key(batch: FactBatch, i: int) -> tuple[int, ...]:
    return (*batch.ids[i, : int(batch.last[i]) + 1].tolist(), int(batch.answers[i]))


def quail(task: UnlearningTask, config: QuailConfig | None = None) -> UnlearningResult:
    """GA+GDR plus the half-step logit hinge, through the shared loop.

    Without a config, the GDR weight α is the task's shared baseline α."""
    config = config or QuailConfig(alpha=task.baseline.alpha)
    model, batches, quant = task.model, task.batches, task.quant
    margins = quail_margins(model, batches.forget, quant, config.margin_scale)
    # The loop hands the objective a random subset of rows; margins are looked up by the
    # row's own tokens, so they follow their example whatever the sampling.
    by_row = {_row_key(batches.forget, i): float(m) for i, m in enumerate(margins)}

    def objective(work: torch.nn.Module, fb: FactBatch, ref_f: torch.Tensor | None, rb: FactBatch,
                  _ref_r: torch.Tensor | None) -> torch.Tensor:
        logits = span_logits(work, fb)
        m = torch.tensor([by_row[_row_key(fb, i)] for i in range(len(fb))], device=fb.ids.device)
        loss = losses.gradient_ascent(logits, fb.targets, fb.mask)
        # The margin is computed for the answer's first token (its logit step under quantization).
        loss = loss + config.hinge_weight * losses.quail_hinge(logits[:, 0], given(ref_f, "quail")[:, 0], fb.answers, m)
        if config.alpha > 0:
            loss = loss + config.alpha * losses.nll(span_logits(work, rb), rb.targets, rb.mask)
        return loss

    declared = DeclaredObjective(objective, forget_reference=True, retain_reference=False)
    result = run_gradient_method(task, declared, method="quail")
    result.diagnostics.update({
        "margin_mean": float(margins.mean()), "margin_min": float(margins.min()), "margin_max": float(margins.max()),
        "quant": quant.label, "config": config.__dict__,
    })
    return result
