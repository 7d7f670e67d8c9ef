"""The prefix cache (workbench/models/prefix.py): answers equal to a full forward's, bit for bit,
while the weights after the cached blocks change; the cached blocks really skipped."""

from __future__ import annotations

import pytest
import torch
from conftest import own_top1_split

from workbench.core.components import head, mlp
from workbench.core.sharing import sharing_copy
from workbench.models.prefix import PrefixCache, first_changing_block, full_forwards
from workbench.models.scoring import FactBatch, answer_logits, correct
from workbench.models.toy import toy_model
from workbench.quant import QuantConfig
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.registry import unlearn


def _toy_batch(model) -> FactBatch:
    prompts = [" ".join(f"w{(7 * i + j) % 100}" for j in range(2 + i % 5)) for i in range(24)]
    return FactBatch.from_pairs(model.tokenizer, prompts, [f"w{(3 * i) % 100}" for i in range(24)])


def _perturb(hf: torch.nn.Module, name: str, seed: int) -> None:
    p = hf.get_parameter(name)
    with torch.no_grad():
        p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)).to(p.dtype))


def _last_block_weight(model) -> str:
    last = model.adapter.n_layers - 1
    return next(n for n in model.adapter.quantized if model.adapter.layer_of(n) == last)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gemma3"])
def test_cached_answers_equal_full_forwards_while_later_blocks_change(family):
    kv = 2 if family in ("llama", "qwen2", "gemma3") else None
    model = toy_model(family, n_layers=3, n_kv_heads=kv)
    batch, name = _toy_batch(model), _last_block_weight(model)
    cache = PrefixCache(model.hf, model.adapter)
    cache.changing([name])
    assert cache.start == 2
    ran = []  # block 0's MLP runs only on full forwards
    model.hf.get_submodule(f"{model.adapter.blocks}.0.mlp").register_forward_hook(lambda *_: ran.append(1))
    for seed in range(3):  # the capture, then replays after the cached block's successors moved
        full = answer_logits(model.hf, batch)
        before = len(ran)
        assert torch.equal(cache.logits(batch), full)
        assert len(ran) - before == (1 if seed == 0 else 0)
        assert torch.equal(cache.correct(batch), correct(model.hf, batch))
        _perturb(model.hf, name, seed)
    # The blocks are themselves again (no replacement forward left on them).
    assert all("forward" not in block.__dict__ for block in model.hf.get_submodule(model.adapter.blocks).children())
    with full_forwards():
        before = len(ran)
        assert torch.equal(cache.logits(batch), answer_logits(model.hf, batch))
        assert len(ran) - before == 2  # the reference path runs every block


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradients_through_the_cache_equal_a_full_backward(family):
    """MANSU's retain gradient: chunks recognised by their ids, the gradient bit-identical."""
    from workbench.unlearning.mansu.candidates import answer_logprob_gradient

    model = toy_model(family, n_layers=3, n_kv_heads=2 if family == "llama" else None)
    batch = _toy_batch(model)
    for p in model.hf.parameters():
        p.requires_grad_(False)  # as MANSU's working model: only the differentiated weights take grad
    names = [n for n in model.adapter.quantized if model.adapter.layer_of(n) == 1]
    moved = next(n for n in model.adapter.quantized if model.adapter.layer_of(n) == 2)
    cache = PrefixCache(model.hf, model.adapter)
    for seed in range(3):  # nothing changed yet, then a later block than the differentiated ones
        full = answer_logprob_gradient(model.hf, names, batch, chunk=8)
        cached = answer_logprob_gradient(model.hf, names, batch, chunk=8, span=cache.span_logits)
        assert all(torch.equal(full[n], cached[n]) and bool(full[n].any()) for n in names)
        cache.changing([moved])
        _perturb(model.hf, moved, seed)
    assert cache.start == 2 and [start for _, start, _ in cache._held] == [1, 1, 1]  # 24 facts, chunks of 8
    first = batch.subset(torch.arange(8))  # scored without grad: its stream at block 1 serves (from 1)
    assert torch.equal(cache.logits(first), answer_logits(model.hf, first)) and len(cache._held) == 3


def test_a_weight_changed_earlier_moves_the_prefix_down(toy_llama_gqa):
    """Held streams are for one block: changing an earlier weight makes them stale, not wrong."""
    model, batch = toy_llama_gqa, _toy_batch(toy_llama_gqa)
    adapter = model.adapter
    hf = sharing_copy(model.hf).eval()
    cache = PrefixCache(hf, adapter)
    assert cache.start == adapter.n_layers and torch.equal(cache.logits(batch), answer_logits(hf, batch))
    for layer in reversed(range(adapter.n_layers)):  # each change lands before every held stream
        name = next(n for n in adapter.quantized if adapter.layer_of(n) == layer)
        cache.changing([name])
        hf.get_parameter(name).data = hf.get_parameter(name).data.clone()
        _perturb(hf, name, layer)
        assert cache.start == layer
        assert torch.equal(cache.logits(batch), answer_logits(hf, batch))
    assert torch.equal(cache.logits(batch), answer_logits(hf, batch))  # start 0: plain forwards
    assert cache._held == []  # nothing kept for nothing
    assert not torch.equal(answer_logits(hf, batch), answer_logits(model.hf, batch))


def test_no_prefix_when_an_embedding_or_first_block_weight_can_change(toy_llama_gqa):
    adapter = toy_llama_gqa.adapter
    first = next(n for n in adapter.quantized if adapter.layer_of(n) == 0)
    assert first_changing_block(adapter, [_last_block_weight(toy_llama_gqa), first]) == 0
    assert first_changing_block(adapter, [adapter.embeddings[0]]) == 0
    assert first_changing_block(adapter, []) == adapter.n_layers
    assert adapter.layer_of(adapter.embeddings[0]) is None


def test_facts_tiny_per_fact_answers_equal_a_full_forward(facts_tiny, split):
    batch = FactBatch.from_facts(facts_tiny.tokenizer, split.forget + split.retain)
    name = _last_block_weight(facts_tiny)
    hf = sharing_copy(facts_tiny.hf).eval()
    hf.get_parameter(name).data = hf.get_parameter(name).data.clone()  # its own, to move
    cache = PrefixCache(hf, facts_tiny.adapter)
    for seed in range(3):  # captured after the last block, captured again before block 1, replayed
        expected = correct(hf, batch)
        assert torch.equal(cache.correct(batch), expected)
        cache.changing([name])
        _perturb(hf, name, seed)
    assert cache.start == 1
    assert not torch.equal(cache.correct(batch), correct(facts_tiny.hf, batch))  # the weights did move


def test_mansu_measures_the_same_with_and_without_the_cache(facts_tiny, split, one_thread, monkeypatch):
    """A circuit in the last layer (so the cache skips block 0), and one in both layers (moves
    may land in block 0 midway): same update, history and stop."""
    replays = []
    replay = PrefixCache._replay
    monkeypatch.setattr(PrefixCache, "_replay", lambda self, *a: replays.append(1) or replay(self, *a))
    _same_with_and_without_cache(facts_tiny, split, [head(1, 0), head(1, 2), mlp(1)])
    assert len(replays) > 10  # guard, forget and retain-gradient forwards ran from block 1
    _same_with_and_without_cache(facts_tiny, split, [mlp(0), head(1, 1), mlp(1)])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mansu_on_a_rotary_family_measures_the_same_with_and_without_the_cache(family, one_thread):
    """Rotary tables, GQA and Qwen2's per-layer attention type pass through the replayed blocks."""
    model = toy_model(family, n_layers=3, n_kv_heads=2)
    split = own_top1_split(model, n_prompts=60, n_forget=10, name=f"toy-{family}")
    _same_with_and_without_cache(model, split, [head(2, 0), head(2, 3), mlp(2), head(1, 1)])


def _same_with_and_without_cache(facts_tiny, split, circuit):
    config = MansuConfig(params_per_round=16, max_rounds=4, fisher_samples=32, guard_precision="both")

    def run():
        return unlearn(facts_tiny, split, method="mansu", circuit=circuit, quant=QuantConfig("nf4"),
                       method_config=config)

    fast = run()
    with full_forwards():
        reference = run()
    assert fast.steps == reference.steps >= 2 and fast.stopped == reference.stopped
    assert fast.history == reference.history
    assert fast.update.deltas.keys() == reference.update.deltas.keys() and fast.update.deltas
    assert all(torch.equal(fast.update.deltas[n], reference.update.deltas[n]) for n in fast.update.deltas)
