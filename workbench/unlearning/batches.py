"""The forget and retain sets as tensors on the model's device, with the frozen base's logits,
and the run's criterion of "the model still answers a fact".

A set of multiple-choice questions (every fact of kind ``mc``, :func:`~workbench.data.facts.answer_criterion`)
is judged by multiple-choice accuracy, any other set by first-token top-1; the forget set's
criterion decides when a run stops, the retain set's what MANSU's retain guard measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from workbench.core.device import module_device
from workbench.core.errors import WorkbenchError
from workbench.data.facts import AnswerCriterion, Fact, FactSplit, answer_criterion, chance_level
from workbench.models.loaded import LoadedModel
from workbench.models.prefix import PrefixCache
from workbench.models.scoring import ChoiceBatch, FactBatch, choice_correct, correct, row_logprobs, span_logits


@dataclass(frozen=True)
class ScoredSet:
    """A fact set with the criterion it is judged by.

    Attributes:
        facts: the facts as a batch (their answers, for losses and top-1).
        choices: their (question, choice) pairs when judged by multiple-choice accuracy, else
            ``None`` (first-token top-1).
    """

    facts: FactBatch
    choices: ChoiceBatch | None = None

    @classmethod
    def of(cls, model: LoadedModel, facts: FactBatch, source: tuple[Fact, ...]) -> ScoredSet:
        if answer_criterion(source) == "mc":
            return cls(facts, ChoiceBatch.from_facts(model.tokenizer, source).to(facts.ids.device))
        return cls(facts)

    @property
    def criterion(self) -> AnswerCriterion:
        return "top1" if self.choices is None else "mc"

    def sample(self, size: int, generator: torch.Generator) -> ScoredSet:
        """``size`` random facts (all if ``size`` >= n), judged the same way."""
        if self.choices is None:
            return ScoredSet(self.facts.sample(size, generator))
        if size >= len(self.facts):
            return self
        keep = torch.randperm(len(self.facts), generator=generator)[:size]
        return ScoredSet(self.facts.subset(keep), self.choices.subset(keep))

    def answered(self, model: torch.nn.Module | PrefixCache) -> torch.Tensor:
        """``[n]`` bool: which facts ``model`` answers by the set's criterion (no grad). A
        :class:`PrefixCache` replays the blocks its weights leave unchanged."""
        with torch.no_grad():
            if isinstance(model, PrefixCache):
                if self.choices is None:
                    return model.correct(self.facts)
                return self.choices.correct(model.run(self.choices.rows, row_logprobs))
            return correct(model, self.facts) if self.choices is None else choice_correct(model, self.choices)

    def accuracy(self, model: torch.nn.Module | PrefixCache) -> float:
        """The fraction of the set ``model`` answers by its criterion."""
        return float(self.answered(model).float().mean())


RETAIN_SAMPLE = 256
"""The retain facts MANSU's retain guard judges a round on and the gradient loop's readings
measure (:meth:`Batches.retain_sample`: one seeded sample, so both read the same facts)."""


@dataclass(frozen=True)
class Batches:
    """The split as tensors, plus the frozen base's answer-span logits on them
    (``ref_forget``, ``ref_retain``: ``[n, A, vocab]``, for reference-based losses).

    Attributes:
        forget_set, retain_set: the forget and retain sets with the criterion each is judged by.
        chance: the forget set's chance level when it is multiple choice (0 otherwise).
        reference: the base model the reference logits are computed from, when first asked for
            (only reference-based losses ask; on SmolLM2's default split they are ~0.9 GB).
    """

    forget: FactBatch
    retain: FactBatch
    forget_set: ScoredSet
    retain_set: ScoredSet
    reference: torch.nn.Module = field(repr=False, compare=False)
    chance: float = 0.0

    def retain_sample(self, size: int = RETAIN_SAMPLE) -> ScoredSet:
        """The seeded retain sample of :data:`RETAIN_SAMPLE` facts (all of them in a smaller set)."""
        return self.retain_set.sample(size, torch.Generator().manual_seed(1))

    @cached_property
    def ref_forget(self) -> torch.Tensor:
        with torch.no_grad():  # the base is never modified, so these equal logits taken at build
            return span_logits(self.reference, self.forget)

    @cached_property
    def ref_retain(self) -> torch.Tensor:
        with torch.no_grad():
            return span_logits(self.reference, self.retain)

    @classmethod
    def build(cls, model: LoadedModel, split: FactSplit) -> Batches:
        if not split.forget:
            raise WorkbenchError("the forget set is empty")
        if not split.retain:
            raise WorkbenchError("the retain set is empty")

        # on the model's device: every loss and evaluation of a run then stays there
        device = module_device(model.hf)
        forget = FactBatch.from_facts(model.tokenizer, split.forget).to(device)
        retain = FactBatch.from_facts(model.tokenizer, split.retain).to(device)
        forget_set, retain_set = ScoredSet.of(model, forget, split.forget), ScoredSet.of(model, retain, split.retain)
        chance = chance_level(split.forget) if forget_set.criterion == "mc" else 0.0
        return cls(forget, retain, forget_set, retain_set, model.hf, chance)

    @property
    def choices(self) -> ChoiceBatch | None:
        """The forget set's choices (``None``: it is judged by first-token top-1)."""
        return self.forget_set.choices

    @property
    def criterion(self) -> AnswerCriterion:
        return self.forget_set.criterion

    @property
    def record_key(self) -> str:
        """The history key of the criterion's forget accuracy (``forget_top1`` or ``forget_mc``)."""
        return f"forget_{self.criterion}"

    def target(self, forget_target: float) -> float:
        """The forget accuracy a run stops at: ``forget_target``, but never below the chance
        level of a multiple-choice set (under it a model avoids the answer, which still tells
        it, so no step should aim there)."""
        return max(forget_target, self.chance)

    def forget_answered(self, model: torch.nn.Module | PrefixCache) -> torch.Tensor:
        """``[n]`` bool: which forget facts ``model`` still answers by the run's criterion."""
        return self.forget_set.answered(model)

    def forget_accuracy(self, model: torch.nn.Module | PrefixCache) -> float:
        """The fraction of the forget set ``model`` still answers by the run's criterion."""
        return self.forget_set.accuracy(model)
