"""Blocks recomputed in the backward (activation checkpointing, issue 17): the same gradients to
the bit, less saved for the backward, and MANSU decides to recompute from what a gradient would
save against its budget."""

from __future__ import annotations

import pytest
import torch
from conftest import bf16_copy, large_circuit_paths, own_top1_split

from workbench.models.loaded import LoadedModel
from workbench.models.recompute import blocks_recomputed, saved_bytes
from workbench.models.scoring import FactBatch, span_logits
from workbench.models.toy import toy_model
from workbench.quant import QuantConfig
from workbench.quant.compact import compact_quantized_copy
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.mansu.candidates import answer_logprob_gradient
from workbench.unlearning.registry import unlearn

NF4 = QuantConfig("nf4")
SILENT = lambda fraction, message: None  # noqa: E731
FAMILIES = ["gpt2", "llama", "neox", "gemma2", "phi3"]


def _batch(model) -> FactBatch:
    split = own_top1_split(model, n_prompts=24, n_forget=8)
    return FactBatch.from_facts(model.tokenizer, split.retain)


def _mlp_and_attention_weights(module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.dim() == 2 and "embed" not in n and "wte" not in n
            and "wpe" not in n and "lm_head" not in n]


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_blocks_give_the_same_gradient_and_save_less(family):
    """Every family's gradient over several chunks, recomputing the blocks or not: equal to the
    bit; what the forward saves for its backward shrinks (a block keeps its input only); the
    blocks' own forwards are back afterwards."""
    model = toy_model(family)
    work, batch = model.hf.eval(), _batch(model)
    names = _mlp_and_attention_weights(work)
    for p in work.parameters():
        p.requires_grad_(False)
    plain = answer_logprob_gradient(work, names, batch, chunk=5)
    recomputed = answer_logprob_gradient(work, names, batch, chunk=5, recompute_blocks_of=model.adapter)
    assert set(plain) == set(recomputed)
    for n in names:
        assert plain[n].abs().sum() > 0, n
        assert torch.equal(plain[n], recomputed[n]), n

    for p in (work.get_parameter(n) for n in names):
        p.requires_grad_(True)
    try:
        kept = saved_bytes(work, lambda: span_logits(work, batch))
        with blocks_recomputed(work, model.adapter):
            recomputing = saved_bytes(work, lambda: span_logits(work, batch))
    finally:
        for p in work.parameters():
            p.requires_grad_(False)
    assert 0 < recomputing < kept / 2
    assert all("forward" not in block.__dict__ for block in work.get_submodule(model.adapter.blocks))


def test_recomputation_through_weights_computed_at_forward(toy_llama_gqa):
    """A compact quantized copy (weights dequantized from codes in their module's forward, the
    gradient taken through their placeholders) gives the same gradient recomputing the blocks."""
    model = toy_llama_gqa
    copy, batch = compact_quantized_copy(model.hf, NF4, materialized=()), _batch(model)
    names = _mlp_and_attention_weights(copy)
    plain = answer_logprob_gradient(copy, names, batch, chunk=4)
    recomputed = answer_logprob_gradient(copy, names, batch, chunk=4, recompute_blocks_of=model.adapter)
    for n in names:
        assert plain[n].abs().sum() > 0, n
        assert torch.equal(plain[n], recomputed[n]), n


def test_blocks_get_their_forward_back_when_the_work_inside_fails(toy_llama_gqa):
    """Every block's forward comes back on exit, an instance's own forward (the prefix cache sets
    one while it replays) as it was, even when the work inside raises."""
    model = toy_llama_gqa
    blocks = model.hf.get_submodule(model.adapter.blocks)
    own = blocks[0].forward  # the bound method, set on the instance: what another wrapper leaves
    blocks[0].forward = own
    try:
        with pytest.raises(RuntimeError, match="inside"), blocks_recomputed(model.hf, model.adapter):
            assert all(block.__dict__["forward"] is not own for block in blocks)
            raise RuntimeError("inside")
        assert blocks[0].__dict__["forward"] is own
        assert all("forward" not in block.__dict__ for block in blocks[1:])
    finally:
        blocks[0].__dict__.pop("forward", None)


def test_saved_bytes_counts_each_saved_storage_once_and_no_parameter():
    """A hand-counted forward: x @ W saves x and W (a parameter: not counted); tanh saves its
    output y; y * x[:, :1] saves y again and a view of x (the same storages: not counted twice)."""
    weight = torch.nn.Parameter(torch.randn(8, 16))
    module = torch.nn.Module()
    module.weight = weight
    x = torch.randn(4, 8, requires_grad=True)

    def forward() -> torch.Tensor:
        y = torch.tanh(x @ weight)
        return (y * x[:, :1]).sum()

    assert saved_bytes(module, forward) == 4 * (4 * 8 + 4 * 16)  # x and y, float32


def test_without_grad_recomputing_blocks_changes_nothing(toy_llama_gqa):
    model, batch = toy_llama_gqa, _batch(toy_llama_gqa)
    with torch.no_grad():
        plain = span_logits(model.hf, batch)
        with blocks_recomputed(model.hf, model.adapter):
            recomputing = span_logits(model.hf, batch)
    assert torch.equal(plain, recomputing)


def _run(model, split, config, progress=SILENT):
    result = unlearn(model, split, method="mansu", quant=NF4, progress=progress, method_config=config)
    diagnostics = {k: v for k, v in result.diagnostics.items() if k not in ("seconds_by_phase", "blocks_recomputed")}
    return result.history, result.update.deltas, diagnostics, result.diagnostics["blocks_recomputed"]


@pytest.mark.parametrize("family,large", [("gpt2", False), ("llama-bf16", False), ("llama-bf16", True)])
def test_mansu_recomputing_its_blocks_runs_exactly_as_without(family, large, toy_gpt2, toy_llama_gqa, monkeypatch):
    """A budget below what a gradient saves makes MANSU recompute the blocks (forget direction at
    w+Δ and Q(w+Δ), retain gradient); the run is the same to the bit: history, every delta,
    diagnostics; also on a large circuit's paths (w+Δ summed at forward, Q(w+Δ) as codes)."""
    import workbench.unlearning.mansu.method as mansu_method
    import workbench.unlearning.mansu.state as mansu_state
    from workbench.models import recompute

    model = toy_gpt2 if family == "gpt2" else bf16_copy(toy_llama_gqa)
    if large:
        large_circuit_paths(monkeypatch)
    split = own_top1_split(model)
    config = MansuConfig(use_circuit=False, max_rounds=4, params_per_round=128, retain_guard=0.02)
    kept_history, kept, kept_diagnostics, kept_recomputed = _run(model, split, config)

    entered, rounds = [], []
    real, real_round = recompute.blocks_recomputed, mansu_method.round_gradients

    def counting(*args, **kwargs):
        entered.append(1)
        return real(*args, **kwargs)

    def counting_rounds(*args, **kwargs):
        rounds.append(1)
        return real_round(*args, **kwargs)

    monkeypatch.setattr(LoadedModel, "working_budget_bytes", lambda self: 1)
    # the same budget would also take the Fisher one fact per pass (other float sums: its own test)
    monkeypatch.setattr(mansu_state.GradientMemory, "facts_per_pass", lambda self: mansu_state.GRADIENT_CHUNK)
    monkeypatch.setattr("workbench.unlearning.mansu.candidates.blocks_recomputed", counting)
    monkeypatch.setattr(mansu_method, "round_gradients", counting_rounds)
    messages: list[str] = []
    history, deltas, diagnostics, recomputed = _run(model, split, config, lambda f, m: messages.append(m))
    # each round's gradients: the forget direction at w+Δ and at Q(w+Δ) (averaged), the retain gradient
    assert rounds and len(entered) == 3 * len(rounds), "not every gradient of a round recomputed its blocks"
    said = [m for m in messages if "gradients recompute the blocks" in m]
    assert len(said) == 1 and "over the 0 MiB budget" in said[0], messages
    assert recomputed is True and kept_recomputed is False  # what the run's diagnostics say
    assert kept and history == kept_history and diagnostics == kept_diagnostics
    assert list(deltas) == list(kept)
    for name, delta in kept.items():
        assert torch.equal(deltas[name].view(torch.int16 if delta.dtype == torch.bfloat16 else torch.int32),
                           delta.view(torch.int16 if delta.dtype == torch.bfloat16 else torch.int32)), name


def test_mansu_recomputes_only_when_a_gradient_would_save_more_than_its_budget(toy_llama_gqa, monkeypatch):
    """The decision follows the measurement: the longest fact's saved bytes (not the first
    fact's) times the facts of a chunk (the batch's size when it has fewer), the most over the
    batches, against the budget."""
    import workbench.unlearning.mansu.state as mansu_state
    from workbench.core.sharing import sharing_copy

    model = toy_llama_gqa
    work = sharing_copy(model.hf).eval()
    names = _mlp_and_attention_weights(work)
    for p in work.parameters():
        p.requires_grad_(False)

    def per_fact(words: int) -> int:
        with mansu_state.taking_grad(work, names):
            return saved_bytes(work, lambda: span_logits(work, _long_facts(model, [words])))

    # more facts than a chunk, listed first; fewer, the longest in the middle
    many, few = _long_facts(model, [4] * 20), _long_facts(model, [3, 40, 5])
    most = 3 * per_fact(40)
    assert most > mansu_state.GRADIENT_CHUNK * per_fact(4) > 0  # the few long ones decide

    def measured(budget: int):
        monkeypatch.setattr(LoadedModel, "working_budget_bytes", lambda self: budget)
        return mansu_state.gradient_memory(model, work, names, (many, few))

    assert measured(most).saved == most and measured(most).recompute is False and measured(most - 1).recompute
    assert measured(most).chunk_facts == 3 and measured(most).per_fact == per_fact(40)
    assert "3 facts would save" in measured(most - 1).message()
    assert not any(p.requires_grad or p.grad is not None for p in work.parameters())
    # a tiny model's gradients stay far under the default budget (at least 128 MiB): never recomputed
    monkeypatch.undo()
    assert mansu_state.gradient_memory(model, work, names, (many, few)).recompute is False


def test_through_weights_computed_at_forward_a_recomputed_gradient_holds_what_it_holds_through_tensors():
    """Through a compact quantized copy (weights dequantized in their module's forward, with
    saving hooks of their own inside the checkpointed blocks) a recomputed gradient holds about
    what it holds through the plain quantized copy (the tensors each forward makes, counted at the
    dispatcher; a weight or two of slack for the dequantization), far under a kept backward's."""
    from test_attribution_memory import PeakTensorBytes

    from workbench.quant import quantized_copy

    model = toy_model("llama", n_layers=6, n_kv_heads=2)
    batch = _batch(model)

    def peak(copy: torch.nn.Module, recompute: bool = True) -> int:
        names = _mlp_and_attention_weights(copy)[:1]  # the first block's: the backward runs through all
        existing = {t.untyped_storage().data_ptr() for t in [*copy.parameters(), *copy.buffers()]}
        mode = PeakTensorBytes(existing)
        with mode:
            answer_logprob_gradient(copy, names, batch, chunk=len(batch),
                                    recompute_blocks_of=model.adapter if recompute else None)
        return mode.peak

    compact_copy = compact_quantized_copy(model.hf, NF4, materialized=())
    compact, full = peak(compact_copy), peak(quantized_copy(model.hf, NF4))
    largest_weight = max(p.numel() * 4 for p in model.hf.parameters() if p.dim() == 2)
    assert compact <= full + 2 * largest_weight, (compact, full)
    assert compact < peak(compact_copy, recompute=False) / 2


def _long_facts(model, lengths: list[int]) -> FactBatch:
    from workbench.data.facts import Fact

    return FactBatch.from_facts(model.tokenizer, [Fact(" ".join(f"w{i}" for i in range(n)), "w1", ())
                                                  for n in lengths])


def test_fisher_passes_take_as_many_facts_as_the_budget_holds(toy_llama_gqa, monkeypatch):
    """The Fisher's per-example gradients cannot recompute blocks, so over the budget it takes
    fewer facts per pass: as many as the budget holds of the longest fact (at least one, at most a
    chunk); within it, a whole chunk."""
    import workbench.unlearning.mansu.state as mansu_state
    from workbench.core.sharing import sharing_copy

    model = toy_llama_gqa
    work = sharing_copy(model.hf).eval()
    names = _mlp_and_attention_weights(work)
    batch = _long_facts(model, [5] * 10 + [40] + [5] * 9)  # the longest in the middle decides
    with mansu_state.taking_grad(work, names):
        one = saved_bytes(work, lambda: span_logits(work, _long_facts(model, [40])))

    def per_pass(budget: int) -> int:
        monkeypatch.setattr(LoadedModel, "working_budget_bytes", lambda self: budget)
        memory = mansu_state.gradient_memory(model, work, names, (batch,))
        assert memory.per_fact == one and memory.chunk_facts == mansu_state.GRADIENT_CHUNK
        return memory.facts_per_pass()

    assert per_pass(mansu_state.GRADIENT_CHUNK * one) == mansu_state.GRADIENT_CHUNK  # within: a whole chunk
    assert per_pass(mansu_state.GRADIENT_CHUNK * one - 1) == mansu_state.GRADIENT_CHUNK - 1
    assert per_pass(3 * one) == 3 and per_pass(3 * one - 1) == 2
    assert per_pass(1) == 1
    assert mansu_state.GradientMemory(10, 5, 10, 1).facts_per_pass() == 1  # a batch of one fact
    assert "3 would save" in mansu_state.GradientMemory(30, 20, 10, 3).fisher_message()
    # what a fact holds besides its saved tensors (the Fisher's per-example gradient) counts too
    monkeypatch.setattr(LoadedModel, "working_budget_bytes", lambda self: 3 * one)
    with_extra = mansu_state.gradient_memory(model, work, names, (batch,), extra_per_fact=one // 2)
    assert with_extra.per_fact == one + one // 2 and with_extra.facts_per_pass() == 2


def test_the_fisher_in_fewer_facts_per_pass_is_the_same_to_float_rounding_and_holds_less(toy_llama_gqa):
    from test_attribution_memory import PeakTensorBytes

    from workbench.core.sharing import sharing_copy
    from workbench.unlearning.mansu.fisher import diagonal_fisher

    model = toy_llama_gqa
    work = sharing_copy(model.hf).eval()
    names = _mlp_and_attention_weights(work)
    batch = _long_facts(model, [30 + i for i in range(16)])

    def fisher(chunk: int) -> tuple[dict[str, torch.Tensor], int]:
        existing = {t.untyped_storage().data_ptr() for t in [*work.parameters(), *work.buffers()]}
        mode = PeakTensorBytes(existing)
        with mode:
            result = diagonal_fisher(work, names, batch, len(batch), transposed=model.adapter.transposed, chunk=chunk)
        return result, mode.peak

    (whole, whole_peak), (two, two_peak) = fisher(16), fisher(2)
    for n in names:
        torch.testing.assert_close(two[n], whole[n], rtol=1e-5, atol=1e-12)
        assert whole[n].abs().sum() > 0, n
    assert two_peak < whole_peak / 3, (two_peak, whole_peak)


def test_mansu_takes_its_fisher_in_fewer_facts_when_the_budget_says_so(toy_gpt2, monkeypatch):
    """A budget below one fact's saved bytes: the Fisher runs one fact per pass and says so; the
    rounds' gradients recompute their blocks. The Fisher's probe measures the Fisher's own facts."""
    import workbench.unlearning.mansu.state as mansu_state
    from workbench.unlearning.mansu import fisher as mansu_fisher

    split = own_top1_split(toy_gpt2)
    config = MansuConfig(use_circuit=False, max_rounds=1, params_per_round=128, retain_guard=0.02, fisher_samples=5)
    chunks: list[int] = []
    real = mansu_fisher._batched_linear_fisher

    def recording(*args, **kwargs):
        chunks.append(args[4] if len(args) > 4 else kwargs["chunk"])
        return real(*args, **kwargs)

    measured: list[tuple[tuple[FactBatch, ...], int]] = []
    real_memory = mansu_state.gradient_memory

    def recording_memory(model, work, names, batches, extra_per_fact=0):
        measured.append((batches, extra_per_fact))
        return real_memory(model, work, names, batches, extra_per_fact)

    monkeypatch.setattr(mansu_fisher, "_batched_linear_fisher", recording)
    monkeypatch.setattr(mansu_state, "gradient_memory", recording_memory)
    _run(toy_gpt2, split, config)
    assert chunks == [16]
    # the Fisher's probe: its own facts (the first fisher_samples retain facts) and its per-example gradient
    (fisher_batches, extra), _rounds = measured
    retain = FactBatch.from_facts(toy_gpt2.tokenizer, split.retain)
    rows = min(config.fisher_samples, len(retain))
    assert len(fisher_batches) == 1 and len(fisher_batches[0]) == rows < len(retain)
    assert torch.equal(fisher_batches[0].ids, mansu_fisher.fisher_rows(retain, config.fisher_samples).ids)
    assert extra == max(4 * p.numel() for n, p in toy_gpt2.hf.named_parameters()
                        if n.startswith("transformer.h.") and p.dim() == 2) > 0
    monkeypatch.setattr(LoadedModel, "working_budget_bytes", lambda self: 1)
    messages: list[str] = []
    _, _, _, recomputed = _run(toy_gpt2, split, config, lambda f, m: messages.append(m))
    assert chunks == [16, 1] and recomputed
    said = [m for m in messages if m.startswith("retain Fisher")]
    assert said and "retain Fisher 1 fact per pass" in said[0] and "over the 0 MiB budget" in said[0], said
