"""The built-in forget/retain splits of each built-in model.

- Facts models (``facts``, ``facts-tiny`` and their oracles): the synthetic world's split,
  forget = the hazard-like domain by default.
- ``smollm2``: real facts written for the workbench (``workbench/data/real_facts.jsonl``),
  **filtered** at build time to facts whose answer's first token is the model's top-1
  both in full precision and after NF4 quantization of the base -- so quantization noise
  alone never masquerades as forgetting or recovery. Forget = capitals of European
  countries by default; retain = every other relation and region.
- A local directory has no built-in split: pass forget/retain fact files.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import sys
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from workbench.core.errors import WorkbenchError
from workbench.core.files import atomic_write_json, exclusive_lock, parse_json
from workbench.core.progress import silent
from workbench.data import real
from workbench.data.facts import Fact, FactSplit
from workbench.data.real import REAL_FACTS_RESOURCE, real_fact_candidates
from workbench.data.splits import split_by_domain
from workbench.data.world import fact_world
from workbench.models import scoring
from workbench.models.builtins import BUILTINS, FactsPreset, builtin_dir
from workbench.models.loaded import LoadedModel
from workbench.models.scoring import fact_correct
from workbench.quant import QuantConfig, quantized_copy
from workbench.quant import bnb as quant_bnb
from workbench.quant import codes as quant_codes
from workbench.quant import model as quant_model
from workbench.quant import tables as quant_tables

log = logging.getLogger(__name__)

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


def filtered_real_facts(model: LoadedModel, *, refresh: bool = False) -> tuple[Fact, ...]:
    """SmolLM2's real facts that survive the both-ways top-1 filter (cached beside the model).

    The cache is keyed by everything the filter's result depends on (:func:`filter_key`), so
    an edited fact file, another filter quantizer, changed scoring or quantization code, or
    other weights each give a new entry instead of silently reusing the old one; a damaged
    entry is rebuilt; two processes filtering at once compute it once (a lock).
    """
    cache = builtin_dir("smollm2") / f"facts_filtered-{filter_key(model)}.json"
    if not refresh and (kept := _read_filtered(cache)) is not None:
        return kept
    with exclusive_lock(cache.with_suffix(".lock")):
        if not refresh and (kept := _read_filtered(cache)) is not None:
            return kept  # written by another process while this one waited
        return _filter(model, cache)


def filter_key(model: LoadedModel, *, quant: QuantConfig = FILTER_QUANT, candidates: bytes | None = None) -> str:
    """What the filtered set depends on: the candidates' file, the filter quantizer, the code that
    scores and quantizes (its source), and the weights (their fingerprint)."""
    h = hashlib.sha256()
    h.update(candidates if candidates is not None else
             resources.files("workbench").joinpath(REAL_FACTS_RESOURCE).read_bytes())
    h.update(quant.label.encode())
    h.update(model.fingerprint.encode())
    for module in (scoring, quant_model, quant_codes, quant_tables, quant_bnb, real, sys.modules[__name__]):
        h.update(inspect.getsource(module).encode())
    return h.hexdigest()[:16]


def _read_filtered(cache: Path) -> tuple[Fact, ...] | None:
    """The cached set, or ``None`` when absent or damaged (a damaged entry is then rebuilt)."""
    if not cache.exists():
        return None
    try:
        rows = parse_json(cache.read_text(encoding="utf-8"), source=str(cache))
        return tuple(Fact(**{**r, "choices": tuple(r["choices"])}) for r in rows)
    except (WorkbenchError, OSError, UnicodeDecodeError, TypeError, KeyError) as exc:
        log.warning("rebuilding the damaged filtered-facts cache %s (%s)", cache, exc)
        return None


def _filter(model: LoadedModel, cache: Path) -> tuple[Fact, ...]:
    candidates = real_fact_candidates()
    fp = fact_correct(model.hf, model.tokenizer, candidates)
    right_fp = [f for f, ok in zip(candidates, fp.tolist()) if ok]
    # Only facts right in full precision need the quantized check (saves most of a pass).
    quantized = quantized_copy(model.hf, FILTER_QUANT, progress=silent)
    q = fact_correct(quantized, model.tokenizer, right_fp)
    kept = tuple(f for f, ok in zip(right_fp, q.tolist()) if ok)
    if not kept:
        raise WorkbenchError("no real fact survived the filter; the smollm2 build looks broken")
    atomic_write_json(cache, [asdict(f) for f in kept], indent=None)
    summary = {"candidates": len(candidates), "right_fp": len(right_fp), "kept": len(kept),
               "nf4_kept_fraction_of_right_fp": len(kept) / max(1, len(right_fp))}
    atomic_write_json(cache.parent / "facts_filter.json", summary)
    return kept
