"""Memory bounded by the work (issue 17, item 3): copies share the base's weights, and the
measurement built on them gives exactly the numbers of the old deep-copy measurement."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import bf16_copy, large_circuit_paths, own_top1_split

from workbench.core.components import all_components, mlp
from workbench.core.errors import WorkbenchError
from workbench.core.memo import clear_base_memo
from workbench.core.sharing import sharing_copy
from workbench.data.facts import FactSplit
from workbench.interpretability.attribution import AttributionConfig, attribute
from workbench.interpretability.cad import circuit_attribution_divergence
from workbench.measurement.evaluation import evaluate_facts
from workbench.measurement.metrics import measure_update
from workbench.models.loaded import LoadedModel
from workbench.models.update import SparseDelta, Update
from workbench.quant import QuantConfig, quantize_dequantize
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.registry import unlearn

pytestmark = pytest.mark.usefixtures("one_thread")
NF4 = QuantConfig("nf4")
SILENT = lambda fraction, message: None  # noqa: E731


def test_sharing_copy_shares_storage_and_replacing_a_weight_leaves_the_base(toy_llama_gqa):
    hf = toy_llama_gqa.hf
    shell = sharing_copy(hf)
    base = dict(hf.named_parameters())
    for name, p in shell.named_parameters():
        assert p.data_ptr() == base[name].data_ptr() and p is not base[name]
    name = "model.layers.0.mlp.up_proj.weight"
    before = base[name].clone()
    shell.get_parameter(name).data = torch.zeros_like(before)
    assert torch.equal(base[name], before)
    assert shell.get_parameter(name).abs().sum() == 0
    same = sharing_copy(hf, same_parameters=True)
    assert all(p is base[n] for n, p in same.named_parameters())


def _deep_copy_variants(model: LoadedModel, update: Update, quant: QuantConfig) -> dict[str, LoadedModel]:
    """The five variants as the workbench built them before issue 17: a deep copy per model."""
    base = model.state()
    names = model.adapter.quantizable(quant)
    tr = model.adapter.transposed
    qbase = {n: quantize_dequantize(base[n], quant, transposed=n in tr) for n in names}
    after_fp = {n: base[n] + d for n, d in update.deltas.items()}
    after_q = {**qbase, **{n: quantize_dequantize(base[n] + d, quant, transposed=n in tr) if n in qbase
                           else base[n] + d for n, d in update.deltas.items()}}
    qbase_delta = {**qbase, **{n: qbase.get(n, base[n]) + d for n, d in update.deltas.items()}}

    def deep(state: dict[str, torch.Tensor], name: str) -> LoadedModel:
        hf = copy.deepcopy(model.hf)
        with torch.no_grad():
            for n, t in state.items():
                hf.get_parameter(n).copy_(t)
        return LoadedModel(name=name, hf=hf, tokenizer=model.tokenizer)

    return {"base_fp": model, "base_q": deep(qbase, "q"), "after_fp": deep(after_fp, "a"),
            "after_qbase_delta": deep(qbase_delta, "qd"), "after_q": deep(after_q, "aq")}


def _check_equal_to_deep_copies(model: LoadedModel, split: FactSplit, update: Update) -> None:
    circuit = all_components(model.n_layers, model.n_heads, include_embed=False)
    before = model.weights_hash()
    m = measure_update(model, split, update, quant=NF4, circuit=circuit)
    assert model.weights_hash() == before
    variants = _deep_copy_variants(model, update, NF4)
    for vname, vmodel in variants.items():
        assert getattr(m.forget, vname) == evaluate_facts(vmodel, split.forget, multiple_choice=False).top1, vname
        assert getattr(m.retain, vname) == evaluate_facts(vmodel, split.retain, multiple_choice=False).top1, vname
    config = AttributionConfig()
    for label, (b, a) in {"fp": ("base_fp", "after_fp"), "quantized": ("base_q", "after_q")}.items():
        x, y = (attribute(variants[v], split.forget, config, progress=SILENT) for v in (b, a))
        cad = circuit_attribution_divergence(x.scores, y.scores, circuit=circuit,
                                             metric_before=x.clean_metric, metric_after=y.clean_metric).cad
        assert getattr(m.cad, label) == pytest.approx(cad, rel=1e-6, abs=1e-9), label
    assert m.forget.after_q != m.forget.base_fp or m.cad.fp > 0  # the update did something measurable


def test_measurement_equals_deep_copy_measurement_on_facts_tiny(facts_tiny, split):
    result = unlearn(facts_tiny, split, method="mansu", quant=NF4, progress=SILENT,
                     circuit=all_components(facts_tiny.n_layers, facts_tiny.n_heads, include_embed=False),
                     method_config=MansuConfig(max_rounds=2))
    assert result.update.nnz() > 0
    _check_equal_to_deep_copies(facts_tiny, split, result.update)



def test_only_the_variants_built_on_w_plus_delta_compute_it(toy_llama_gqa, monkeypatch):
    """Q(w) and Q(w)+Δ hold no w+Δ of the update's tensors (on a large update, the size of its
    tensors); w+Δ and Q(w+Δ) compute it once each; an unknown variant is named."""
    from workbench.core.errors import WorkbenchError
    from workbench.measurement.metrics import VARIANTS, quantized_base, variant_state

    name = "model.layers.1.mlp.down_proj.weight"
    update = Update({name: torch.full_like(toy_llama_gqa.state()[name], 0.01)})
    qbase = quantized_base(toy_llama_gqa, NF4)
    built: list[str] = []
    real = Update.after_state
    monkeypatch.setattr(Update, "after_state", lambda self, base: built.append(vname) or real(self, base))
    for vname in VARIANTS:
        variant_state(toy_llama_gqa, update, NF4, vname, qbase)
    assert built == ["after_fp", "after_q"]
    with pytest.raises(WorkbenchError, match="unknown variant 'after'"):
        variant_state(toy_llama_gqa, update, NF4, "after", qbase)


def test_measurement_equals_deep_copy_measurement_on_a_tiny_llama(toy_llama_gqa):
    split = own_top1_split(toy_llama_gqa, name="toy-llama")
    gen = torch.Generator().manual_seed(0)
    state = toy_llama_gqa.state()
    # a dense update on one quantized and one unquantized weight, a sparse one elsewhere
    deltas = {n: torch.randn(state[n].shape, generator=gen) * 0.05
              for n in ("model.layers.1.mlp.down_proj.weight", "model.norm.weight")}
    sparse = torch.zeros_like(state["model.layers.0.self_attn.o_proj.weight"])
    sparse[:3, :5] = 0.2
    deltas["model.layers.0.self_attn.o_proj.weight"] = sparse
    _check_equal_to_deep_copies(toy_llama_gqa, split, Update(deltas))


def test_chunked_gradient_equals_one_backward(facts_tiny, split):
    """MANSU's gradients over more facts than one chunk are summed chunk by chunk: the same
    gradient as one backward over all of them, up to float summation order."""
    from workbench.models.scoring import FactBatch
    from workbench.unlearning.mansu.candidates import answer_logprob_gradient

    work = sharing_copy(facts_tiny.hf)
    names = ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_attn.weight"]
    batch = FactBatch.from_facts(facts_tiny.tokenizer, list(split.retain[:50]))
    whole = answer_logprob_gradient(work, names, batch, chunk=len(batch))
    chunked = answer_logprob_gradient(work, names, batch, chunk=16)
    for n in names:
        assert whole[n].abs().max() > 0
        torch.testing.assert_close(chunked[n], whole[n], rtol=1e-5, atol=1e-7)


# --- MANSU's state bounded by what it moves (issue 17, item 3) --------------------------------------

BOUNDED_CONFIGS = {
    "default": {},
    "best code": {"code_choice": "best"},
    "no floor": {"use_floor": False},
    "no Fisher": {"use_fisher": False},
    "snap": {"floor_mode": "snap"},
    "both precisions": {"guard_precision": "both", "forget_direction": "quantized"},
}


@pytest.mark.parametrize("overrides", BOUNDED_CONFIGS.values(), ids=BOUNDED_CONFIGS.keys())
def test_mansu_over_every_weight_is_the_same_when_grids_and_scores_are_not_held(facts_tiny, split, monkeypatch,
                                                                               overrides):
    """Above a size MANSU rebuilds each grid when it needs it, scores the tensors twice instead
    of holding every score, and holds the model at Q(w+Δ) as codes (a tensor only for each weight
    a round wrote); forced here on facts-tiny, the run must not change at all."""
    import workbench.unlearning.mansu.candidates as candidates
    import workbench.unlearning.mansu.state as state

    config = MansuConfig(use_circuit=False, max_rounds=3, **overrides)

    def run() -> tuple[dict[str, torch.Tensor], list[dict[str, float]], object]:
        result = unlearn(facts_tiny, split, method="mansu", quant=NF4, progress=SILENT, method_config=config)
        return result.update.deltas, result.history, result.diagnostics.get("retain_output_change")

    held, held_history, held_change = run()
    monkeypatch.setattr(state, "MANY_CANDIDATES_WEIGHTS", 0)
    monkeypatch.setattr(state, "GRID_KEEP_WEIGHTS", 0)
    monkeypatch.setattr(candidates, "SCORE_CACHE_WEIGHTS", 0)
    rebuilt, rebuilt_history, rebuilt_change = run()
    assert sum(int((d != 0).sum()) for d in held.values()) > 0
    assert sorted(held) == sorted(rebuilt) and rebuilt_history == held_history
    assert rebuilt_change == held_change  # read through the working model at w+Δ, computed per forward
    for name, delta in held.items():
        assert torch.equal(rebuilt[name], delta), name


def test_a_round_scores_twice_when_every_score_would_outweigh_the_working_budget(facts_tiny, split, monkeypatch):
    """The working budget decides whether a round holds every candidate's score (one scoring per
    tensor) or scores each tensor twice, holding one at a time: the same run either way. Here the
    scores' bytes are inflated past facts-tiny's budget, and the scorings counted."""
    from types import SimpleNamespace

    import workbench.unlearning.mansu.candidates as candidates

    config = MansuConfig(use_circuit=False, max_rounds=2)
    scored: list[str] = []
    score_module = candidates.score_module
    monkeypatch.setattr(candidates, "score_module", lambda state, name, *a: (scored.append(name),
                                                                            score_module(state, name, *a))[1])

    def run() -> tuple[dict[str, torch.Tensor], list[dict[str, float]], int]:
        scored.clear()
        result = unlearn(facts_tiny, split, method="mansu", quant=NF4, progress=SILENT, method_config=config)
        return result.update.deltas, result.history, len(scored)

    held, held_history, once = run()
    monkeypatch.setattr(candidates, "SCORE_BYTES_PER_WEIGHT", facts_tiny.working_budget_bytes())
    twice_deltas, twice_history, twice = run()
    assert once > 0 and twice == 2 * once  # every tensor scored twice in every round
    assert twice_history == held_history and sorted(held) == sorted(twice_deltas)
    assert all(torch.equal(held[name], twice_deltas[name]) for name in held)
    budget = 12 * 1000
    for n_weights, holds in ((999, True), (1000, True), (1001, False)):
        state = SimpleNamespace(n_weights=lambda n=n_weights: n, working_budget=budget)
        monkeypatch.setattr(candidates, "SCORE_BYTES_PER_WEIGHT", 12)
        assert candidates.holds_every_score(state) is holds  # type: ignore[arg-type]
    monkeypatch.setattr(candidates, "SCORE_CACHE_WEIGHTS", 999)
    assert not candidates.holds_every_score(SimpleNamespace(n_weights=lambda: 1000, working_budget=10**12))


@pytest.mark.parametrize("family", ["gpt2", "llama-bf16"])
def test_mansus_kept_grids_are_packed_to_a_byte_per_weight_and_unpack_to_the_quantizers(
        family, toy_gpt2, toy_llama_gqa):
    """The grids kept for a circuit's candidates hold each weight's code and each block's absmax
    (about 1 byte per weight, not 13) and give, per use, every field :func:`weight_grid` computes
    with the quantizer: GPT-2's Conv1D (blocks along the transpose) and bfloat16 weights."""
    from workbench.quant import transposed_parameters
    from workbench.unlearning.mansu.grid import weight_grid
    from workbench.unlearning.mansu.state import GridStore

    model = toy_gpt2 if family == "gpt2" else bf16_copy(toy_llama_gqa)
    params = dict(model.hf.named_parameters())
    layout = transposed_parameters(model.hf)
    names = sorted(n for n in params if n.endswith(".weight") and params[n].dim() == 2 and "embed" not in n
                   and "wte" not in n and "wpe" not in n)
    base = {n: params[n].detach() for n in names}
    transposed = {n: n in layout for n in names}
    assert any(transposed.values()) == (family == "gpt2")
    store = GridStore(base, names, NF4, transposed)
    weights = sum(base[n].numel() for n in names)
    assert weights <= store.kept_bytes() <= weights * 1.07  # a byte per weight, 4 per 64-weight block
    for n in names:
        kept, built = store[n], weight_grid(base[n], NF4, transposed=transposed[n])
        for field in ("code", "rank", "absmax", "values", "bin_width", "is_block_max"):
            assert torch.equal(getattr(kept, field), getattr(built, field)), (n, field)


@pytest.mark.parametrize("family", ["gpt2", "llama-bf16"])
def test_mansu_over_every_weight_sums_the_written_weights_at_forward(family, toy_gpt2, toy_llama_gqa, monkeypatch):
    """Over every weight, the model at w+Δ computes each written weight as base + delta in its
    module's forward instead of holding a copy: GPT-2's Conv1D and a bfloat16 Llama (w+Δ
    rounded to bf16 in the forward) run exactly as with the copies."""
    import workbench.unlearning.mansu.state as state
    from workbench.core.computed_weight import installed
    from workbench.models.update import SumAtForward
    from workbench.unlearning.batches import Batches
    from workbench.unlearning.mansu.method import run_round
    from workbench.unlearning.task import UnlearningTask

    model = toy_gpt2 if family == "gpt2" else bf16_copy(toy_llama_gqa)
    split = own_top1_split(model)
    config = MansuConfig(use_circuit=False, max_rounds=3, params_per_round=64)

    def run() -> tuple[dict[str, torch.Tensor], list[dict[str, float]], object]:
        result = unlearn(model, split, method="mansu", quant=NF4, progress=SILENT, method_config=config)
        return result.update.deltas, result.history, result.diagnostics.get("retain_output_change")

    held, held_history, held_change = run()
    monkeypatch.setattr(state, "MANY_CANDIDATES_WEIGHTS", 0)
    summed, summed_history, summed_change = run()
    assert held and summed_history == held_history and summed_change == held_change
    assert sorted(held) == sorted(summed)
    for name, delta in held.items():
        assert torch.equal(summed[name], delta), name

    # what the working model holds after a round: no copy of a written weight, and the base untouched
    before = {n: p.detach().clone() for n, p in model.hf.named_parameters()}
    batches = Batches.build(model, split)
    task = UnlearningTask(model=model, batches=batches, quant=NF4, circuit=None, progress=SILENT)
    st = state.setup_state(model, batches, None, NF4, config, SILENT)
    run_round(st, task, config, 1)
    written = [n for n, d in st.deltas.items() if bool((d != 0).any())]
    assert written and not st.owned
    for n in written:
        at_forward = installed(st.work.get_submodule(n.rpartition(".")[0]))
        assert isinstance(at_forward, SumAtForward) and isinstance(at_forward.delta, SparseDelta)
        # the moves only, not a dense delta: what the forward sums is the delta the run holds
        assert at_forward.delta.index.numel() == int(st.deltas.moved(n).sum()) < st.deltas[n].numel()
        assert torch.equal(at_forward.delta.dense(), st.deltas[n])
        assert st.work.get_parameter(n).untyped_storage().nbytes() == st.work.get_parameter(n).element_size()
    for n, p in model.hf.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"the base model changed: {n}"


def test_mansu_state_holds_only_the_tensors_a_round_wrote(facts_tiny, split):
    """The working model shares every base tensor until a round writes into it, deltas and moved
    flags are held per moved weight, (all-true) masks exist only for written tensors, and the base
    model is never touched."""
    from workbench.unlearning.batches import Batches
    from workbench.unlearning.mansu.method import run_round
    from workbench.unlearning.mansu.state import setup_state
    from workbench.unlearning.task import UnlearningTask

    before = {n: p.detach().clone() for n, p in facts_tiny.hf.named_parameters()}
    config = MansuConfig(use_circuit=False, max_rounds=1, params_per_round=4)
    batches = Batches.build(facts_tiny, split)
    task = UnlearningTask(model=facts_tiny, batches=batches, quant=NF4, circuit=None, progress=SILENT)
    state = setup_state(facts_tiny, batches, None, NF4, config, SILENT)
    base = dict(facts_tiny.hf.named_parameters())
    work = dict(state.work.named_parameters())
    assert all(work[n].data_ptr() == base[n].data_ptr() for n in state.names) and not list(state.deltas.items())
    assert not list(state.masks.items()) and state.n_candidates == sum(base[n].numel() for n in state.names)
    assert len(state.names) > 2
    run_round(state, task, config, 1)
    written = {n for n, d in state.deltas.items() if bool((d != 0).any())}
    assert written and written < set(state.names)
    assert state.owned == set(state.deltas.written()) and set(state.deltas.moved_names()) == state.owned
    assert state.deltas.n_held() == state.n_moved() == sum(int((d != 0).sum()) for _, d in state.deltas.items())
    for n in state.names:
        shares = work[n].data_ptr() == base[n].data_ptr()
        assert shares == (n not in state.owned), n
    for n, p in facts_tiny.hf.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"the base model changed: {n}"
    unwritten = next(n for n in state.names if n not in state.owned)
    assert torch.equal(state.deltas[unwritten], torch.zeros_like(base[unwritten]))


def test_reference_logits_are_taken_only_by_the_methods_that_use_them(facts_tiny, split):
    """The base's span logits over the whole split (~0.9 GB on SmolLM2) are computed on first
    use: MANSU never asks for them; a reference-based loss gets the same logits as before."""
    from workbench.models.scoring import span_logits
    from workbench.unlearning.batches import Batches
    from workbench.unlearning.mansu import mansu
    from workbench.unlearning.task import UnlearningTask

    batches = Batches.build(facts_tiny, split)
    mansu(UnlearningTask(model=facts_tiny, batches=batches, quant=NF4, circuit=None, progress=SILENT),
          MansuConfig(use_circuit=False, max_rounds=1))
    assert "ref_forget" not in vars(batches) and "ref_retain" not in vars(batches)
    with torch.no_grad():
        assert torch.equal(batches.ref_retain, span_logits(facts_tiny.hf, batches.retain))
        assert torch.equal(batches.ref_forget, span_logits(facts_tiny.hf, batches.forget))
    assert batches.ref_retain is batches.ref_retain  # computed once


@pytest.mark.parametrize("setup", ["diagonal_fisher", "projectors_for"])
def test_a_second_run_on_the_same_circuit_reuses_the_fisher_and_projectors(facts_tiny, split, monkeypatch, setup):
    """The retain Fisher and the null-space projectors are the base's: computed once per circuit
    in a process, and the run that reuses them is the run that computes them; only the latest
    circuit's are held, and none above their size bound."""
    import workbench.unlearning.mansu.state as state

    computed = []
    real = getattr(state, setup)
    monkeypatch.setattr(state, setup, lambda *a, **k: computed.append(1) or real(*a, **k))
    layer1 = [c for c in all_components(facts_tiny.n_layers, facts_tiny.n_heads, include_embed=False) if c.layer == 1]

    def run(circuit) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
        result = unlearn(facts_tiny, split, method="mansu", quant=NF4, progress=SILENT, circuit=circuit,
                         method_config=MansuConfig(max_rounds=3))
        return result.update.deltas, result.history

    first, first_history = run(layer1)
    second, second_history = run(layer1)
    assert len(computed) == 1
    assert second_history == first_history and sorted(second) == sorted(first)
    assert all(torch.equal(second[n], d) for n, d in first.items())
    run([c for c in layer1 if c.kind == "mlp"])  # another circuit: other tensors, its own Fisher
    assert len(computed) == 2
    run(layer1)  # only the latest circuit's is held
    assert len(computed) == 3
    monkeypatch.setattr(state, "SETUP_MEMO_ENTRIES", 0)
    unkept, unkept_history = run(layer1)
    assert len(computed) == 4 and unkept_history == first_history
    assert all(torch.equal(unkept[n], d) for n, d in first.items())


def test_scoring_forwards_fill_no_key_value_cache(toy_llama_gqa):
    """A transformers model's forward fills a key/value cache for every layer unless told not to;
    scoring and MANSU's input capture never read it, so they ask for none (same logits)."""
    from workbench.models.scoring import FactBatch, span_logits, span_positions
    from workbench.unlearning.mansu.projection import linear_inputs

    hf = toy_llama_gqa.hf
    batch = FactBatch.from_facts(toy_llama_gqa.tokenizer, list(own_top1_split(toy_llama_gqa).retain[:8]))
    asked: list[object] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, kw: asked.append(kw.get("use_cache")), with_kwargs=True)
             for m in (hf, hf.base_model)]
    try:
        with torch.no_grad():
            got = span_logits(hf, batch)
        linear_inputs(hf, ["model.layers.0.mlp.up_proj.weight"], batch)
    finally:
        for h in hooks:
            h.remove()
    # logits_at's body forward; the input capture's whole-model forward, which passes it to its body
    assert asked == [False, False, False]
    with torch.no_grad():
        cached = hf(batch.ids, use_cache=True)
        assert cached.past_key_values is not None  # the default this avoids
        n, span = batch.targets.shape
        rows = torch.arange(n)[:, None].expand(n, span).reshape(-1)
        want = cached.logits[rows, span_positions(batch).reshape(-1)].reshape(n, span, -1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_weight_summed_at_forward_gives_the_held_sums_logits_and_gradient(toy_llama_gqa):
    from workbench.core.computed_weight import install
    from workbench.core.errors import WorkbenchError
    from workbench.models.update import SumAtForward, stored_sum

    hf, name = toy_llama_gqa.hf, "model.layers.0.mlp.down_proj.weight"
    base = hf.get_parameter(name).detach()
    delta = torch.randn(base.shape, generator=torch.Generator().manual_seed(0)) * 1e-2
    held, summed = sharing_copy(hf), sharing_copy(hf)
    held.get_parameter(name).data = stored_sum(base, delta)
    install(summed.get_submodule(name.rpartition(".")[0]), SumAtForward(base, SparseDelta.of(delta)))
    ids = torch.arange(1, 13).reshape(2, 6)
    grads = []
    for model in (held, summed):
        p = model.get_parameter(name)
        p.requires_grad_(True)
        model(ids).logits.float().logsumexp(-1).sum().backward()
        grads.append(p.grad)
        p.requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(held(ids).logits, summed(ids).logits)
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])
    with pytest.raises(WorkbenchError, match="w\\+Δ of shapes"):
        SumAtForward(base, SparseDelta.of(delta[:1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_a_sparse_delta_added_to_a_weight_is_the_dense_sum_bit_for_bit(dtype):
    """``SparseDelta.added_to`` is ``stored_sum`` of the dense delta, to the bit: signed zeros
    (``-0.0 + 0.0`` is ``+0.0`` where the dense delta adds its zeros, ``-0.0 + -0.0`` stays
    ``-0.0`` at a stored ``-0.0``), rounding to a 16-bit dtype, a non-contiguous weight, and a
    float64 weight (which ``stored_sum`` sums in float32)."""
    from workbench.models.update import stored_sum

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=gen, dtype=torch.float64).to(dtype)  # float64: past float32's digits
    base.view(-1)[:6] = -0.0
    index = torch.tensor([0, 1, 7, 13, 59, 22])
    values = torch.tensor([-0.0, 0.25, 1e-3, -2.5, 0.0, 3e-7])
    sparse = SparseDelta(base.shape, index, values)
    dense = sparse.dense()
    assert dense.dtype == torch.float32 and dense.view(-1)[index].tolist() == values.tolist()

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])

    for weight in (base, base.T.contiguous().T):  # the second: the same values, transposed strides
        assert torch.equal(bits(sparse.added_to(weight)), bits(stored_sum(weight, dense)))
    assert torch.signbit(sparse.added_to(base).view(-1)[:6]).tolist() == [True, False, False, False, False, False]
    with pytest.raises(WorkbenchError, match="one value per index"):
        SparseDelta(base.shape, index, values[:2])


class DenseDeltas:
    """MANSU's deltas as it held them before :class:`SparseDeltas`: a dense float32 delta and a
    dense bool flag tensor per written tensor, the forward's sum reading the live delta. The
    reference the sparse store must match, run for run."""

    def __init__(self, like):
        self._like, self._d, self._m = like, {}, {}

    def _delta(self, n):
        return self._d.setdefault(n, torch.zeros(self._like[n].shape, dtype=torch.float32))

    def _flags(self, n):
        return self._m.setdefault(n, torch.zeros(self._like[n].numel(), dtype=torch.bool))

    def touch(self, n):
        self._delta(n)  # allocated at the first move tried, as MANSU's dense store did

    def at(self, n, i):
        return float(self._d[n].view(-1)[i]) if n in self._d else 0.0

    def set(self, n, indices, values):
        flat = self._delta(n).view(-1)
        for i, v in zip(indices, values, strict=True):
            flat[int(i)] = v

    def replace(self, n, index, values):
        flat = self._delta(n).view(-1)
        flat.zero_()
        flat[index] = values.float()

    def mark(self, n, indices, moved=True):
        indices = list(indices)
        flags = [moved] * len(indices) if isinstance(moved, bool) else list(moved)
        for i, m in zip(indices, flags, strict=True):
            self._flags(n)[int(i)] = m

    def mark_only(self, n, indices):
        self._flags(n).zero_()
        self._flags(n)[list(indices)] = True

    def sparse(self, n):
        # every entry: the dense sum, re-held after each change; reading allocates nothing (as
        # the sparse store's read: the order tensors were first tried in is kept)
        return SparseDelta.of(self._d[n] if n in self._d else torch.zeros(self._like[n].shape))

    def __getitem__(self, n):
        return self._d[n].clone() if n in self._d else torch.zeros(self._like[n].shape)

    def after(self, n):
        from workbench.models.update import stored_sum

        return stored_sum(self._like[n], self[n])

    def moved(self, n):
        return self._m[n].clone() if n in self._m else torch.zeros(self._like[n].numel(), dtype=torch.bool)

    def written(self):
        return list(self._d)

    def items(self):
        return ((n, self[n]) for n in self._d)

    def moved_names(self):
        return sorted(self._m)

    def n_moved(self):
        return sum(int(f.sum()) for f in self._m.values())


def test_sparse_deltas_keep_the_order_tensors_were_first_tried_in():
    """The update lists tensors in the order the rounds first tried a move in them (a move the
    Fisher budget then skipped included), as the dense store did: its Fisher bound sums in it."""
    from workbench.unlearning.mansu.deltas import SparseDeltas

    like = {n: torch.zeros(3, 4) for n in ("a", "b", "c")}
    deltas = SparseDeltas(like)
    deltas.touch("a")  # tried, skipped: no delta yet
    deltas.touch("b")
    deltas.set("b", [5], [0.1])
    deltas.set("a", [2], [-0.25])
    deltas.set("c", [0], [1.0])
    assert deltas.written() == ["a", "b", "c"] and [n for n, _ in deltas.items()] == ["a", "b", "c"]
    assert deltas.at("b", 5) == float(torch.tensor(0.1))  # rounded to float32, as a tensor stores it
    assert deltas["a"].view(-1).tolist() == [0, 0, -0.25] + [0] * 9 and deltas.at("c", 1) == 0.0
    deltas.mark("a", [2, 7])
    deltas.mark("a", [7], False)
    assert deltas.moved("a").nonzero().view(-1).tolist() == [2] and deltas.n_moved() == 1


@pytest.mark.parametrize(("family", "large", "floor_mode"), [
    ("gpt2", False, "each_round"), ("gpt2", True, "snap"), ("llama-bf16", True, "each_round"),
    ("llama-bf16", False, "snap")])
def test_mansu_with_sparse_deltas_runs_as_with_dense_ones(family, large, floor_mode, toy_gpt2, toy_llama_gqa,
                                                           monkeypatch):
    """Deltas and moved flags held per moved weight (``SparseDeltas``) give the run the dense
    tensors gave, bit for bit: history, every delta's bits, the update's order, the diagnostics;
    through rounds the retain guard undoes (it is set to 0 here), the final snap, a 16-bit model,
    and a large circuit's paths (w+Δ summed at forward from the sparse delta, grids rebuilt)."""
    import workbench.unlearning.mansu.state as mansu_state

    model = toy_gpt2 if family == "gpt2" else bf16_copy(toy_llama_gqa)
    if large:
        large_circuit_paths(monkeypatch)
    split = own_top1_split(model)
    config = MansuConfig(use_circuit=False, max_rounds=5, params_per_round=128, floor_mode=floor_mode,
                         retain_guard=0.0 if floor_mode == "each_round" else 0.02)

    def run():
        result = unlearn(model, split, method="mansu", quant=NF4, progress=SILENT, method_config=config)
        diagnostics = {k: v for k, v in result.diagnostics.items() if k != "seconds_by_phase"}
        return result.history, result.update.deltas, diagnostics

    sparse_history, sparse, sparse_diagnostics = run()
    monkeypatch.setattr(mansu_state, "SparseDeltas", DenseDeltas)
    dense_history, dense, dense_diagnostics = run()
    assert sparse and sparse_history == dense_history and sparse_diagnostics == dense_diagnostics
    if floor_mode == "each_round":
        assert sparse_diagnostics["rounds_undone_by_retain_guard"] > 0
    else:
        assert sparse_diagnostics["snapped"] > 0
    assert list(sparse) == list(dense)
    for name, delta in sparse.items():
        assert torch.equal(delta.view(torch.int32), dense[name].view(torch.int32)), name


_FRAGMENTED = """
import os, torch
from workbench.core.allocator import hand_back_freed_memory
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
held = [torch.ones(16_384) for _ in range(4_000)]  # 64 KiB each: glibc's heap, not mmap
held = held[::10]  # nine in ten freed between kept ones: the heap cannot shrink from its top
before = rss()
print(hand_back_freed_memory(), before - rss())
"""


def test_freed_heap_memory_is_handed_back_to_the_os():
    """Tensors freed between live ones stay resident under glibc until a trim returns their pages."""
    import os
    import subprocess
    import sys

    from workbench.core.allocator import _malloc_trim

    if not sys.platform.startswith("linux") or _malloc_trim() is None:
        pytest.skip("needs glibc's malloc_trim and /proc (elsewhere handing back does nothing: next test)")
    if os.environ.get("LD_PRELOAD") or any(k.startswith("MALLOC_") for k in os.environ):
        pytest.skip("another allocator or glibc's tunables set: where 64 KiB blocks live is not glibc's default")

    out = subprocess.run([sys.executable, "-c", _FRAGMENTED], capture_output=True, text=True, check=True)
    trimmed, returned = out.stdout.split()
    assert trimmed == "True"
    assert int(returned) > 150 * 2**20  # of ~225 MiB freed


def test_without_malloc_trim_handing_back_does_nothing(monkeypatch):
    import ctypes.util

    from workbench.core import allocator

    allocator._libc_function.cache_clear()
    monkeypatch.setattr(allocator, "_mallctl", lambda: None)  # and no jemalloc either
    try:
        monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libno-such-c.so")
        assert allocator.hand_back_freed_memory() is False  # no C library by that name
        allocator._libc_function.cache_clear()
        monkeypatch.setattr(ctypes, "CDLL", lambda name: object())
        assert allocator.hand_back_freed_memory() is False  # a C library without malloc_trim (musl, macOS)
    finally:
        allocator._libc_function.cache_clear()


def test_the_apps_allocator_environment_preloads_jemalloc_once_and_keeps_the_users_settings(monkeypatch):
    from workbench.core import allocator

    lib = "/opt/lib/libjemalloc.so.2"
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: lib)
    env = allocator.app_allocator_environment({"HOME": "/h"})
    assert env is not None and env["HOME"] == "/h"
    assert (env["LD_PRELOAD"], env["MALLOC_CONF"]) == (lib, allocator.JEMALLOC_CONF)
    assert allocator.app_allocator_environment(env) is None  # restarted once, never twice
    theirs = allocator.app_allocator_environment({"LD_PRELOAD": "/x/libmine.so", "MALLOC_CONF": "narenas:1"})
    assert theirs is not None and (theirs["LD_PRELOAD"], theirs["MALLOC_CONF"]) == (f"{lib}:/x/libmine.so", "narenas:1")
    assert allocator.app_allocator_environment({"WORKBENCH_MALLOC": " System "}) is None
    with pytest.raises(WorkbenchError, match=r"\$WORKBENCH_MALLOC must be one of jemalloc, system .*'tcmalloc'"):
        allocator.app_allocator_environment({"WORKBENCH_MALLOC": "tcmalloc"})
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: None)
    assert allocator.app_allocator_environment({}) is None  # not installed: the C library's, quietly
    with pytest.raises(WorkbenchError, match="no libjemalloc.so.2 is installed: install Debian's libjemalloc2"):
        allocator.app_allocator_environment({"WORKBENCH_MALLOC": "jemalloc"})  # asked for: said


_RESTARTED = """
import os
from workbench.core.allocator import allocator_in_use, restart_under_app_allocator
restart_under_app_allocator()
print(allocator_in_use(), os.environ.get("MALLOC_CONF"))
"""


def _jemalloc_or_skip() -> str:
    from workbench.core.allocator import jemalloc_library

    library = jemalloc_library()
    if library is None:
        pytest.skip("needs an installed libjemalloc.so.2 (make app installs Debian's libjemalloc2)")
    return library


@pytest.mark.parametrize("choice", ["", "system"])
def test_the_app_restarts_itself_under_jemalloc_unless_told_not_to(choice):
    """What ``python app.py`` does first: the same command again, with jemalloc preloaded."""
    import os
    import subprocess
    import sys

    from workbench.core.allocator import JEMALLOC_CONF

    _jemalloc_or_skip()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKBENCH_MALLOC", "MALLOC_", "LD_PRELOAD"))}
    out = subprocess.run([sys.executable, "-c", _RESTARTED], env={**env, "WORKBENCH_MALLOC": choice},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == (["system", "None"] if choice == "system" else ["jemalloc", JEMALLOC_CONF])


def test_freed_memory_is_handed_back_under_jemalloc_too():
    """With jemalloc told never to return freed pages by itself, handing back returns them: the
    app's trims between clicks and the memory bench's between phases work under either allocator."""
    import os
    import subprocess
    import sys

    library = _jemalloc_or_skip()
    env = {**os.environ, "LD_PRELOAD": library, "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    script = _FRAGMENTED.replace("print(", "from workbench.core.allocator import allocator_in_use\n"
                                           "print(allocator_in_use(), ")
    in_use, handed_back, returned = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                                   text=True, check=True).stdout.split()
    assert (in_use, handed_back) == ("jemalloc", "True")
    assert int(returned) > 150 * 2**20  # of ~225 MiB freed


def test_make_apps_app_runs_under_jemalloc_and_says_so(tmp_path):
    """``python app.py`` (what ``make app`` runs) restarts under jemalloc before it serves: the
    serving process maps the library, and its log names the allocator."""
    from conftest import launch_app, stop_app

    _jemalloc_or_skip()
    proc, _ = launch_app(tmp_path, ["--no-preload"], env={"WORKBENCH_MALLOC": ""})
    try:
        maps = Path(f"/proc/{proc.pid}/maps").read_text()  # the same process: restarting replaced its program
    finally:
        stop_app(proc)
    assert "libjemalloc" in maps
    assert "memory allocator: jemalloc" in (tmp_path / "app.log").read_text()


def test_workbench_app_starts_the_apps_process_under_the_apps_allocator(monkeypatch):
    import argparse

    from workbench.core import allocator
    from workbench.faces.cli import serve

    started = {}
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: "/opt/lib/libjemalloc.so.2")
    monkeypatch.delenv("WORKBENCH_MALLOC", raising=False)
    monkeypatch.delenv("WORKBENCH_MALLOC_PRELOADED", raising=False)
    monkeypatch.setattr(serve.subprocess, "call", lambda cmd, env: started.update(cmd=cmd, env=env) or 0)
    assert serve.cmd_app(argparse.Namespace(extra_args=["--port", "7999"]), None) == 0
    assert started["cmd"][-2:] == ["--port", "7999"]
    assert started["env"]["LD_PRELOAD"].startswith("/opt/lib/libjemalloc.so.2")
    monkeypatch.setenv("WORKBENCH_MALLOC", "system")
    serve.cmd_app(argparse.Namespace(extra_args=[]), None)
    assert started["env"] is None  # the CLI's own environment, unchanged


_ARENAS = r"""
import ctypes, ctypes.util, sys, tempfile, threading
from workbench.core.allocator import limit_arenas

print(limit_arenas(2) if sys.argv[1] == "limit" else None)
import torch  # after the limit, as the app does it before its threads
barrier = threading.Barrier(8)

def work():
    kept = [torch.empty(4096) for _ in range(20)]  # 16 KiB each: from the thread's own arena
    barrier.wait()  # all alive at once, so no thread inherits an arena another let go
    del kept

threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
with tempfile.NamedTemporaryFile(suffix=".xml") as f:
    fp = libc.fopen(f.name.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    print(open(f.name).read().count("<heap nr="))
"""


def test_limited_arenas_keep_threads_allocations_in_two_heaps():
    """Eight threads allocating at once get an arena each from glibc, or share two once limited
    (what the app does at its start); $MALLOC_ARENA_MAX, when set, is left to stand."""
    import os
    import subprocess
    import sys

    from workbench.core import allocator

    if not sys.platform.startswith("linux") or allocator._libc_function("malloc_info") is None:
        pytest.skip("needs glibc (malloc_info, mallopt): elsewhere limit_arenas does nothing")
    if os.environ.get("LD_PRELOAD"):
        pytest.skip("a preloaded library may replace glibc's malloc (jemalloc, tcmalloc): no arenas to count")
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}

    def heaps(mode: str, **extra: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _ARENAS, mode], capture_output=True, text=True, check=True,
                             env={**env, **extra}).stdout.split()
        return out[0], int(out[1])

    unlimited, many = heaps("none")  # the main thread's and one per thread, up to 8 per core
    assert unlimited == "None" and many >= 4, many
    assert heaps("limit") == ("True", 2)
    assert heaps("limit", MALLOC_ARENA_MAX="3") == ("False", 3)  # the user's setting stands
    assert heaps("limit", GLIBC_TUNABLES="glibc.malloc.arena_max=3") == ("False", 3)  # so does a tunable


def test_the_app_limits_arenas_before_its_threads_start(monkeypatch):
    from workbench.faces import app as app_module

    order: list[str] = []
    monkeypatch.setattr(app_module, "limit_arenas", lambda: order.append("arenas") or True)
    # stand-ins for what would change this process's shared state (model roots, the loaded-model cap)
    monkeypatch.setattr(app_module, "configure", lambda args: order.append("configure"))
    monkeypatch.setattr(app_module.SHARED, "preload", lambda model: order.append("preload"))

    class Stop(Exception):
        pass

    def build(*args, **kwargs):
        order.append("build")
        raise Stop

    monkeypatch.setattr(app_module, "build_app", build)
    with pytest.raises(Stop):
        app_module.main(["--model", "facts-tiny"])
    assert order == ["arenas", "configure", "preload", "build"]


def test_a_step_that_hands_back_memory_trims_however_it_ends(monkeypatch):
    from workbench.core import allocator

    calls: list[bool] = []
    monkeypatch.setattr(allocator, "hand_back_freed_memory", lambda collect=False: calls.append(collect) or True)

    @allocator.hands_back_memory
    def step(x: int) -> int:
        """A step."""
        if x < 0:
            raise ValueError("negative")
        assert calls == []  # not before the step's own work
        return 2 * x

    assert step(3) == 6 and calls == [True]  # a click may have let go of models: collected first
    with pytest.raises(ValueError, match="negative"):
        step(-1)
    assert calls == [True, True]  # a failed click's transients too
    assert step.__name__ == "step" and step.__doc__ == "A step."


def test_mansu_hands_freed_memory_back_before_each_rounds_gradients_and_selection(facts_tiny, split, monkeypatch):
    import workbench.unlearning.mansu.method as method

    calls: list[int] = []
    monkeypatch.setattr(method, "hand_back_freed_memory", lambda collect=False: calls.append(1) or True)
    result = unlearn(facts_tiny, split, method="mansu", quant=NF4, progress=SILENT,
                     circuit=all_components(facts_tiny.n_layers, facts_tiny.n_heads, include_embed=False),
                     method_config=MansuConfig(max_rounds=2, params_per_round=16))
    computed = result.steps - result.diagnostics["rounds_reusing_gradients"]
    assert result.steps == 2 and len(calls) == computed + result.steps


def test_the_measurement_hands_freed_memory_back_after_each_variant(facts_tiny, split, monkeypatch):
    import workbench.measurement.metrics as metrics

    calls: list[bool] = []
    monkeypatch.setattr(metrics, "hand_back_freed_memory", lambda collect=False: calls.append(collect) or True)
    name = "transformer.h.1.mlp.c_fc.weight"
    delta = torch.zeros_like(facts_tiny.state()[name])
    delta[:4, :4] = 0.3
    measure_update(facts_tiny, split, Update({name: delta}), quant=NF4, cad=False)
    # each variant handed back; none attributed (no bridge) and none outlived its last name, so no
    # collection (0.5–1 s each in a large process): the next test has the one that is needed
    assert calls == [False] * len(metrics.VARIANTS)


def test_the_measurement_holds_one_variant_at_a_time_without_the_cycle_collector(
        facts_tiny, split, monkeypatch, no_cycle_collector):
    """Each variant, attributed for CAD or not, is freed before the next is made and none is left
    when the measurement returns, with Python's cycle collector off: a bridge is a web of
    reference cycles, and waiting for the collector left earlier variants' tensors under later
    variants' CAD passes (on SmolLM2, in a process of ~600k objects, it ran rarely)."""
    import weakref

    name = "transformer.h.1.mlp.c_fc.weight"
    delta = torch.zeros_like(facts_tiny.state()[name])
    delta[:4, :4] = 0.3
    made: list[tuple[str, list[weakref.ref]]] = []  # per variant, its modules (a copy's own objects)
    with_tree = LoadedModel.with_tree

    def alive() -> list[str]:
        return [lbl for lbl, refs in made if any(ref() is not None for ref in refs)]

    def watched(self, hf_copy, label):
        assert alive() == [], f"alive when {label} is made"
        made.append((label, [weakref.ref(m) for m in hf_copy.modules()]))
        return with_tree(self, hf_copy, label)

    monkeypatch.setattr(LoadedModel, "with_tree", watched)
    clear_base_memo()  # the base variants made here too
    measure_update(facts_tiny, split, Update({name: delta}), quant=NF4, circuit=[mlp(1)])
    assert len(made) >= 4  # Q(w), w+Δ, Q(w)+Δ, Q(w+Δ)
    assert alive() == []


def test_the_measurement_collects_a_variant_that_a_reference_cycle_keeps(facts_tiny, split, monkeypatch,
                                                                        no_cycle_collector):
    """A variant that outlives its last name (here each is put in a cycle with itself, as a
    bridge's hooks are with their modules) is collected before the next variant is made; one that does
    not is only handed back (a collection costs 0.5–1 s in a process of many objects)."""
    import weakref

    import workbench.measurement.metrics as metrics

    made: list[weakref.ref] = []
    measured = metrics._measured_variant

    def cyclic(*args, **kwargs):
        variant = measured(*args, **kwargs)
        if variant is facts_tiny:  # base_fp is the base itself, never let go
            return variant
        object.__setattr__(variant, "held_by_itself", variant)  # (its tree is deep-copied: not there)
        assert all(ref() is None for ref in made), "an earlier variant is alive when the next is made"
        made.append(weakref.ref(variant))
        return variant

    monkeypatch.setattr(metrics, "_measured_variant", cyclic)
    calls: list[bool] = []
    hand_back = metrics.hand_back_freed_memory
    monkeypatch.setattr(metrics, "hand_back_freed_memory",
                        lambda collect=False: calls.append(collect) or hand_back(collect=collect))
    name = "transformer.h.1.mlp.c_fc.weight"
    delta = torch.zeros_like(facts_tiny.state()[name])
    delta[:4, :4] = 0.3
    measure_update(facts_tiny, split, Update({name: delta}), quant=NF4, cad=False)
    assert len(made) >= 3 and all(ref() is None for ref in made)  # w+Δ, Q(w)+Δ, Q(w+Δ) at least
    assert calls.count(True) == len(made) and len(calls) == len(metrics.VARIANTS)


def test_booted_bridge_reads_the_bridge_without_booting_one(facts_tiny):
    """The measurement watches a variant's bridge only when one was booted: asking must not boot it."""
    variant = facts_tiny.with_state({}, "no change")
    assert variant.booted_bridge() is None
    assert variant.booted_bridge() is None  # still none: asking did not boot one
    bridge = variant.bridge()
    assert variant.booted_bridge() is bridge


def test_handing_back_with_collect_frees_what_only_the_cycle_collector_frees(no_cycle_collector):
    """``collect=True`` runs the cycle collector first (a bridge's modules and hooks refer to each
    other; a model copy in such a cycle outlives its last name); without it the cycle stays."""
    import weakref

    from workbench.core.allocator import hand_back_freed_memory

    class Node:
        pass

    node = Node()
    node.itself, node.weights = node, torch.zeros(1024)
    weights = weakref.ref(node.weights)
    del node
    hand_back_freed_memory()
    assert weights() is not None
    hand_back_freed_memory(collect=True)
    assert weights() is None


def test_the_measurement_lets_go_of_q_w_where_the_update_writes_once_q_w_plus_delta_is_built(
        facts_tiny, split, monkeypatch):
    """Q(w) of an updated tensor is read by Q(w)+Δ alone: the last variant, Q(w+Δ), does not hold
    it beside its own tensor (the updated tensors' bytes once more on a large circuit), and every
    variant is the model :func:`build_variants` builds with all of Q(w), weight for weight."""
    import workbench.measurement.metrics as metrics

    names = ["transformer.h.1.mlp.c_fc.weight", "transformer.h.0.attn.c_proj.weight"]
    deltas = {n: torch.zeros_like(facts_tiny.state()[n]) for n in names}
    for d in deltas.values():
        d[:4, :4] = 0.3
    update = Update(deltas)
    reference = metrics.build_variants(facts_tiny, update, NF4)
    held: dict[str, set[str]] = {}
    built = metrics.variant_model

    def watched(model, upd, quant, vname, qbase):
        held[vname] = set(qbase)
        vmodel = built(model, upd, quant, vname, qbase)
        for n, p in vmodel.hf.named_parameters():
            assert torch.equal(p, reference[vname].hf.get_parameter(n)), (vname, n)
        return vmodel

    monkeypatch.setattr(metrics, "variant_model", watched)
    measure_update(facts_tiny, split, update, quant=NF4, cad=False)
    quantized = set(facts_tiny.adapter.quantizable(NF4))
    assert held["base_q"] == held["after_qbase_delta"] == quantized
    assert held["after_q"] == quantized - set(names)


def test_a_circuit_s_whole_tensors_hold_no_mask_and_the_run_is_the_same(facts_tiny, split, monkeypatch):
    """MANSU's candidate masks are held only for tensors the circuit takes in part (a head's rows
    of a shared projection); an MLP's matrices read as all-true until a round masks something.
    The run equals the one holding every circuit mask (history, delta bits)."""
    import workbench.unlearning.mansu.state as mansu_state
    from workbench.core.components import head, mlp
    from workbench.interpretability.parameters import circuit_parameters

    circuit = [head(0, 1), mlp(1), head(1, 0)]
    config = MansuConfig(max_rounds=3, params_per_round=16)
    masks = mansu_state.candidate_masks(facts_tiny, tuple(circuit), NF4, config)
    full = {n: m for n, m in circuit_parameters(facts_tiny, circuit).items()
            if n in facts_tiny.adapter.quantizable(NF4)}
    assert masks.names() == sorted(full)
    held = dict(masks.items())
    assert held and set(held) == {n for n, m in full.items() if not bool(m.all())} != set(full)
    for n, m in full.items():
        assert torch.equal(masks[n], m), n

    def run():
        return unlearn(facts_tiny, split, method="mansu", quant=NF4, circuit=circuit, progress=SILENT,
                       method_config=config)

    lean = run()
    params = dict(facts_tiny.hf.named_parameters())
    every_mask = mansu_state.CandidateMasks({n: params[n].detach() for n in full}, written=dict(full))
    monkeypatch.setattr(mansu_state, "candidate_masks", lambda *args: every_mask)
    every = run()
    assert lean.history == every.history and lean.update.nnz() > 0
    assert sorted(lean.update.deltas) == sorted(every.update.deltas)
    for n, d in lean.update.deltas.items():
        assert torch.equal(d, every.update.deltas[n]), n


def test_the_background_start_hands_freed_memory_back_between_its_steps(facts_tiny, split, monkeypatch):
    """The app's background start (base accuracies, the base's CAD attributions, the forget set's
    pairs and readout meter) hands what each step freed back before the next one starts."""
    import workbench.faces.session as session_mod
    from workbench.quant import QuantConfig

    order: list[str] = []
    monkeypatch.setattr(session_mod, "hand_back_freed_memory",
                        lambda collect=False: order.append("collect, trim" if collect else "trim") or True)
    monkeypatch.setattr(session_mod.SharedModels, "base_accuracy", lambda self, *a: order.append("accuracy"))
    monkeypatch.setattr(session_mod, "base_measurement", lambda *a: order.append("cad"))
    monkeypatch.setattr(session_mod, "prepare_forget_set", lambda *a: order.append("pairs"))
    session_mod.SharedModels().prepare_base(facts_tiny, split, QuantConfig("nf4"))
    assert order == ["accuracy", "collect, trim", "cad", "collect, trim", "pairs"]


def test_mansu_hands_freed_memory_back_before_its_retain_fisher(facts_tiny, split, monkeypatch):
    """MANSU's setup hands what the projectors' forwards freed back before the Fisher's passes."""
    import workbench.unlearning.mansu.state as state

    order: list[str] = []
    monkeypatch.setattr(state, "hand_back_freed_memory", lambda collect=False: order.append("trim") or True)
    real_projectors, real_fisher = state.null_space_projectors, state.retain_fisher
    monkeypatch.setattr(state, "null_space_projectors",
                        lambda *a, **k: order.append("projectors") or real_projectors(*a, **k))
    monkeypatch.setattr(state, "retain_fisher", lambda *a, **k: order.append("fisher") or real_fisher(*a, **k))
    unlearn(facts_tiny, split, method="mansu", quant=NF4, progress=SILENT,
            circuit=all_components(facts_tiny.n_layers, facts_tiny.n_heads, include_embed=False),
            method_config=MansuConfig(max_rounds=1, params_per_round=16))
    assert order == ["projectors", "trim", "fisher"]
