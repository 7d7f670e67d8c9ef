"""Real-fact candidates for SmolLM2 (:func:`real_fact_candidates`).

Hand-written true facts shipped in ``workbench/data/real_facts.jsonl``. They are
*candidates*: the built-in split keeps only those the model gets right (top-1) in full
precision and after NF4 (:mod:`workbench.models.builtin_splits`).
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from importlib import resources

from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact
from workbench.data.files import _decode_lines, _json_rows, _row_to_fact
from workbench.data.world import SUBJECT

REAL_FACTS_RESOURCE = "data/real_facts.jsonl"
"""Path of the real-fact candidates inside the ``workbench`` package."""


@functools.cache
def real_fact_candidates() -> tuple[Fact, ...]:
    """True, hand-written facts for a real pretrained LM (SmolLM2-135M), *unfiltered*.

    Read from ``workbench/data/real_facts.jsonl`` (fields ``prompt``, ``answer``,
    ``relation``, ``region``, ``subject``, ``template``, ``paraphrase``). Each fact gets:

    * ``domain = relation`` or ``relation + "/" + region`` (e.g. ``"capital/europe"``);
    * 4 multiple-choice candidates: the answer plus 3 distinct other answers of the same
      domain (of the same relation if the domain has too few), chosen and ordered by a RNG
      seeded from sha256 of the prompt -- stable across runs and independent of file order;
    * ``corrupt_prompt``: the same template (the prompt with the subject swapped) with another
      subject of the same relation whose answer differs, preferring subjects with as many
      words; BPE token counts may still differ (attribution aligns the final position).

    Which facts the model actually knows is decided by the models module (top-1 in full
    precision *and* after NF4); nothing is filtered here.
    """
    label = f"workbench/{REAL_FACTS_RESOURCE}"
    data = resources.files("workbench").joinpath(REAL_FACTS_RESOURCE).read_bytes()
    rows = _json_rows(_decode_lines(data, label), label)

    base: list[tuple[Fact, str]] = []  # (fact without choices/corrupt, template text)
    for lineno, row in rows:
        where = f"{label}, line {lineno}"
        fact = _row_to_fact(row, where, "cloze")
        region = row.get("region", "") or ""
        if not fact.relation or not fact.subject:
            raise WorkbenchError(f"{where}: real facts need 'relation' and 'subject'")
        domain = f"{fact.relation}/{region}" if region else fact.relation
        matches = list(_word_re(fact.subject).finditer(fact.prompt))
        if len(matches) != 1:
            raise WorkbenchError(f"{where}: the subject {fact.subject!r} must occur exactly once in the prompt")
        m = matches[0]
        template = fact.prompt[: m.start()] + SUBJECT + fact.prompt[m.end() :]
        base.append((Fact(fact.prompt, fact.answer, (), domain, fact.relation, fact.subject,
                          fact.template, fact.paraphrase), template))

    answers_by: dict[str, set[str]] = {}
    for f, _ in base:
        answers_by.setdefault(f.domain, set()).add(f.answer)
        answers_by.setdefault("relation:" + f.relation, set()).add(f.answer)
    by_template: dict[tuple[str, str], list[Fact]] = {}
    for f, template in base:
        by_template.setdefault((f.relation, template), []).append(f)

    out = []
    for f, template in base:
        rng = random.Random(int.from_bytes(hashlib.sha256(f"{f.prompt}\x00{f.answer}".encode()).digest()[:8], "big"))
        pool = sorted(answers_by[f.domain] - {f.answer})
        if len(pool) < 3:
            pool = sorted(answers_by["relation:" + f.relation] - {f.answer})
        choices: tuple[str, ...] = ()
        if len(pool) >= 3:
            options = [f.answer, *rng.sample(pool, 3)]
            rng.shuffle(options)
            choices = tuple(options)
        others = [g for g in by_template[(f.relation, template)] if g.answer != f.answer and g.subject != f.subject]
        corrupt = ""
        if others:
            n_words = len(f.subject.split())
            same_len = [g for g in others if len(g.subject.split()) == n_words]
            corrupt = template.replace(SUBJECT, rng.choice(same_len or others).subject)
        out.append(Fact(f.prompt, f.answer, choices, f.domain, f.relation, f.subject, f.template,
                        f.paraphrase, corrupt))
    return tuple(out)


def _word_re(text: str) -> re.Pattern[str]:
    # Whole-word match, so the subject "In" is not found inside "Indium".
    return re.compile(r"(?<!\w)" + re.escape(text) + r"(?!\w)")
