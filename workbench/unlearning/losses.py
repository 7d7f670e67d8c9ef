"""Unlearning losses on answer-position logits (docs/SCIENCE.md §4). All are *minimised*.

Shapes: ``logits`` ``[n, vocab]`` at the answer position, ``answers`` ``[n]`` token ids,
``ref_logits`` the frozen base model's logits for the same rows. Our facts have
single-token answers (the first token for BPE models), so a "sequence" log-probability
is the answer token's log-probability and ``|y| = 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def answer_logprob(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """``[n]`` log p(answer | prompt)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, answers[:, None]).squeeze(-1)


def nll(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the answers."""
    return -answer_logprob(logits, answers).mean()


def gradient_ascent(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """GA: minimise −NLL on forget (i.e. push the answers' likelihood down without bound)."""
    return -nll(logits, answers)


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p_θ), batch mean (the retain term of GA+KLR / NPO+KLR)."""
    return F.kl_div(
        torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1),
        reduction="batchmean", log_target=True,
    )


def npo(logits: torch.Tensor, ref_logits: torch.Tensor, answers: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """NPO: −(2/β)·mean log σ(−β(log p_θ − log p_ref)) on forget."""
    ratio = answer_logprob(logits, answers) - answer_logprob(ref_logits, answers).detach()
    return -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()


def simnpo(logits: torch.Tensor, answers: torch.Tensor, beta: float = 0.1, gamma: float = 0.0,
           length: int = 1) -> torch.Tensor:
    """SimNPO: −(2/β)·mean log σ(−β·(log p_θ/|y|) − γ) (reference-free, length-normalised)."""
    return -(2.0 / beta) * F.logsigmoid(-beta * answer_logprob(logits, answers) / length - gamma).mean()


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
