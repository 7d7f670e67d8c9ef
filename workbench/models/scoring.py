"""What a model answers: facts encoded as tensors, answer logits, and top-1.

The one place that turns facts into model inputs and reads the answer back, shared by
training, evaluation, attribution and every unlearning method.

- A cloze fact is scored at the last prompt token: top-1 is correct when the argmax of
  the next-token distribution is the *first token* of ``" " + answer`` (for the built-in
  word-level models that is the whole answer; for BPE models like SmolLM2 the first piece).
- Answers of several tokens are also scored over their whole span, teacher-forced: the
  batch holds ``prompt + answer[:-1]`` and answer token k is predicted at ``last + k``
  (:func:`span_logits`). A single-token answer adds no input column, so its numbers are
  those of the first-token scoring exactly.
- Prompts are right-padded into one batch; with causal attention the last real token never
  attends to padding, so no attention mask is needed and results equal unpadded runs up to
  float rounding (the padding changes the matrix products' shapes, hence their summation
  order: on SmolLM2 logits move by up to ~5e-5). No-grad top-1 is therefore read in chunks
  of similar prompt length, each trimmed to its longest prompt (:func:`length_chunks`), by
  :func:`last_token_logits` and :func:`correct` alike, so the same facts give the same
  logits, bit for bit, wherever top-1 is read; a padded batch's forward costs its longest
  row times its rows (2.4× the chunked forwards on SmolLM2's retain facts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from workbench.core.device import module_device
from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact


def answer_token(tokenizer: Any, answer: str) -> int:
    """First token id of ``" " + answer`` (see the module docstring)."""
    return answer_tokens(tokenizer, answer)[0]


def answer_tokens(tokenizer: Any, answer: str) -> list[int]:
    """All token ids of ``" " + answer`` (the answer's span after the prompt)."""
    ids = [int(i) for i in tokenizer(" " + answer, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise WorkbenchError(f"answer {answer!r} encodes to no tokens")
    return ids


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], answers: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize prompts into a right-padded batch.

    Returns:
        ids: ``[n, max_len]`` token ids, padded with the pad token.
        last: ``[n]`` index of each prompt's last real token.
        answers: ``[n]`` first-token ids of the answers (empty if ``answers`` is None).
    """
    if len(prompts) == 0:
        raise WorkbenchError("no prompts to encode")
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    for prompt, ids in zip(prompts, encoded):
        if not ids:
            raise WorkbenchError(f"prompt {prompt!r} encodes to no tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(ids) for ids in encoded)
    batch = torch.full((len(encoded), width), pad, dtype=torch.long)
    for row, ids in enumerate(encoded):
        batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    last = torch.tensor([len(ids) - 1 for ids in encoded], dtype=torch.long)
    if answers is None:
        return batch, last, torch.empty(0, dtype=torch.long)
    if len(answers) != len(prompts):
        raise WorkbenchError(f"{len(prompts)} prompts but {len(answers)} answers")
    ans = torch.tensor([answer_token(tokenizer, a) for a in answers], dtype=torch.long)
    return batch, last, ans


TOP1_CHUNK = 128
"""Rows per forward when top-1 is read without grad (:func:`length_chunks`)."""

_chunked = True  # process-wide, as models.prefix's switch: the bench's reference path turns it off


@contextmanager
def whole_batches() -> Iterator[None]:
    """Within it, :func:`correct` runs one padded forward per batch (``workbench bench flow``'s
    reference path: how top-1 was read inside unlearning runs before the chunks)."""
    global _chunked
    saved, _chunked = _chunked, False
    try:
        yield
    finally:
        _chunked = saved


def length_chunks(last: torch.Tensor, size: int = TOP1_CHUNK) -> Iterator[tuple[torch.Tensor, int]]:
    """``(rows, width)`` per chunk: up to ``size`` rows in order of prompt length (``last``: each
    row's last prompt position) and the chunk's longest prompt, the only columns top-1 reads.

    Every no-grad top-1 in the workbench is read over these chunks, so one fact set gives
    bit-identical logits wherever it is scored (see the module docstring)."""
    order = torch.argsort(last.cpu(), stable=True).to(last.device)
    for start in range(0, last.numel(), size):
        rows = order[start : start + size]
        yield rows, int(last[rows].max()) + 1


def last_token_logit_chunks(hf: torch.nn.Module, ids: torch.Tensor, last: torch.Tensor,
                            batch_size: int = TOP1_CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(rows, [len(rows), vocab] logits)`` at the last real token of each prompt of a chunk
    (:func:`length_chunks`), one chunk at a time, on the model's device (no grad): for reading
    per-fact numbers without holding ``[n, vocab]``."""
    # Chunks of similar length waste little on padding, and the unembedding (49k x 576 for
    # SmolLM2) runs on the one position we read instead of every position.
    device = module_device(hf)
    for rows, width in length_chunks(last, batch_size):
        with torch.no_grad():
            logits = logits_at(hf, ids[rows, :width].to(device), (torch.arange(rows.numel()), last[rows]))
        yield rows, logits


def last_token_logits(hf: torch.nn.Module, ids: torch.Tensor, last: torch.Tensor,
                      batch_size: int = TOP1_CHUNK) -> torch.Tensor:
    """``[n, vocab]`` logits at each prompt's last real token (no grad), on the CPU."""
    out = torch.empty(0)
    for rows, logits in last_token_logit_chunks(hf, ids, last, batch_size):
        if out.numel() == 0:
            out = torch.empty(ids.shape[0], logits.shape[-1], dtype=logits.dtype)
        out[rows] = logits.cpu()
    return out


def logits_at(model: torch.nn.Module, ids: torch.Tensor, pick: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Logits at the ``(row, position)`` pairs ``pick`` of a forward pass over ``ids``.

    The unembedding runs only at the picked positions (for SmolLM2 it is 49k x 576 per position,
    more than the rest of a short prompt's forward).
    """
    body: Any = getattr(model, "base_model", None)
    unembed = getattr(model, "get_output_embeddings", None)
    head: Any = unembed() if callable(unembed) else None
    if body is not None and head is not None and body is not model:
        return head(body(ids, **uncached(body)).last_hidden_state[pick])
    return model(ids, **uncached(model)).logits[pick]


def uncached(model: torch.nn.Module) -> dict[str, bool]:
    """``use_cache=False`` for a transformers model (nothing for another module): its forward
    would otherwise fill a key/value cache for every layer that a scoring forward never reads
    (on SmolLM2, a 256-fact forward's peak was 120-260 MiB higher with it; the outputs are equal)."""
    return {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}


@dataclass(frozen=True)
class FactBatch:
    """Encoded facts, with their answers' whole token spans for teacher forcing.

    Attributes:
        ids: ``[n, seq]`` right-padded ``prompt + answer[:-1]`` token ids (only the prompt for a
            single-token answer).
        last: ``[n]`` position of each prompt's last token (where the answer's first token is
            predicted; answer token k is predicted at ``last + k``).
        answers: ``[n]`` answer first-token ids.
        targets: ``[n, A]`` answer token ids, padded with 0 (``A`` the longest answer).
        mask: ``[n, A]`` bool, the real answer tokens of ``targets``.
    """

    ids: torch.Tensor
    last: torch.Tensor
    answers: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        n = self.ids.shape[0]
        if (self.ids.ndim != 2 or self.last.shape != (n,) or self.answers.shape != (n,)
                or self.targets.ndim != 2 or self.targets.shape[0] != n or self.mask.shape != self.targets.shape):
            raise WorkbenchError(
                f"inconsistent batch shapes: ids {tuple(self.ids.shape)}, last {tuple(self.last.shape)}, "
                f"answers {tuple(self.answers.shape)}, targets {tuple(self.targets.shape)}, "
                f"mask {tuple(self.mask.shape)}"
            )

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """``[n]`` number of answer tokens per row."""
        return self.mask.sum(-1)

    @classmethod
    def from_facts(cls, tokenizer: Any, facts: Sequence[Fact]) -> FactBatch:
        if not facts:
            raise WorkbenchError("an empty fact set cannot be batched")
        return cls.from_pairs(tokenizer, [f.prompt for f in facts], [f.answer for f in facts])

    @classmethod
    def from_pairs(cls, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str]) -> FactBatch:
        """A batch of ``prompt`` / ``answer`` texts (the answer follows after one space)."""
        if len(prompts) == 0:
            raise WorkbenchError("no prompts to encode")
        if len(answers) != len(prompts):
            raise WorkbenchError(f"{len(prompts)} prompts but {len(answers)} answers")
        encoded = [[int(i) for i in tokenizer(p)["input_ids"]] for p in prompts]
        for prompt, ids in zip(prompts, encoded):
            if not ids:
                raise WorkbenchError(f"prompt {prompt!r} encodes to no tokens")
        spans = [answer_tokens(tokenizer, a) for a in answers]
        rows = [p + a[:-1] for p, a in zip(encoded, spans)]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
        targets = torch.zeros((len(rows), max(len(a) for a in spans)), dtype=torch.long)
        mask = torch.zeros(targets.shape, dtype=torch.bool)
        for i, (row, span) in enumerate(zip(rows, spans)):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            targets[i, : len(span)] = torch.tensor(span, dtype=torch.long)
            mask[i, : len(span)] = True
        last = torch.tensor([len(p) - 1 for p in encoded], dtype=torch.long)
        return cls(ids, last, targets[:, 0].clone(), targets, mask)

    def to(self, device: torch.device | str) -> FactBatch:
        """The same batch on ``device`` (itself when already there)."""
        if self.ids.device == torch.device(device):
            return self
        return FactBatch(self.ids.to(device), self.last.to(device), self.answers.to(device),
                         self.targets.to(device), self.mask.to(device))

    def subset(self, index: torch.Tensor) -> FactBatch:
        index = index.to(self.ids.device)
        mask = self.mask[index]
        # Trim columns that are padding for every row of the subset (the prompt and all but
        # the answer's last token are inputs).
        width = int((self.last[index] + mask.sum(-1)).max())
        span = int(mask.sum(-1).max())
        return FactBatch(self.ids[index][:, :width], self.last[index], self.answers[index],
                         self.targets[index][:, :span], mask[:, :span])

    def longest(self) -> FactBatch:
        """The one fact with the most tokens (prompt and answer; the first of equals)."""
        return self.subset((self.last + self.mask.sum(-1)).argmax().reshape(1))

    def prompts(self, index: torch.Tensor, width: int) -> FactBatch:
        """The rows ``index`` cut to their first ``width`` columns: enough for the answer logits
        at ``last`` when ``width > last`` for every row (top-1), not for the answer spans."""
        index = index.to(self.ids.device)
        return FactBatch(self.ids[index][:, :width], self.last[index], self.answers[index],
                         self.targets[index], self.mask[index])

    def sample(self, size: int, generator: torch.Generator) -> FactBatch:
        """A random subset of ``size`` rows (all rows if ``size`` >= n)."""
        if size >= len(self):
            return self
        return self.subset(torch.randperm(len(self), generator=generator)[:size])


def answer_logits(model: torch.nn.Module, batch: FactBatch) -> torch.Tensor:
    """``[n, vocab]`` logits at each prompt's last token, one forward (with grad if the model has it)."""
    return logits_at(model, batch.ids, (torch.arange(len(batch), device=batch.last.device), batch.last))


def span_positions(batch: FactBatch) -> torch.Tensor:
    """``[n, A]`` the positions whose logits predict each answer token (padding clamped in range)."""
    offsets = torch.arange(batch.targets.shape[1], device=batch.last.device)
    return (batch.last[:, None] + offsets[None, :]).clamp(max=batch.ids.shape[1] - 1)


def span_logits(model: torch.nn.Module, batch: FactBatch) -> torch.Tensor:
    """``[n, A, vocab]`` logits predicting each answer token, teacher-forced, one forward (with
    grad if the model has it). Rows past an answer's end are padding (see ``batch.mask``)."""
    n, span = batch.targets.shape
    rows = torch.arange(n, device=batch.last.device)[:, None].expand(n, span)
    logits = logits_at(model, batch.ids, (rows.reshape(-1), span_positions(batch).reshape(-1)))
    return logits.reshape(n, span, -1)


def span_logprob(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[n]`` log p(answer | prompt) = Σ_k log p(y_k | prompt, y_<k) over the real tokens.

    ``logits`` ``[n, A, vocab]`` (from :func:`span_logits`), ``targets``/``mask`` ``[n, A]``.
    """
    def token(part: torch.Tensor, part_targets: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(part.float(), dim=-1).gather(-1, part_targets[..., None]).squeeze(-1)

    if logits.requires_grad and torch.is_grad_enabled():
        return (token(logits, targets) * mask).sum(-1)
    return (by_rows(token, logits, targets, rows=SPAN_ROWS_PER_SOFTMAX) * mask).sum(-1)


def by_rows(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, rows: int) -> torch.Tensor:
    """``fn`` on ``rows`` rows of ``tensors`` at a time, the results concatenated.

    For normalising vocab-sized logits without a float copy of them all at once: softmax is row
    by row, so each row comes out bit for bit as from ``fn`` on the whole tensors (tested)."""
    if tensors[0].shape[0] == 0:
        return fn(*tensors)
    return torch.cat([fn(*parts) for parts in zip(*(t.split(rows) for t in tensors))])


SPAN_ROWS_PER_SOFTMAX = 8
"""Facts whose ``[A, vocab]`` answer logits :func:`span_logprob` normalises at a time without grad: a
float copy of a whole evaluation batch's was the measurement's peak on SmolLM2 (64 × A × 49k)."""


def span_exact(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: greedy decoding reproduces the whole answer span.

    Teacher forcing is enough: greedy decoding emits the gold prefix as long as every earlier
    argmax was right, so the span is reproduced exactly when every real position's argmax is
    its target.
    """
    return ((logits.argmax(-1) == targets) | ~mask).all(-1)


def is_top1(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: the answer is the argmax of its row of ``[n, vocab]`` logits.

    The workbench's one definition of "the model answers the fact" (see the module docstring).
    """
    return logits.argmax(-1) == answers


def correct(model: torch.nn.Module, batch: FactBatch) -> torch.Tensor:
    """``[n]`` bool: which facts of ``batch`` ``model`` answers (no grad; forwards over
    :func:`length_chunks`, as :func:`last_token_logits`)."""
    return correct_by_chunks(batch, lambda part: answer_logits(model, part))


def correct_by_chunks(batch: FactBatch, logits_of: Callable[[FactBatch], torch.Tensor]) -> torch.Tensor:
    """``[n]`` bool top-1 of ``batch`` with ``logits_of`` (answer logits of a batch) run on each of
    :func:`length_chunks`' prompt-only chunks (on the whole batch within :func:`whole_batches`)."""
    with torch.no_grad():
        if not _chunked:
            return is_top1(logits_of(batch), batch.answers)
        out = torch.empty(len(batch), dtype=torch.bool, device=batch.answers.device)
        for rows, width in length_chunks(batch.last):
            part = batch.prompts(rows, width)
            out[rows] = is_top1(logits_of(part), part.answers).to(out.device)
        return out


def top1(model: torch.nn.Module, batch: FactBatch) -> float:
    """Fraction of ``batch`` that ``model`` answers."""
    return float(correct(model, batch).float().mean())


SPAN_LOGITS_BYTES = 32 * 2**20
"""The most answer logits one pass of :func:`span_scores` takes (``facts × A × vocab`` floats): on
SmolLM2's 634 retain facts (A = 7) passes of 128 facts took 264 MiB above the model, of 16 facts 30
MiB, in the same time (22–24 s on one thread)."""


def span_rows(model: torch.nn.Module, batch: FactBatch, batch_size: int) -> int:
    """Facts per pass of :func:`span_scores`: at most ``batch_size``, and as many as keep their
    answer logits within :data:`SPAN_LOGITS_BYTES` in float32 (``batch_size`` when the model does
    not say its vocabulary)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        return batch_size
    return max(1, min(batch_size, SPAN_LOGITS_BYTES // (max(1, batch.targets.shape[1]) * vocab * 4)))


def span_scores(model: torch.nn.Module, batch: FactBatch, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n]`` answer log-probabilities and ``[n]`` greedy exact matches of ``batch`` (no grad,
    in chunks of similar length so padding stays small, of at most ``batch_size`` facts and as
    few as keep the vocab-sized logits small: :func:`span_rows`)."""
    order = torch.argsort(batch.last + batch.lengths, stable=True)
    logp = torch.empty(len(batch))
    exact = torch.empty(len(batch), dtype=torch.bool)
    device = module_device(model)
    size = span_rows(model, batch, batch_size)
    with torch.no_grad():
        for start in range(0, len(batch), size):
            rows = order[start : start + size]
            part = batch.subset(rows).to(device)
            logits = span_logits(model, part)
            logp[rows] = span_logprob(logits, part.targets, part.mask).cpu()
            exact[rows] = span_exact(logits, part.targets, part.mask).cpu()
    return logp, exact


@dataclass(frozen=True)
class ChoiceBatch:
    """Multiple-choice facts as one :class:`FactBatch` of every (question, choice) pair, for
    scoring them the way lm-evaluation-harness scores ``acc``: the fact is answered when its
    answer has the highest summed log-probability among its choices (first choice on a tie,
    as ``argmax``).

    Attributes:
        rows: ``[m]`` one row per (fact, choice), ``prompt`` + " " + choice.
        fact: ``[m]`` which fact a row belongs to.
        slot: ``[m]`` the choice's index among its fact's choices.
        answer: ``[n]`` each fact's answer index.
    """

    rows: FactBatch
    fact: torch.Tensor
    slot: torch.Tensor
    answer: torch.Tensor

    @classmethod
    def from_facts(cls, tokenizer: Any, facts: Sequence[Fact]) -> ChoiceBatch:
        missing = [f.prompt for f in facts if not f.choices]
        if not facts or missing:
            raise WorkbenchError("multiple-choice scoring needs facts that all have choices"
                                 + (f" ({missing[0]!r} has none)" if missing else ""))
        pairs = [(i, k, f.prompt, c) for i, f in enumerate(facts) for k, c in enumerate(f.choices)]
        rows = FactBatch.from_pairs(tokenizer, [p[2] for p in pairs], [p[3] for p in pairs])
        return cls(rows, torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]),
                   torch.tensor([f.answer_index for f in facts]))

    def __len__(self) -> int:
        return int(self.answer.shape[0])

    def to(self, device: torch.device | str) -> ChoiceBatch:
        return ChoiceBatch(self.rows.to(device), self.fact.to(device), self.slot.to(device), self.answer.to(device))

    def subset(self, index: torch.Tensor) -> ChoiceBatch:
        """The facts ``index`` (in that order), each with all its rows."""
        index = index.cpu()
        renumber = torch.full((len(self),), -1, dtype=torch.long)
        renumber[index] = torch.arange(len(index))
        owner = renumber[self.fact.cpu()]
        rows = (owner >= 0).nonzero().squeeze(-1)
        device = self.fact.device
        return ChoiceBatch(self.rows.subset(rows), owner[rows].to(device), self.slot[rows.to(device)],
                           self.answer[index.to(device)])

    def correct(self, row_logprobs: torch.Tensor) -> torch.Tensor:
        """``[n]`` bool from the rows' answer log-probabilities (``[m]``, e.g. :func:`row_logprobs`)."""
        table = torch.full((len(self), int(self.slot.max()) + 1), -torch.inf, device=row_logprobs.device)
        table[self.fact.to(table.device), self.slot.to(table.device)] = row_logprobs.float()
        return table.argmax(-1) == self.answer.to(table.device)


def row_logprobs(model: torch.nn.Module, batch: FactBatch) -> torch.Tensor:
    """``[n]`` log p(answer | prompt) of each row, one forward (a forward for
    :meth:`~workbench.models.prefix.PrefixCache.run`; :func:`span_scores` chunks a large batch)."""
    return span_logprob(span_logits(model, batch), batch.targets, batch.mask)


def choice_correct(model: torch.nn.Module, choices: ChoiceBatch) -> torch.Tensor:
    """``[n]`` bool: which multiple-choice facts ``model`` answers (no grad, in chunks)."""
    return choices.correct(span_scores(model, choices.rows)[0])


def fact_correct(model: torch.nn.Module, tokenizer: Any, facts: Sequence[Fact], batch_size: int = 128) -> torch.Tensor:
    """``[n]`` bool, like :func:`correct`, for a fact list of any size (in length-sorted chunks)."""
    ids, last, answers = encode_prompts(tokenizer, [f.prompt for f in facts], [f.answer for f in facts])
    return is_top1(last_token_logits(model, ids, last, batch_size), answers)


def fact_logprobs(model: torch.nn.Module, tokenizer: Any, facts: Sequence[Fact], batch_size: int = 128) -> torch.Tensor:
    """``[n]`` log p(answer | prompt) per fact, summed over the answer's tokens (no grad). With
    one-token answers it is the first-token scoring itself (the same batches, the same numbers)."""
    batch = FactBatch.from_facts(tokenizer, facts)
    if batch.targets.shape[1] > 1:
        return span_scores(model, batch, batch_size)[0]
    logits = last_token_logits(model, batch.ids, batch.last, batch_size)
    return torch.log_softmax(logits.float(), -1)[torch.arange(len(facts)), batch.answers]
