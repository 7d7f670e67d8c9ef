"""Facts: the unit of knowledge the workbench attributes, unlearns and evaluates.

A :class:`Fact` is a cloze prompt plus its answer (``prompt + " " + answer`` is the full
sentence; the answer may be several tokens), optionally with multiple-choice candidates, a
*corrupted* prompt for attribution patching, and -- for question-answering rows -- paraphrased
and perturbed answers (:data:`FACT_KINDS` names the four row shapes). A :class:`FactSplit` is a
forget set and a retain set (plus the same facts phrased with a held-out template). Three
sources produce facts: the synthetic fact world (:mod:`workbench.data.world`), user fact files
(:mod:`workbench.data.files`) and the real-fact candidates for SmolLM2 (:mod:`workbench.data.real`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

from workbench.core.errors import WorkbenchError

FACT_KINDS = ("cloze", "mc", "qa", "text")
"""Where a fact came from: a cloze row, a multiple-choice question (WMDP/MMLU-like), a
question-answer pair (TOFU-like) or a passage of raw text split into prefix and continuation
(MUSE-like). See :mod:`workbench.data.files`."""


AnswerCriterion = Literal["top1", "mc"]
"""What "the model still answers a fact" means for a fact set (see :func:`answer_criterion`):
``top1``, the answer's first token is the argmax after the prompt; ``mc``, the answer has the
highest summed log-probability among the fact's choices (lm-evaluation-harness's ``acc``)."""


def answer_criterion(facts: Sequence[Fact]) -> AnswerCriterion:
    """``mc`` when every fact is a multiple-choice question (a WMDP/MMLU-style file), else
    ``top1``. A run's forget set's criterion decides when it stops and how its forgetting is
    judged. A benchmark question is asked as a choice among candidates, and a model rarely
    produces the answer's text itself right after the bare question (SmolLM2 picks most of the
    example capitals among four choices but answers almost none first-token top-1), so
    first-token top-1 would call the set forgotten before any step. The built-in facts carry
    choices too but are cloze facts: they keep ``top1``."""
    return "mc" if facts and all(f.kind == "mc" for f in facts) else "top1"


def chance_level(facts: Sequence[Fact]) -> float:
    """Mean of 1/len(choices) over ``facts``: the multiple-choice accuracy of guessing, which is
    where a forgotten multiple-choice set sits (below it, the model avoids the answer, which
    still tells the answer)."""
    if not facts or any(not f.choices for f in facts):
        raise WorkbenchError("the chance level needs facts that all have choices")
    return sum(1 / len(f.choices) for f in facts) / len(facts)


@dataclass(frozen=True)
class Fact:
    """One fact: a cloze prompt and its answer, optionally with multiple-choice candidates.

    Attributes:
        prompt: cloze prompt; the answer follows after one space, so the prompt has no
            trailing whitespace.
        answer: the answer (no surrounding whitespace); its tokens are the tokenizer's encoding
            of ``" " + answer``, one or several (a multi-token answer is scored over its whole
            span: summed log-probability, greedy exact match; top-1 reads its first token).
        choices: multiple-choice candidates including the answer (4 for built-ins; may be ()).
        domain: e.g. ``"pathogens"`` or ``"capital/europe"``.
        relation: e.g. ``"vector"``.
        subject: e.g. ``"Veltrax"``; appears verbatim in ``prompt`` for built-in/real facts.
        template: template index within the relation.
        paraphrase: rendered with the held-out template.
        corrupt_prompt: same template, another subject whose answer differs ("" if none).
        kind: the row shape it came from, one of :data:`FACT_KINDS`.
        paraphrased_answers: the answer reworded (TOFU's ``paraphrased_answer``; may be ()).
        perturbed_answers: plausible wrong answers (TOFU's ``perturbed_answer``; may be ()).
    """

    prompt: str
    answer: str
    choices: tuple[str, ...]
    domain: str = ""
    relation: str = ""
    subject: str = ""
    template: int = 0
    paraphrase: bool = False
    corrupt_prompt: str = ""
    kind: str = "cloze"
    paraphrased_answers: tuple[str, ...] = ()
    perturbed_answers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Lists are accepted for convenience but stored as tuples so facts stay hashable.
        for name in ("choices", "paraphrased_answers", "perturbed_answers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        where = f"fact {self.prompt!r}"
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise WorkbenchError(f"{where}: the prompt is empty")
        if self.prompt != self.prompt.rstrip():
            raise WorkbenchError(
                f"{where}: the prompt ends with whitespace; the answer is appended after one "
                "space, so strip the prompt"
            )
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise WorkbenchError(f"{where}: the answer is empty")
        if self.answer != self.answer.strip():
            raise WorkbenchError(f"{where}: the answer {self.answer!r} has surrounding whitespace")
        for c in self.choices:
            if not isinstance(c, str) or not c.strip() or c != c.strip():
                raise WorkbenchError(f"{where}: choice {c!r} is empty or has surrounding whitespace")
        if self.choices:
            if len(self.choices) < 2:
                raise WorkbenchError(f"{where}: multiple choice needs at least 2 choices")
            if len(set(self.choices)) != len(self.choices):
                raise WorkbenchError(f"{where}: the choices {list(self.choices)} repeat a value")
            if self.answer not in self.choices:
                raise WorkbenchError(
                    f"{where}: the answer {self.answer!r} is not among the choices {list(self.choices)}"
                )
        if self.kind not in FACT_KINDS:
            raise WorkbenchError(f"{where}: kind must be one of {', '.join(FACT_KINDS)}, got {self.kind!r}")
        for name in ("paraphrased_answers", "perturbed_answers"):
            for a in getattr(self, name):
                if not isinstance(a, str) or not a.strip() or a != a.strip():
                    raise WorkbenchError(f"{where}: {name} holds {a!r}, empty or with surrounding whitespace")
        for name in ("domain", "relation", "subject", "corrupt_prompt"):
            if not isinstance(getattr(self, name), str):
                raise WorkbenchError(f"{where}: {name} must be text")
        if isinstance(self.template, bool) or not isinstance(self.template, int) or self.template < 0:
            raise WorkbenchError(f"{where}: template must be an integer >= 0, got {self.template!r}")
        if not isinstance(self.paraphrase, bool):
            raise WorkbenchError(f"{where}: paraphrase must be true or false, got {self.paraphrase!r}")
        if self.corrupt_prompt:
            if self.corrupt_prompt != self.corrupt_prompt.strip():
                raise WorkbenchError(f"{where}: the corrupt prompt has surrounding whitespace")
            if self.corrupt_prompt == self.prompt:
                raise WorkbenchError(f"{where}: the corrupt prompt equals the prompt")

    @property
    def text(self) -> str:
        """The full sentence: ``prompt + " " + answer``."""
        return f"{self.prompt} {self.answer}"

    @property
    def answer_index(self) -> int | None:
        """Index of the answer in ``choices`` (``None`` without choices)."""
        return self.choices.index(self.answer) if self.choices else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (a cloze row): ``prompt``, ``answer``, then non-default fields."""
        out: dict[str, Any] = {"prompt": self.prompt, "answer": self.answer}
        for f in fields(self):
            if f.name in out:
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                if value:
                    out[f.name] = list(value)
            elif value != f.default:
                out[f.name] = value
        return out


@dataclass(frozen=True)
class FactSplit:
    """A forget set and a retain set, plus the same facts phrased with a held-out template.

    Attributes:
        name: display name, e.g. ``"pathogens-seed0-full"``.
        forget: facts to unlearn (non-empty).
        retain: facts to keep.
        forget_paraphrase: the forget facts on the held-out template (may be empty).
        retain_paraphrase: the retain facts on the held-out template (may be empty).

    Forget and retain share no prompt (same for the paraphrase pair): one prompt cannot be both
    forgotten and kept.
    """

    name: str
    forget: tuple[Fact, ...]
    retain: tuple[Fact, ...]
    forget_paraphrase: tuple[Fact, ...] = ()
    retain_paraphrase: tuple[Fact, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.name, os.PathLike):  # a split named after its fact file
            object.__setattr__(self, "name", os.fspath(self.name))
        if not isinstance(self.name, str) or not self.name.strip():
            raise WorkbenchError("a fact split needs a non-empty name")
        for f in ("forget", "retain", "forget_paraphrase", "retain_paraphrase"):
            value = tuple(getattr(self, f))
            for item in value:
                if not isinstance(item, Fact):
                    raise WorkbenchError(f"split {self.name!r}: {f} holds {type(item).__name__}, not Fact")
            object.__setattr__(self, f, value)
        if not self.forget:
            raise WorkbenchError(f"split {self.name!r}: the forget set is empty")
        for a, b in (("forget", "retain"), ("forget_paraphrase", "retain_paraphrase")):
            shared = {x.prompt for x in getattr(self, a)} & {x.prompt for x in getattr(self, b)}
            if shared:
                raise WorkbenchError(
                    f"split {self.name!r}: {a} and {b} share {len(shared)} prompt(s), "
                    f"e.g. {sorted(shared)[0]!r}"
                )

    def counts(self) -> dict[str, int]:
        """Number of facts per field, e.g. for a summary table."""
        return {
            "forget": len(self.forget),
            "retain": len(self.retain),
            "forget_paraphrase": len(self.forget_paraphrase),
            "retain_paraphrase": len(self.retain_paraphrase),
        }
