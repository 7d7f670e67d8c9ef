"""Fact accuracy of a model, in full precision or quantized.

Each metric is named in the report (``workbench eval`` prints them all):

- ``top1`` (first-token top-1), as defined in :mod:`workbench.models.scoring`: the answer's
  first token is the argmax. For single-token answers it is the whole answer; the report
  card's forgetting property uses it.
- ``exact`` (greedy exact match): greedy decoding after the prompt reproduces the whole
  answer span (every answer token is the argmax, teacher-forced).
- ``logprob``: mean over facts of log p(answer | prompt), summed over the answer's tokens.
- Multiple choice (``mc``) scores each candidate by the summed log-probability of its tokens
  after the prompt and picks the best (chance = 1/len(choices), 0.25 for the built-ins).
- ``mean_prob`` is the mean probability of the answer's first token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact, FactSplit
from workbench.models.loaded import LoadedModel, hf_module
from workbench.models.scoring import (
    ChoiceBatch,
    FactBatch,
    by_rows,
    encode_prompts,
    is_top1,
    last_token_logit_chunks,
    last_token_logits,
    span_scores,
)
from workbench.quant import QuantConfig, quantized_copy


@dataclass(frozen=True)
class FactScores:
    """Accuracy of one model on one fact set.

    Attributes:
        top1: first-token top-1, the fraction of facts whose answer's first token is the argmax.
        mc: multiple-choice accuracy (``nan`` if no fact has choices).
        mean_prob: mean probability of the answer's first token.
        n: number of facts.
        correct: per-fact top-1 correctness, in input order.
        exact: greedy exact match, the fraction whose whole answer span greedy decoding
            reproduces (equals ``top1`` when every answer is one token).
        logprob: mean log p(answer | prompt), summed over each answer's tokens.
    """

    top1: float
    mc: float
    mean_prob: float
    n: int
    correct: tuple[bool, ...] = field(repr=False, default=())
    exact: float = float("nan")
    logprob: float = float("nan")

    def to_dict(self) -> dict[str, float | int]:
        return {"top1": self.top1, "exact": self.exact, "logprob": self.logprob, "mc": self.mc,
                "mean_prob": self.mean_prob, "n": self.n}


def multiple_choice_accuracy(model: LoadedModel | torch.nn.Module, facts: Sequence[Fact], *, tokenizer: Any = None,
                             batch_size: int = 128) -> float:
    """:func:`evaluate_facts`' ``mc`` alone (``nan`` when no fact has choices)."""
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise WorkbenchError("multiple_choice_accuracy needs a tokenizer for a bare module")
    return _mc_accuracy(hf_module(model), tokenizer, facts, batch_size)


def _mc_accuracy(hf: torch.nn.Module, tokenizer: Any, facts: Sequence[Fact], batch_size: int) -> float:
    """Multiple-choice accuracy by summed candidate log-probability (the facts with choices;
    the same scoring the unlearning stop rules use on a multiple-choice forget set)."""
    with_choices = [f for f in facts if f.choices]
    if not with_choices:
        return float("nan")
    choices = ChoiceBatch.from_facts(tokenizer, with_choices)
    return float(choices.correct(span_scores(hf, choices.rows, batch_size)[0]).float().mean())


def evaluate_facts(
    model: LoadedModel | torch.nn.Module,
    facts: Sequence[Fact],
    *,
    tokenizer: Any = None,
    batch_size: int = 128,
    multiple_choice: bool = True,
    first_token: FirstTokenReads | None = None,
) -> FactScores:
    """First-token top-1, greedy exact match, answer log-probability, multiple-choice accuracy
    and mean first-token probability of ``model`` on ``facts``.

    ``first_token``: the facts' first-token reads when the caller already took them from the same
    forwards (:func:`retain_reads_and_kl`), so those forwards do not run twice."""
    hf = hf_module(model)
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise WorkbenchError("evaluate_facts needs a tokenizer for a bare module")
    if len(facts) == 0:
        return FactScores(top1=float("nan"), mc=float("nan"), mean_prob=float("nan"), n=0)
    ids, last, answers = encode_prompts(tokenizer, [f.prompt for f in facts], [f.answer for f in facts])
    if first_token is None:
        reads = _first_token_reads(hf, ids, last, answers, batch_size)
    elif first_token.correct.shape != (len(facts),):
        raise WorkbenchError(f"first_token must read {len(facts)} facts, it reads {first_token.correct.shape[0]}")
    else:
        reads = first_token
    correct, probs = reads.correct, reads.prob
    mc = _mc_accuracy(hf, tokenizer, facts, batch_size) if multiple_choice else float("nan")
    batch = FactBatch.from_facts(tokenizer, facts)
    if batch.targets.shape[1] == 1:  # one token each: the span is the first token (no second pass)
        logp, exact = reads.logprob, correct
    else:
        logp, exact = span_scores(hf, batch, batch_size)
    return FactScores(
        top1=float(correct.float().mean()),
        mc=mc,
        mean_prob=float(probs.mean()),
        n=len(facts),
        correct=tuple(bool(c) for c in correct),
        exact=float(exact.float().mean()),
        logprob=float(logp.mean()),
    )


ROWS_PER_SOFTMAX = 128
"""Rows of ``[n, vocab]`` logits normalised at a time (:func:`_at_answers`, the retain KL)."""


def _at_answers(normalise: Callable[..., torch.Tensor], logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """``[n]`` ``normalise(logits.float(), dim=-1)`` at each row's answer, over chunks of rows.

    Softmax is row by row, so each row's value is the whole tensor's bit for bit (tested); the
    chunks spare a float ``[n, vocab]`` copy at once (125 MB for SmolLM2's 634 retain facts)."""
    def at_answers(part: torch.Tensor, part_answers: torch.Tensor) -> torch.Tensor:
        return normalise(part.float(), dim=-1)[torch.arange(part.shape[0]), part_answers]

    return by_rows(at_answers, logits, answers.to(logits.device), rows=ROWS_PER_SOFTMAX).cpu()


@dataclass(frozen=True)
class FirstTokenReads:
    """Per fact, in input order (``[n]`` each, on the CPU), from the logits at its last prompt
    token: whether the answer's first token is the argmax, and its probability and log-probability."""

    correct: torch.Tensor
    prob: torch.Tensor
    logprob: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor, answers: torch.Tensor) -> FirstTokenReads:
        """From ``[n, vocab]`` logits and ``[n]`` answer token ids."""
        return cls(correct=is_top1(logits, answers.to(logits.device)).cpu(),
                   prob=_at_answers(torch.softmax, logits, answers),
                   logprob=_at_answers(torch.log_softmax, logits, answers))


def _first_token_reads(hf: torch.nn.Module, ids: torch.Tensor, last: torch.Tensor, answers: torch.Tensor,
                       batch_size: int) -> FirstTokenReads:
    """:class:`FirstTokenReads` read chunk by chunk as the forwards come, so the ``[n, vocab]``
    logits are never held at once (119 MiB for SmolLM2's 634 retain facts in float32). Each
    number is a row's own reduction, so it is the same bits as from the whole logits (tested)."""
    n = answers.shape[0]
    correct, prob, logprob = torch.empty(n, dtype=torch.bool), torch.empty(n), torch.empty(n)
    for rows, logits in last_token_logit_chunks(hf, ids, last, batch_size):
        part = FirstTokenReads.of(logits, answers[rows])
        correct[rows], prob[rows], logprob[rows] = part.correct, part.prob, part.logprob
    return FirstTokenReads(correct=correct, prob=prob, logprob=logprob)


def _kl_rows(base: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``[n]`` KL(p_base ‖ p_after) of each row of two ``[n, vocab]`` logits (float32 math)."""
    lb, la = torch.log_softmax(base.float(), -1), torch.log_softmax(after.float(), -1)
    return (lb.exp() * (lb - la)).sum(-1)


def retain_reads_and_kl(base: LoadedModel, after: LoadedModel, facts: Sequence[Fact],
                        batch_size: int = 128) -> tuple[FirstTokenReads, float]:
    """``after``'s first-token reads on ``facts`` (as :func:`evaluate_facts` takes them) and the
    mean KL(p_base ‖ p_after) of the next token at each prompt's last token, from one walk over
    both models' logits a chunk at a time: neither model's ``[n, vocab]`` logits are held (119 MiB
    each for SmolLM2's 634 retain facts). Both models see the same chunks, so each row's logits
    are the bits :func:`prompt_logits` gives, and so is each row's KL (tested). No facts: no
    reads and a ``nan`` KL."""
    if len(facts) == 0:
        none = torch.empty(0)
        return FirstTokenReads(correct=none.bool(), prob=none, logprob=none), float("nan")
    ids, last, answers = encode_prompts(after.tokenizer, [f.prompt for f in facts], [f.answer for f in facts])
    n = answers.shape[0]
    correct, prob, logprob, kl = (torch.empty(n, dtype=torch.bool), torch.empty(n), torch.empty(n),
                                  torch.empty(n))
    walks = zip(last_token_logit_chunks(base.hf, ids, last, batch_size),
                last_token_logit_chunks(after.hf, ids, last, batch_size), strict=True)
    for (rows, base_logits), (_, after_logits) in walks:
        part = FirstTokenReads.of(after_logits, answers[rows])
        correct[rows], prob[rows], logprob[rows] = part.correct, part.prob, part.logprob
        kl[rows] = by_rows(_kl_rows, base_logits, after_logits.to(base_logits.device), rows=ROWS_PER_SOFTMAX).cpu()
    return FirstTokenReads(correct=correct, prob=prob, logprob=logprob), float(kl.mean())


def prompt_logits(model: LoadedModel, facts: Sequence[Fact], *, batch_size: int = 128) -> torch.Tensor:
    """``[n, vocab]`` logits at each fact's last prompt token, as :func:`evaluate_facts` reads them
    (same chunks, so bit for bit the same)."""
    ids, last, _ = encode_prompts(model.tokenizer, [f.prompt for f in facts])
    return last_token_logits(model.hf, ids, last, batch_size)


def evaluate_split(
    model: LoadedModel,
    split: FactSplit,
    *,
    quant: QuantConfig | None = None,
    multiple_choice: bool = True,
) -> dict[str, FactScores]:
    """Scores on forget/retain/paraphrase sets, in full precision or through ``quant``.

    With ``quant`` the model is fake-quantized into a copy first; the base is untouched.
    """
    target = model.hf if quant is None else quantized_copy(model.hf, quant)
    sets = {
        "forget": split.forget,
        "retain": split.retain,
        "forget_paraphrase": split.forget_paraphrase,
        "retain_paraphrase": split.retain_paraphrase,
    }
    return {
        key: evaluate_facts(target, facts, tokenizer=model.tokenizer, multiple_choice=multiple_choice)
        for key, facts in sets.items()
        if facts
    }


def fact_top1(model: LoadedModel | torch.nn.Module, facts: Sequence[Fact], tokenizer: Any = None) -> float:
    """Top-1 accuracy alone (no multiple choice): :func:`evaluate_facts`' ``top1``."""
    return evaluate_facts(model, facts, tokenizer=tokenizer, multiple_choice=False).top1
