"""Unlearning losses on answer-position logits (docs/SCIENCE.md §4). All are *minimised*.

Shapes: either ``logits`` ``[n, vocab]`` at the answer position with ``answers`` ``[n]``
token ids (one token per answer, ``|y| = 1``), or the whole answer span teacher-forced,
``logits`` ``[n, A, vocab]`` with ``answers`` ``[n, A]`` and ``mask`` ``[n, A]`` (the real
answer tokens; :func:`workbench.models.scoring.span_logits`). A sequence log-probability is
then the sum over the answer's tokens. ``ref_logits`` are the frozen base model's logits for
the same rows, in the same shape. Everything is batched; padding is masked, never looped over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _span_mask(logits: torch.Tensor, answers: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if logits.ndim != 3 or answers.shape != logits.shape[:2]:
        raise ValueError(f"span logits {tuple(logits.shape)} need answers [n, A], got {tuple(answers.shape)}")
    return torch.ones_like(answers, dtype=torch.bool) if mask is None else mask


def answer_logprob(logits: torch.Tensor, answers: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[n]`` log p(answer | prompt): the answer token's, or the sum over the span's real tokens."""
    if logits.ndim == 2:
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, answers[:, None]).squeeze(-1)
    token = torch.log_softmax(logits.float(), dim=-1).gather(-1, answers[..., None]).squeeze(-1)
    return (token * _span_mask(logits, answers, mask)).sum(-1)


def answer_length(answers: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[n]`` number of answer tokens |y| (1 per row for ``[n]`` answers)."""
    if answers.ndim == 1:
        return torch.ones(answers.shape, device=answers.device)
    return (torch.ones_like(answers) if mask is None else mask).sum(-1).float()


def nll(logits: torch.Tensor, answers: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of the answers (each summed over its tokens)."""
    return -answer_logprob(logits, answers, mask).mean()


def gradient_ascent(logits: torch.Tensor, answers: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """GA: minimise −NLL on forget (i.e. push the answers' likelihood down without bound)."""
    return -nll(logits, answers, mask)


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) summed over the vocabulary, mean over rows (the retain term of GA+KLR /
    NPO+KLR); for span logits the mean runs over the real answer positions of ``mask``."""
    pointwise = F.kl_div(
        torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1),
        reduction="none", log_target=True,
    )
    if logits.ndim == 2:
        return pointwise.sum() / logits.shape[0]
    real = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device) if mask is None else mask
    return (pointwise * real[..., None]).sum() / real.sum()


def npo(logits: torch.Tensor, ref_logits: torch.Tensor, answers: torch.Tensor, beta: float = 0.1,
        mask: torch.Tensor | None = None) -> torch.Tensor:
    """NPO: −(2/β)·mean log σ(−β(log p_θ − log p_ref)) on forget (sequence log-probabilities)."""
    ratio = answer_logprob(logits, answers, mask) - answer_logprob(ref_logits, answers, mask).detach()
    return -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()


def simnpo(logits: torch.Tensor, answers: torch.Tensor, beta: float = 0.1, gamma: float = 0.0,
           length: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SimNPO: −(2/β)·mean log σ(−β·(log p_θ/|y|) − γ) (reference-free, length-normalised by
    each answer's own token count |y|, or by ``length`` when given)."""
    norm = answer_length(answers, mask) if length is None else length
    return -(2.0 / beta) * F.logsigmoid(-beta * answer_logprob(logits, answers, mask) / norm - gamma).mean()


def rmu_forget(acts: torch.Tensor, mask: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """RMU's forget term: mean squared distance of the steered activations to ``c·u``.

    Args:
        acts: ``[n, seq, d]`` residual activations of the trained model at the RMU layer.
        mask: ``[n, seq]`` bool, the real (non-padding) tokens.
        control: ``[d]`` the fixed control vector ``c·u`` (u a random unit vector).

    Returns ``Σ_real ‖h_t − c·u‖² / (n_real · d)`` (``F.mse_loss`` over the real tokens).
    """
    diff = acts[mask] - control.to(acts.dtype)
    return (diff.float() ** 2).mean()


def rmu_retain(acts: torch.Tensor, frozen: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU's retain term: mean squared distance to the frozen base's activations on retain
    prompts, ``Σ_real ‖h_t − h⁰_t‖² / (n_real · d)`` (shapes as in :func:`rmu_forget`)."""
    return ((acts[mask].float() - frozen[mask].float().detach()) ** 2).mean()


def quail_hinge(logits: torch.Tensor, ref_logits: torch.Tensor, answers: torch.Tensor,
                margin: torch.Tensor) -> torch.Tensor:
    """QUAIL's logit-space hinge: ``mean_i max(0, m_i − (z_ref,i − z_θ,i))``.

    ``z`` is the raw logit of row i's answer token, ``m_i`` its margin (``[n]`` or a
    scalar, in logit units; see :mod:`workbench.unlearning.quail`). The loss is zero once
    the answer's logit has fallen at least ``m_i`` below the original model's.
    """
    z = logits.float().gather(-1, answers[:, None]).squeeze(-1)
    z_ref = ref_logits.float().gather(-1, answers[:, None]).squeeze(-1).detach()
    return torch.relu(margin.to(z.dtype) - (z_ref - z)).mean()


def kl_on_retain(model_logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Measured retain KL(p_ref ‖ p_θ) as a number (for reports)."""
    with torch.no_grad():
        return float(kl_to_reference(model_logits, ref_logits))
