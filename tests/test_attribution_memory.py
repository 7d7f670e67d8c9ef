"""Attribution passes sized to memory (issue 17): the estimate of a pass's bytes bounds what a pass
really allocates, the sizing follows its budget, and sized passes give the fixed batch's scores."""

from __future__ import annotations

import re
import weakref
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from workbench.core.device import WORKING_MB_ENV, device_memory_bytes, working_budget_setting
from workbench.core.errors import WorkbenchError
from workbench.interpretability import attribution as attribution_module
from workbench.interpretability.attribution import (
    MAX_PAIRS_PER_PASS,
    AttributionConfig,
    attribute,
    clean_runs,
    make_prompt_pairs,
    passes,
)
from workbench.models import loaded as loaded_module
from workbench.models.loaded import MIN_WORKING_BYTES, WORKING_SHARE
from workbench.models.toy import toy_model

pytestmark = pytest.mark.usefixtures("one_thread")
SILENT = lambda fraction, message: None  # noqa: E731
FAMILIES = {"gpt2": None, "gpt_neox": None, "llama": 2, "olmo2": 2, "gemma2": 2, "phi3": 4}
"""Family -> key/value heads (None: the family has no GQA); 4 query heads each."""


class PeakTensorBytes(TorchDispatchMode):
    """The most bytes of tensors made inside the mode alive at once (each storage once; the
    storages present before, such as the weights, are not counted)."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self.existing, self.alive, self.live, self.peak = existing, set[int](), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and not tensor._is_zerotensor():  # a zero tensor has no storage
                storage = tensor.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self.alive and key not in self.existing:
                    self.alive.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    # torch keeps one Python object per live storage, so this runs when the storage is freed
                    weakref.finalize(storage, self._freed, key, size)
        return out

    def _freed(self, key: int, size: int) -> None:
        self.alive.discard(key)
        self.live -= size


def _pairs(model, n: int, length: int = 7):
    """``n`` facts of one token length in swapped pairs, so one length group of ``n`` paired facts."""
    from test_attribution import toy_facts

    pairs = make_prompt_pairs(model, toy_facts(n, length=length))
    assert len(pairs.groups) == 1 and pairs.groups[0].n == n
    return pairs


def _peak_of_attribution(model, pairs, config: AttributionConfig) -> int:
    existing = {t.untyped_storage().data_ptr() for t in [*model.hf.parameters(), *model.hf.buffers(),
                                                        *model.bridge().parameters(), *model.bridge().buffers()]}
    mode = PeakTensorBytes(existing)
    with mode:
        attribute(model, pairs, config, progress=SILENT)
    return mode.peak


SHAPES = {  # id -> (family, toy_model keywords, prompt words): each a term of the estimate that matters
    "gemma2-softcap-vocab2k": ("gemma2", dict(n_kv_heads=2, vocab=[f"w{i}" for i in range(2000)]), 7),
    "qwen3-head-width-192-of-d64": ("qwen3", dict(n_kv_heads=2, d_head=48), 7),
    "gemma3-head-width-192-of-d64": ("gemma3", dict(n_kv_heads=2, d_head=48), 7),
    "llama-16-heads-40-tokens": ("llama", dict(n_kv_heads=4, n_heads=16, n_ctx=128), 40),
}
METHODS = {"ig": dict(method="ig", ig_steps=4), "mean": dict(baseline="mean"), "exact": dict(method="exact")}


def _assert_estimate_bounds_one_more_pair(model, length: int = 7, **config) -> None:
    """What one more pair of ``seq`` tokens adds to an attribution's peak (two runs whose only
    difference is the pairs per pass) is at most the estimate, and not below a third of it (an
    estimate that missed the edge hooks, or counted them for every family, would fail one side)."""
    pairs = _pairs(model, 8, length)
    seq = pairs.groups[0].seq
    peaks = {n: _peak_of_attribution(model, pairs, AttributionConfig(batch_size=n, **config)) for n in (2, 6)}
    measured = (peaks[6] - peaks[2]) / (4 * seq)
    lay = attribution_module._Layout.of(model.bridge())
    estimate = attribution_module._PassSizes.of(model, lay, AttributionConfig(**config)).bytes_per_token(seq)
    assert measured > 0
    assert measured <= estimate <= 3 * measured, (measured, estimate)


@pytest.mark.parametrize("edges", [False, True], ids=["nodes", "edges"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_estimate_of_a_pass_bounds_what_it_allocates_per_family(family, edges):
    _assert_estimate_bounds_one_more_pair(toy_model(family, n_kv_heads=FAMILIES[family], d_mlp=128), edges=edges)


@pytest.mark.parametrize("edges", [False, True], ids=["nodes", "edges"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_estimate_of_a_pass_bounds_what_it_allocates_per_shape(shape, edges):
    """Logits soft-capped over a larger vocabulary, heads wider than d_model, long prompts."""
    family, keywords, length = SHAPES[shape]
    _assert_estimate_bounds_one_more_pair(toy_model(family, d_mlp=128, **keywords), length, edges=edges)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_the_estimate_of_a_pass_bounds_what_it_allocates_per_method(family, method):
    """IG's several passes, the mean baseline's noising, exact patching's no-grad passes."""
    config = METHODS[method] | (dict(edges=True) if method != "exact" else {})
    _assert_estimate_bounds_one_more_pair(toy_model(family, n_kv_heads=2, d_mlp=128), **config)


def test_pairs_per_pass_follow_the_budget_and_a_fixed_batch_wins(toy_llama_gqa):
    pairs = _pairs(toy_llama_gqa, 8)
    group = pairs.groups[0]
    lay = attribution_module._Layout.of(toy_llama_gqa.bridge())
    per_pair = group.seq * lay.pass_bytes_per_token(group.seq, True)
    assert attribution_module._PassSizes.of(toy_llama_gqa, lay, AttributionConfig(edges=True)).bytes_per_token(
        group.seq) == per_pair // group.seq  # Llama has no norm on the attention output

    def size(**config) -> int:
        sizes = attribution_module._PassSizes.of(toy_llama_gqa, lay, AttributionConfig(edges=True, **config))
        return sizes.size(group)

    assert size(pass_bytes=3 * per_pair) == 3
    assert size(pass_bytes=3 * per_pair - 1) == 2
    assert size(pass_bytes=1) == 1  # never fewer than one pair
    assert size(pass_bytes=10**15) == MAX_PAIRS_PER_PASS
    assert size(pass_bytes=1, batch_size=5) == 5
    # by default a quarter of the model's bytes, at least MIN_WORKING_BYTES: a small model keeps the whole batch
    assert toy_llama_gqa.weight_bytes < MIN_WORKING_BYTES
    assert size() == min(MAX_PAIRS_PER_PASS, MIN_WORKING_BYTES // per_pair) == MAX_PAIRS_PER_PASS
    assert toy_llama_gqa.weight_bytes == sum(p.numel() * 4 for p in toy_llama_gqa.hf.parameters())


def test_sized_passes_give_the_scores_of_one_batch(toy_llama_gqa, monkeypatch):
    """Passes of two pairs (a budget of two pairs' estimate) against one batch of all eight: the
    same node and edge scores to float rounding, with clean runs taken ahead or not; the sweep
    really ran four passes."""
    pairs = _pairs(toy_llama_gqa, 8)
    seq = pairs.groups[0].seq
    lay = attribution_module._Layout.of(toy_llama_gqa.bridge())
    sized = AttributionConfig(edges=True, pass_bytes=2 * seq * lay.pass_bytes_per_token(seq, True))
    whole = replace(sized, batch_size=8, pass_bytes=None)
    one = attribute(toy_llama_gqa, pairs, whole, progress=SILENT)
    assert passes(toy_llama_gqa, pairs, whole) == [8]
    seen: list[int] = []
    sweep_chunk = attribution_module._sweep_chunk
    monkeypatch.setattr(attribution_module, "_sweep_chunk", lambda bridge, lay, chunk, *a, **k: (
        seen.append(chunk.n), sweep_chunk(bridge, lay, chunk, *a, **k))[1])
    for ahead in (None, clean_runs(toy_llama_gqa, pairs, sized)):
        seen.clear()
        two = attribute(toy_llama_gqa, pairs, sized, progress=SILENT, taken_ahead=ahead)
        assert seen == [2, 2, 2, 2] == passes(toy_llama_gqa, pairs, sized)
        assert max(abs(one.scores[c] - two.scores[c]) for c in one.scores) < 1e-5
        assert max(abs(one.edge_scores[e] - two.edge_scores[e]) for e in one.edge_scores) < 1e-5
        assert max(abs(s) for s in one.edge_scores.values()) > 1e-3  # not trivially zero
    with pytest.raises(WorkbenchError, match="clean runs were taken for other"):
        attribute(toy_llama_gqa, pairs, sized, progress=SILENT, taken_ahead=clean_runs(toy_llama_gqa, pairs, whole))


@pytest.mark.parametrize("field", ["batch_size", "pass_bytes"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True, "8"])
def test_pass_sizes_must_be_whole_and_positive(field, value):
    with pytest.raises(WorkbenchError, match=field):
        AttributionConfig(**{field: value})


def test_on_a_gpu_the_default_budget_is_at_most_half_what_the_model_leaves_of_it(toy_llama_gqa, monkeypatch):
    """No GPU here: the device and its total memory are stood in for, the rule is what is tested.
    On the CPU (and the meta device) the budget is a quarter of the model's bytes, at least 128 MiB."""
    assert device_memory_bytes(torch.device("cpu")) is None and device_memory_bytes(torch.device("meta")) is None
    assert toy_llama_gqa.working_budget_bytes() == MIN_WORKING_BYTES
    pairs = _pairs(toy_llama_gqa, 8)
    seq = pairs.groups[0].seq
    per_pair = seq * attribution_module._Layout.of(toy_llama_gqa.bridge()).pass_bytes_per_token(seq, True)
    weights = toy_llama_gqa.weight_bytes
    total = {"value": 10 * MIN_WORKING_BYTES}
    monkeypatch.setattr(loaded_module, "module_device", lambda module: torch.device("cuda", 0))
    monkeypatch.setattr(loaded_module, "device_memory_bytes", lambda device: total["value"])
    assert toy_llama_gqa.working_budget_bytes() == MIN_WORKING_BYTES  # room for the usual budget: unchanged
    total["value"] = weights + 2 * (2 * per_pair)  # the model leaves room for 4 pairs: passes get half of it
    assert toy_llama_gqa.working_budget_bytes() == 2 * per_pair
    assert passes(toy_llama_gqa, pairs, AttributionConfig(edges=True)) == [2, 2, 2, 2]


def test_the_default_budget_is_a_quarter_of_a_model_above_four_times_the_least_budget(toy_llama_gqa, monkeypatch):
    """A model whose bytes are over four times :data:`MIN_WORKING_BYTES` (SmolLM2 in float32, 513 MiB)
    gets a quarter of them; a tiny one the least budget (the toy model stands in for the big one
    through its byte count, which is all the rule reads)."""
    monkeypatch.delenv(WORKING_MB_ENV, raising=False)
    assert toy_llama_gqa.working_budget_bytes() == MIN_WORKING_BYTES
    for weights, budget in ((513 * 2**20, 513 * 2**20 // 4), (4 * MIN_WORKING_BYTES - 4, MIN_WORKING_BYTES),
                            (2**32, 2**30)):
        monkeypatch.setattr(loaded_module.LoadedModel, "weight_bytes", property(lambda self, w=weights: w))
        assert toy_llama_gqa.working_budget_bytes() == budget == max(weights // WORKING_SHARE, MIN_WORKING_BYTES)


def test_workbench_working_mb_replaces_the_default_budget(toy_llama_gqa, monkeypatch):
    """``$WORKBENCH_WORKING_MB`` (``workbench --working-mb``) sets the budget in MiB, larger or
    smaller than the default; on a GPU the cap of half what the model leaves still applies."""
    monkeypatch.delenv(WORKING_MB_ENV, raising=False)
    assert working_budget_setting() is None and toy_llama_gqa.working_budget_bytes() == MIN_WORKING_BYTES
    monkeypatch.setenv(WORKING_MB_ENV, "")
    assert working_budget_setting() is None
    monkeypatch.setenv(WORKING_MB_ENV, " 3 ")
    assert toy_llama_gqa.working_budget_bytes() == 3 * 2**20
    monkeypatch.setenv(WORKING_MB_ENV, "4096")
    assert toy_llama_gqa.working_budget_bytes() == 4096 * 2**20
    monkeypatch.setattr(loaded_module, "module_device", lambda module: torch.device("cuda", 0))
    monkeypatch.setattr(loaded_module, "device_memory_bytes", lambda device: toy_llama_gqa.weight_bytes + 2 * 2**30)
    assert toy_llama_gqa.working_budget_bytes() == 2**30


@pytest.mark.parametrize("value", ["lots", "0", "-2", "+5", "1.5", "1e3", "1_000", "²"])
def test_a_malformed_working_budget_is_refused(toy_llama_gqa, monkeypatch, value):
    monkeypatch.setenv(WORKING_MB_ENV, value)
    with pytest.raises(WorkbenchError, match=f"WORKBENCH_WORKING_MB must be .*{re.escape(value)}"):
        toy_llama_gqa.working_budget_bytes()
