"""Forget/retain facts as tensors ready for a loss: right-padded ids, last positions, answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from workbench.errors import WorkbenchError
from workbench.evaluation import encode_prompts

if TYPE_CHECKING:
    from workbench.facts import Fact


@dataclass(frozen=True)
class FactBatch:
    """Encoded cloze facts.

    Attributes:
        ids: ``[n, seq]`` right-padded token ids.
        last: ``[n]`` position of each prompt's last token (where the answer is predicted).
        answers: ``[n]`` answer first-token ids.
    """

    ids: torch.Tensor
    last: torch.Tensor
    answers: torch.Tensor

    def __post_init__(self) -> None:
        n = self.ids.shape[0]
        if self.ids.ndim != 2 or self.last.shape != (n,) or self.answers.shape != (n,):
            raise WorkbenchError(
                f"inconsistent batch shapes: ids {tuple(self.ids.shape)}, last {tuple(self.last.shape)}, "
                f"answers {tuple(self.answers.shape)}"
            )

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def from_facts(cls, tokenizer: Any, facts: Sequence[Fact]) -> FactBatch:
        if not facts:
            raise WorkbenchError("an empty fact set cannot be batched")
        ids, last, answers = encode_prompts(tokenizer, [f.prompt for f in facts], [f.answer for f in facts])
        return cls(ids, last, answers)

    def to(self, device: torch.device | str) -> FactBatch:
        """The same batch on ``device`` (itself when already there)."""
        if self.ids.device == torch.device(device):
            return self
        return FactBatch(self.ids.to(device), self.last.to(device), self.answers.to(device))

    def subset(self, index: torch.Tensor) -> FactBatch:
        index = index.to(self.ids.device)
        ids = self.ids[index]
        # Trim columns that are padding for every row of the subset.
        width = int(self.last[index].max()) + 1
        return FactBatch(ids[:, :width], self.last[index], self.answers[index])

    def sample(self, size: int, generator: torch.Generator) -> FactBatch:
        """A random subset of ``size`` rows (all rows if ``size`` >= n)."""
        if size >= len(self):
            return self
        return self.subset(torch.randperm(len(self), generator=generator)[:size])


def answer_logits(model: torch.nn.Module, batch: FactBatch) -> torch.Tensor:
    """``[n, vocab]`` logits at each prompt's last token (with grad if the model has it).

    The unembedding runs only at the read positions (it dominates a small model's cost).
    """
    pick = torch.arange(len(batch), device=batch.last.device), batch.last
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is not None and head is not None and body is not model:
        return head(body(batch.ids).last_hidden_state[pick])
    return model(batch.ids).logits[pick]
