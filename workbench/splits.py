"""The built-in forget/retain splits of each built-in model.

- Facts models (``facts``, ``facts-tiny`` and their oracles): the synthetic world's split,
  forget = the hazard-like domain by default.
- ``smollm2``: real facts written for the workbench (``workbench/data/real_facts.jsonl``),
  **filtered** at build time to facts whose answer's first token is the model's top-1
  both in full precision and after NF4 quantization of the base — so quantization noise
  alone never masquerades as forgetting or recovery. Forget = capitals of European
  countries by default; retain = every other relation and region.
- A local directory has no built-in split: pass forget/retain fact files.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict

from workbench.errors import WorkbenchError
from workbench.facts import Fact, FactSplit, fact_world, real_fact_candidates
from workbench.models import BUILTINS, FactsPreset, LoadedModel, builtin_dir
from workbench.quant import QuantConfig

SMOLLM2_DEFAULT_FORGET = "capital/europe"
FILTER_QUANT = QuantConfig("nf4", blocksize=64)


def facts_preset(model: LoadedModel) -> FactsPreset | None:
    recipe = BUILTINS.get(model.name)
    return recipe if isinstance(recipe, FactsPreset) else None


def builtin_split(model: LoadedModel, *, forget_domain: str | None = None) -> FactSplit:
    """The default (or chosen-domain) split for a built-in model."""
    preset = facts_preset(model)
    if preset is not None:
        world = fact_world(seed=preset.seed, size=preset.world_size)
        return world.split(forget_domain) if forget_domain else world.split()
    if model.name == "smollm2":
        return split_by_domain(filtered_real_facts(model), forget_domain or SMOLLM2_DEFAULT_FORGET, name="smollm2")
    raise WorkbenchError(
        f"model {model.name!r} has no built-in fact split; pass forget and retain fact files"
    )


def split_by_domain(facts: tuple[Fact, ...], forget_domain: str, *, name: str) -> FactSplit:
    """Forget = facts of ``forget_domain`` (a domain, or a relation matching every region)."""

    def in_forget(f: Fact) -> bool:
        return f.domain == forget_domain or f.relation == forget_domain

    domains = sorted({f.domain for f in facts})
    if not any(in_forget(f) for f in facts):
        raise WorkbenchError(f"no facts in domain {forget_domain!r}; domains are: {', '.join(domains)}")
    return FactSplit(
        name=f"{name}:{forget_domain}",
        forget=tuple(f for f in facts if in_forget(f) and not f.paraphrase),
        retain=tuple(f for f in facts if not in_forget(f) and not f.paraphrase),
        forget_paraphrase=tuple(f for f in facts if in_forget(f) and f.paraphrase),
        retain_paraphrase=tuple(f for f in facts if not in_forget(f) and f.paraphrase),
    )


def filtered_real_facts(model: LoadedModel, *, refresh: bool = False) -> tuple[Fact, ...]:
    """SmolLM2's real facts that survive the both-ways top-1 filter (cached beside the model)."""
    cache = builtin_dir("smollm2") / "facts_filtered.json"
    if cache.exists() and not refresh:
        rows = json.loads(cache.read_text())
        return tuple(Fact(**{**r, "choices": tuple(r["choices"])}) for r in rows)
    from workbench.evaluation import evaluate_facts
    from workbench.quant import fake_quantize_model

    candidates = real_fact_candidates()
    fp = evaluate_facts(model, candidates, multiple_choice=False)
    right_fp = [f for f, ok in zip(candidates, fp.correct) if ok]
    # Only facts right in full precision need the quantized check (saves most of a pass).
    quantized = fake_quantize_model(model.hf, FILTER_QUANT, progress=lambda *_: None)
    q = evaluate_facts(quantized, right_fp, tokenizer=model.tokenizer, multiple_choice=False)
    kept = tuple(f for f, ok in zip(right_fp, q.correct) if ok)
    if not kept:
        raise WorkbenchError("no real fact survived the filter; the smollm2 build looks broken")
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".facts.")
    with os.fdopen(fd, "w") as fh:
        json.dump([asdict(f) for f in kept], fh)
    os.replace(tmp, cache)
    summary = {"candidates": len(candidates), "right_fp": len(right_fp), "kept": len(kept),
               "nf4_kept_fraction_of_right_fp": len(kept) / max(1, len(right_fp))}
    (cache.parent / "facts_filter.json").write_text(json.dumps(summary, indent=2))
    return kept
