"""Regenerate the ``capitals_*`` example files from the workbench's own real-fact list.

    PYTHONPATH=. python examples/data/make_capitals.py

The ``facts`` world's examples (``make_examples.py``) are facts a model never saw phrased as
questions, so on ``facts`` and ``smollm2`` they show the shapes run but leave nothing to
forget. These files ask SmolLM2 what it does know, capitals of countries, as WMDP-style
multiple choice (``capitals_mc_*``; choices such as "Andorra la Vella" are several tokens).
Forget side: Europe (the default forget domain of ``smollm2``); retain side: Africa. Wrong
choices are other capitals of the same region, drawn with a fixed seed. Nothing is downloaded.

The same facts as TOFU-style questions are not shipped: SmolLM2-135M (a base model) does not
answer "Question: …\nAnswer:" prompts with the bare capital (first-token top-1 0 of 46, greedy
exact match 0 of 46 on Europe, 2026-12-03), so they would leave nothing to forget.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
FACTS = HERE.parents[1] / "workbench" / "data" / "real_facts.jsonl"
SIDES = {"forget": "europe", "retain": "africa"}


def capitals(region: str) -> list[tuple[str, str]]:
    """(country, capital) pairs of ``region``, in the file's order, one per country."""
    rows = [json.loads(line) for line in FACTS.read_text(encoding="utf-8").splitlines()]
    return [(r["subject"], r["answer"]) for r in rows
            if r["relation"] == "capital" and r["region"] == region and r["template"] == 0]


def rows(pairs: list[tuple[str, str]], seed: int) -> list[dict]:
    """One multiple-choice row per country: its capital among three others of the region."""
    rng = random.Random(seed)
    cities = [c for _, c in pairs]
    mc = []
    for country, city in pairs:
        wrong = rng.sample([c for c in cities if c != city], 3)
        choices = [*wrong, city]
        rng.shuffle(choices)
        mc.append({"question": f"What is the capital of {country}?", "choices": choices,
                   "answer": choices.index(city)})
    return mc


def main() -> None:
    for side, region in SIDES.items():
        mc = rows(capitals(region), seed=len(side))
        path = HERE / f"capitals_mc_{side}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in mc), encoding="utf-8")


if __name__ == "__main__":
    main()
