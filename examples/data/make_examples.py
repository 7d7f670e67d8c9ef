"""Regenerate the example files of this folder from the built-in synthetic fact world.

    PYTHONPATH=. python examples/data/make_examples.py

Every row is about the invented subjects of the ``facts`` model's world (nothing is
downloaded): the pathogens domain is the forget side, the other domains the retain side.
Shapes (see ``workbench.data.files``): multiple choice like WMDP/MMLU (``mc_*``), question
answering like TOFU (``qa_*``, multi-token answers with a paraphrase and three perturbed
answers) and raw text like MUSE's forget corpora (``text_*``). The Parquet copy is written
by the ``datasets`` library, as benchmark files on the Hub are.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from workbench.data.facts import Fact
from workbench.data.world import fact_world

HERE = Path(__file__).resolve().parent
SUBJECTS = {"forget": 4, "retain": 8}  # subjects per side (three relations each)


def _by_subject(facts: tuple[Fact, ...], n: int) -> list[list[Fact]]:
    groups: dict[str, list[Fact]] = defaultdict(list)
    for f in facts:
        groups[f.subject].append(f)
    # the first subjects of distinct domains first, so the retain side mixes domains
    order = sorted(groups, key=lambda s: (list(groups).index(s) % 7, list(groups).index(s)))
    return [groups[s] for s in order[:n]]


def _question(f: Fact) -> str:
    return f"What is the {f.relation} of {f.subject} ?"


def rows(facts: tuple[Fact, ...], paraphrases: tuple[Fact, ...], n: int) -> dict[str, list[dict]]:
    held = {(p.subject, p.relation): p for p in paraphrases}
    out: dict[str, list[dict]] = {"mc": [], "qa": [], "text": []}
    for group in _by_subject(facts, n):
        for f in group:
            out["mc"].append({"question": _question(f), "choices": list(f.choices), "answer": f.answer_index})
            wrong = [c for c in f.choices if c != f.answer]
            out["qa"].append({"question": _question(f), "answer": f.text,
                              "paraphrased_answer": held[(f.subject, f.relation)].text,
                              "perturbed_answer": [f"{f.prompt} {w}" for w in wrong]})
        out["text"].append({"text": " ".join(f.text for f in group)})
    return out


def main() -> None:
    split = fact_world(seed=0, size="full").split()
    for side, facts, para in (("forget", split.forget, split.forget_paraphrase),
                              ("retain", split.retain, split.retain_paraphrase)):
        for shape, items in rows(facts, para, SUBJECTS[side]).items():
            path = HERE / f"{shape}_{side}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
        mc = rows(facts, para, SUBJECTS[side])["mc"]
        with open(HERE / f"mc_{side}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["question", "choices", "answer"])
            for r in mc:
                w.writerow([r["question"], "|".join(r["choices"]), r["answer"]])
    from datasets import Dataset

    for side in ("forget", "retain"):
        qa = [json.loads(line) for line in (HERE / f"qa_{side}.jsonl").read_text().splitlines()]
        Dataset.from_list(qa).to_parquet(str(HERE / f"qa_{side}.parquet"))


if __name__ == "__main__":
    main()
