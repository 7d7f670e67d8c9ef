"""The compact quantized copy (issue 17): quantized weights held as codes, dequantized per
forward, give the full quantized copy's logits and gradients bit for bit, in less memory."""

from __future__ import annotations

import weakref

import pytest
import torch

from workbench.core.computed_weight import installed
from workbench.core.errors import WorkbenchError
from workbench.models.adapter import SUPPORTED_FAMILIES
from workbench.models.toy import toy_model
from workbench.quant import QuantConfig
from workbench.quant.compact import compact_bytes, compact_quantized_copy, pack_codes, unpack_codes
from workbench.quant.model import quantized_copy
from workbench.quant.parameters import quantizable_parameters, transposed_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n_codes, numel", [(16, 7), (16, 64), (256, 9)])
def test_codes_pack_and_unpack(n_codes, numel):
    codes = torch.randint(0, n_codes, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_codes(codes, n_codes)
    assert packed.numel() == (numel + 1) // 2 if n_codes == 16 else numel
    assert torch.equal(unpack_codes(packed, n_codes, numel), codes)
    if n_codes == 16:  # bnb's order: the earlier weight in the high nibble
        assert int(packed[0]) == int(codes[0]) * 16 + int(codes[1])


def _ids(model, n: int = 3, length: int = 6) -> torch.Tensor:
    vocab = model.hf.config.vocab_size
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fixture", ["facts_tiny", "toy_llama_gqa", "toy_gpt2"])
@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_compact_copy_gives_the_full_copys_logits_and_gradients(fixture, quant, request):
    model = request.getfixturevalue(fixture)
    cfg = QuantConfig(quant)
    names = quantizable_parameters(model.hf, cfg)
    written = names[len(names) // 2]  # one weight kept as a tensor, differentiated
    full, compact = quantized_copy(model.hf, cfg), compact_quantized_copy(model.hf, cfg, materialized=[written])
    ids = _ids(model)
    with torch.no_grad():
        assert torch.equal(full(ids).logits, compact(ids).logits)

    def gradient(copy: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        p = copy.get_parameter(written)
        p.requires_grad_(True)
        loss = copy(ids).logits.float().logsumexp(-1).sum()
        (grad,) = torch.autograd.grad(loss, [p])
        p.requires_grad_(False)
        return loss.detach(), grad

    (loss_full, grad_full), (loss_compact, grad_compact) = gradient(full), gradient(compact)
    assert torch.equal(loss_full, loss_compact) and torch.equal(grad_full, grad_compact)
    assert grad_full.abs().sum() > 0
    # the written weight is a tensor the caller can copy into; the others are held as codes
    assert compact.get_parameter(written).shape == model.hf.get_parameter(written).shape
    assert compact_bytes(compact) > 0
    held = sum(_stored_bytes(p) for n, p in compact.named_parameters() if n in names)
    assert held < sum(_stored_bytes(p) for n, p in full.named_parameters() if n in names)


def _stored_bytes(p: torch.Tensor) -> int:
    return p.untyped_storage().nbytes()


@pytest.mark.parametrize("fixture", ["facts_tiny", "toy_llama_gqa", "toy_gpt2"])
def test_a_weight_held_as_codes_takes_the_tensors_gradient(fixture, request):
    """``.grad`` of a weight held as codes (its placeholder) equals the full copy's, bit for bit,
    summed over two backwards as autograd sums a tensor's (MANSU's chunks)."""
    model = request.getfixturevalue(fixture)
    cfg = QuantConfig("nf4")
    names = quantizable_parameters(model.hf, cfg)
    chosen = [names[0], names[len(names) // 2], names[-1]]  # first and last block, and one between
    full, compact = quantized_copy(model.hf, cfg), compact_quantized_copy(model.hf, cfg, materialized=[])

    def gradients(copy: torch.nn.Module) -> list[torch.Tensor]:
        params = [copy.get_parameter(n) for n in chosen]
        for p in params:
            p.requires_grad_(True)
        for seed in (1, 2):
            ids = torch.randint(0, model.hf.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(seed))
            copy(ids).logits.float().logsumexp(-1).sum().backward()
        grads = [p.grad for p in params]
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        return grads

    expected, got = gradients(full), gradients(compact)
    for name, e, g in zip(chosen, expected, got):
        assert e.abs().sum() > 0 and torch.equal(e, g), name
    assert all(_stored_bytes(compact.get_parameter(n)) <= 8 for n in chosen)  # still held as codes


def test_writing_a_quantized_weight_into_codes_or_a_tensor(toy_gpt2):
    """:func:`write_quantized`: a weight held as codes holds the new codes (no tensor), a weight
    held as a tensor gets the new value copied in; both forwards equal the full copy's."""
    from workbench.quant.codes import quantize_codes
    from workbench.quant.compact import write_quantized

    hf, cfg = toy_gpt2.hf, QuantConfig("nf4")
    names = quantizable_parameters(hf, cfg)
    held_as_codes, held_as_tensor = names[1], names[len(names) // 2]
    full = quantized_copy(hf, cfg)
    compact = compact_quantized_copy(hf, cfg, materialized=[held_as_tensor])
    before, tensor = compact_bytes(compact), compact.get_parameter(held_as_tensor)
    ids = _ids(toy_gpt2)
    with torch.no_grad():
        base_logits = full(ids).logits
    for name in (held_as_codes, held_as_tensor):
        w = hf.get_parameter(name).detach() * 1.5  # a new value, as w+Δ
        new = quantize_codes(w, cfg, transposed=name in transposed_parameters(hf))
        for copy in (full, compact):
            write_quantized(copy, name, new)
        assert torch.equal(full.get_parameter(name), new.dequantize())
    assert compact_bytes(compact) == before and _stored_bytes(compact.get_parameter(held_as_codes)) <= 8
    assert compact.get_parameter(held_as_tensor) is tensor  # copied into, in place
    with torch.no_grad():
        logits = full(ids).logits
        assert torch.equal(logits, compact(ids).logits) and not torch.equal(logits, base_logits)
    with pytest.raises(WorkbenchError, match="codes for"):
        write_quantized(compact, held_as_codes, quantize_codes(hf.get_parameter(names[0]).detach()[:1], cfg))


def test_compact_copy_leaves_the_base_and_holds_less(toy_llama_gqa):
    hf, cfg = toy_llama_gqa.hf, QuantConfig("nf4")
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    compact = compact_quantized_copy(hf, cfg, materialized=[])
    for n, p in hf.named_parameters():
        assert torch.equal(p, before[n]), n
    names = set(quantizable_parameters(hf, cfg))
    weights = sum(p.numel() * p.element_size() for n, p in hf.named_parameters() if n in names)
    # 4-bit codes: half a byte per weight plus the block scales, against 4 bytes in float32
    assert compact_bytes(compact) < weights / 6
    with torch.no_grad():
        compact(_ids(toy_llama_gqa))
    # placeholders again after the forward: the weight's shape on no storage of its own
    assert all(_stored_bytes(compact.get_parameter(n)) <= 8 for n in names)
    assert all(compact.get_parameter(n).shape == hf.get_parameter(n).shape for n in names)


def test_a_copy_computing_its_weights_at_forward_goes_with_its_last_reference(toy_llama_gqa, no_cycle_collector):
    """A module's installed forward reaches the module through a weak reference: a copy holding
    codes is freed when its last name goes, not left for the cycle collector (which in a large
    process runs rarely: on SmolLM2 each quantized variant's 57 MiB of codes lingered)."""
    compact = compact_quantized_copy(toy_llama_gqa.hf, QuantConfig("nf4"), materialized=[])
    with torch.no_grad():
        compact(_ids(toy_llama_gqa))  # forwards through the installed functions
    codes = [weakref.ref(m) for m in compact.modules() if installed(m) is not None]
    assert codes
    del compact
    assert all(ref() is None for ref in codes)


def test_the_graph_keeps_notes_not_dequantized_weights(toy_llama_gqa, monkeypatch):
    """Between forward and backward no dequantized weight is alive: the backward rebuilds each."""
    import weakref

    from workbench.quant.compact import CodesAtForward

    hf, cfg = toy_llama_gqa.hf, QuantConfig("nf4")
    written = "model.layers.0.self_attn.q_proj.weight"  # the first block: every later module's input takes a gradient
    compact = compact_quantized_copy(hf, cfg, materialized=[written])
    made: list[weakref.ref] = []
    dequantize = CodesAtForward.value

    def tracked(self):
        w = dequantize(self)
        made.append(weakref.ref(w))
        return w

    monkeypatch.setattr(CodesAtForward, "value", tracked)
    p = compact.get_parameter(written)
    p.requires_grad_(True)
    loss = compact(_ids(toy_llama_gqa)).logits.float().logsumexp(-1).sum()
    in_forward = len(made)
    assert in_forward > 0 and all(ref() is None for ref in made)
    loss.backward()
    assert len(made) > in_forward  # rebuilt for the backward
    assert p.grad is not None and p.grad.abs().sum() > 0
    p.requires_grad_(False)


@pytest.mark.parametrize("overrides", [{}, {"forget_direction": "quantized", "guard_precision": "both"}],
                         ids=["default (average direction)", "quantized direction, both guards"])
def test_mansu_with_a_compact_quantized_model_is_the_same_run(facts_tiny, split, monkeypatch, overrides):
    """MANSU's working models hold what they can compactly above a size (Q(w+Δ) every quantized
    weight as codes, w+Δ each written weight summed at forward); forced here on facts-tiny, the
    run (update and history) must not change at all."""
    import workbench.unlearning.mansu.state as state
    from workbench.core.components import all_components
    from workbench.unlearning.mansu import MansuConfig
    from workbench.unlearning.registry import unlearn

    # layer 0's heads: every later module is held as codes and lies on the gradients' path
    heads0 = [c for c in all_components(facts_tiny.n_layers, facts_tiny.n_heads, include_embed=False)
              if c.layer == 0 and c.kind != "mlp"]
    config = MansuConfig(max_rounds=4, **overrides)
    built = []
    real = state.compact_quantized_copy
    monkeypatch.setattr(state, "compact_quantized_copy", lambda *a, **k: built.append(1) or real(*a, **k))

    def run() -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
        result = unlearn(facts_tiny, split, method="mansu", quant=QuantConfig("nf4"), circuit=heads0,
                         progress=lambda f, m: None, method_config=config)
        return result.update.deltas, result.history

    tensors, tensors_history = run()
    assert not built
    monkeypatch.setattr(state, "COMPACT_QWORK_BYTES", 0)
    summed = []
    real_summed = state.summed_at_forward
    monkeypatch.setattr(state, "summed_at_forward", lambda *a: summed.extend(real_summed(*a)) or real_summed(*a))
    codes, codes_history = run()
    assert built and summed  # Q(w+Δ) all codes, w+Δ's written weights summed at forward
    assert sum(int((d != 0).sum()) for d in tensors.values()) > 0
    assert sorted(codes) == sorted(tensors) and codes_history == tensors_history
    for name, delta in tensors.items():
        assert torch.equal(codes[name], delta), name


def test_a_working_budget_below_the_weights_outside_the_circuit_holds_them_as_codes(facts_tiny, monkeypatch):
    """Q(w) outside MANSU's candidates is held as tensors while it fits the model's working budget
    (and 1 GiB) beside a gradient step; a smaller budget (``$WORKBENCH_WORKING_MB``), or a step
    that leaves too little of it, makes the working models compact: every quantized weight as
    codes (the candidates' too), the same logits."""
    import workbench.unlearning.mansu.state as state
    from workbench.models.loaded import LoadedModel

    cfg = QuantConfig("nf4")
    names = quantizable_parameters(facts_tiny.hf, cfg)[:1]
    others = sum(p.numel() * p.element_size() for n, p in facts_tiny.hf.named_parameters()
                 if n in quantizable_parameters(facts_tiny.hf, cfg) and n not in names)

    def compact(beside: int = 0) -> bool:
        return state.compact_working_models(facts_tiny, cfg, names, beside=beside)

    assert not compact()  # the default budget: tensors
    monkeypatch.setattr(LoadedModel, "working_budget_bytes", lambda self: others)
    assert not compact() and compact(beside=1)  # fits exactly: tensors; a step beside: codes
    monkeypatch.setattr(LoadedModel, "working_budget_bytes", lambda self: others + 100)
    assert not compact(beside=100) and compact(beside=101)
    monkeypatch.setattr(LoadedModel, "working_budget_bytes", lambda self: others - 1)
    assert compact()
    assert compact_bytes(state.quantized_working_copy(facts_tiny, cfg, False)) == 0
    work = state.quantized_working_copy(facts_tiny, cfg, True)
    assert 0 < compact_bytes(work) < others
    # the candidate as codes too: more codes than a copy that holds it as a tensor
    assert compact_bytes(work) > compact_bytes(compact_quantized_copy(facts_tiny.hf, cfg, materialized=names))
    ids = _ids(facts_tiny)
    with torch.no_grad():
        assert torch.equal(work(ids).logits, quantized_copy(facts_tiny.hf, cfg)(ids).logits)


def test_mansu_holds_q_w_as_codes_when_it_and_a_gradient_step_outgrow_the_budget(facts_tiny, split, monkeypatch):
    """MANSU holds its model at Q(w) through every gradient step: as tensors only when those and
    one step's saved activations fit the working budget together. A budget that holds the
    tensors alone but not the step beside them gives codes; one byte more than both, tensors."""
    import workbench.unlearning.mansu.state as state
    from workbench.core.components import all_components
    from workbench.models.loaded import LoadedModel
    from workbench.unlearning.mansu import MansuConfig
    from workbench.unlearning.registry import unlearn

    heads0 = [c for c in all_components(facts_tiny.n_layers, facts_tiny.n_heads, include_embed=False)
              if c.layer == 0 and c.kind != "mlp"]
    cfg = QuantConfig("nf4")
    built: list[int] = []
    steps: list[int] = []
    real_copy, real_memory = state.compact_quantized_copy, state.gradient_memory
    monkeypatch.setattr(state, "compact_quantized_copy", lambda *a, **k: built.append(1) or real_copy(*a, **k))

    def measured(*args, **kwargs):
        memory = real_memory(*args, **kwargs)
        steps.append(memory.step_bytes)
        return memory

    monkeypatch.setattr(state, "gradient_memory", measured)

    def codes_with(budget: int) -> bool:
        built.clear()
        monkeypatch.setattr(LoadedModel, "working_budget_bytes", lambda self: budget)
        unlearn(facts_tiny, split, method="mansu", quant=cfg, circuit=heads0, progress=lambda f, m: None,
                method_config=MansuConfig(max_rounds=1, use_fisher=False))
        return bool(built)

    names = sorted({n for n in quantizable_parameters(facts_tiny.hf, cfg) if ".h.0.attn." in n})
    others = facts_tiny.quantized_bytes(cfg, excluding=names)
    assert not codes_with(1 << 40)
    saved = steps[-1]  # a step's saved activations, within that budget
    assert 0 < saved < 1 << 40
    assert codes_with(others)  # Q(w)'s tensors fit, the step beside them does not
    assert not codes_with(others + saved)  # both fit
    assert codes_with(others + saved - 1) and steps[-1] == saved


@pytest.mark.parametrize("family", [*SUPPORTED_FAMILIES, "facts-tiny"])
def test_a_bridge_over_a_compact_copy_attributes_as_over_the_full_copy(family, facts_tiny, split):
    """TransformerLens' components read ``module.weight`` themselves (GPT-2's c_attn split at
    boot, each head's q/k/v with edges): over the placeholders a compact copy holds, every score
    was 0 (facts-tiny) or wrong (every family with edges). The bridge's own copy answers those
    reads with the computed weight: nodes and edges equal to the bit."""
    from conftest import own_top1_split

    from workbench.interpretability.attribution import AttributionConfig, attribute
    from workbench.models.loaded import LoadedModel

    kv_heads = None if family in ("gpt2", "gpt_neox") else 2  # grouped-query attention where the family has it
    base = facts_tiny if family == "facts-tiny" else toy_model(family, n_kv_heads=kv_heads)
    forget = split.forget if family == "facts-tiny" else own_top1_split(base).forget
    cfg = QuantConfig("nf4")
    full = LoadedModel(name="q", hf=quantized_copy(base.hf, cfg), tokenizer=base.tokenizer)
    compact = LoadedModel(name="q", hf=compact_quantized_copy(base.hf, cfg, materialized=()), tokenizer=base.tokenizer)
    config = AttributionConfig(edges=True)
    expected, got = attribute(full, forget, config), attribute(compact, forget, config)
    assert got.scores == expected.scores and got.edge_scores == expected.edge_scores
    assert max(abs(v) for v in expected.scores.values()) > 0 and expected.edge_scores
    # the compact model itself still holds placeholders (get_parameter, requires_grad_ go through them)
    name = quantizable_parameters(compact.hf, cfg)[0]
    assert isinstance(compact.hf.get_parameter(name), torch.nn.Parameter)


def test_a_bridge_over_a_weight_summed_at_forward_attributes_as_over_the_held_sum(toy_gpt2):
    """MANSU's w+Δ model computes a written weight as base + delta; GPT-2's joint c_attn is the
    hard case (the bridge splits it at boot, reading ``module.weight``)."""
    from conftest import own_top1_split

    from workbench.core.computed_weight import install
    from workbench.core.sharing import sharing_copy
    from workbench.interpretability.attribution import AttributionConfig, attribute
    from workbench.models.loaded import LoadedModel
    from workbench.models.update import SparseDelta, SumAtForward, stored_sum

    hf, name = toy_gpt2.hf, "transformer.h.0.attn.c_attn.weight"
    base = hf.get_parameter(name).detach()
    delta = torch.randn(base.shape, generator=torch.Generator().manual_seed(0)) * 0.3
    held, summed = sharing_copy(hf), sharing_copy(hf)
    held.get_parameter(name).data = stored_sum(base, delta)
    install(summed.get_submodule(name.rpartition(".")[0]), SumAtForward(base, SparseDelta.of(delta)))
    forget = own_top1_split(toy_gpt2).forget
    config = AttributionConfig(edges=True)
    expected = attribute(LoadedModel(name="held", hf=held, tokenizer=toy_gpt2.tokenizer), forget, config)
    got = attribute(LoadedModel(name="summed", hf=summed, tokenizer=toy_gpt2.tokenizer), forget, config)
    assert got.scores == expected.scores and got.edge_scores == expected.edge_scores
    base_scores = attribute(toy_gpt2, forget, config).scores
    assert got.scores != base_scores  # the delta is seen


def test_a_weight_read_answers_with_its_gradient_to_the_placeholder(toy_llama_gqa):
    """Read from outside its module's forward, a computed weight takes its gradient into the
    placeholder's ``.grad``, as the forward's own use does."""
    from workbench.core.computed_weight import answer_weight_reads, installed

    cfg = QuantConfig("nf4")
    compact = compact_quantized_copy(toy_llama_gqa.hf, cfg, materialized=())
    name = quantizable_parameters(compact, cfg)[0]
    owner = compact.get_submodule(name.rpartition(".")[0])
    at_forward = installed(owner)
    assert at_forward is not None and answer_weight_reads(compact) >= 1
    assert answer_weight_reads(compact) == 0  # once per module
    read = owner.weight
    assert torch.equal(read, quantized_copy(toy_llama_gqa.hf, cfg).get_parameter(name))
    at_forward.placeholder.requires_grad_(True)
    (owner.weight * 2).sum().backward()
    assert torch.equal(at_forward.placeholder.grad, torch.full_like(read, 2.0))
    # the base's modules keep their class
    assert type(toy_llama_gqa.hf.get_submodule(name.rpartition(".")[0])) is torch.nn.Linear


def _codes_test_update(model):
    from workbench.models.update import Update

    names = ["transformer.h.1.mlp.c_fc.weight", "transformer.h.0.attn.c_proj.weight", "transformer.h.0.ln_1.weight"]
    deltas = {n: torch.zeros_like(model.state()[n]) for n in names}
    for d in deltas.values():
        d[:4] = 0.3  # moves codes of the quantized weights, and a norm the quantizer leaves alone
    return Update(deltas)


def test_a_measurement_with_q_w_as_codes_is_the_same_measurement(facts_tiny, split, monkeypatch):
    """When Q(w) is held as codes (above the working budget, or beside CAD's passes) the
    measurement builds its quantized variants from codes, and every number it reports, CAD's
    attributions through the bridge included, equals the measurement holding Q(w) as tensors."""
    import json

    import workbench.measurement.metrics as metrics
    from workbench.core.memo import clear_base_memo

    update = _codes_test_update(facts_tiny)
    cfg = QuantConfig("nf4")
    assert not facts_tiny.reads_quantized_as_codes(cfg)  # the default budget: tensors
    monkeypatch.setattr(metrics, "_q_w_as_codes", lambda model, quant, attributed: False)
    expected = metrics.measure_update(facts_tiny, split, update, quant=cfg)
    clear_base_memo()  # base_q's scores and attribution measured again, as codes
    built: list[str] = []
    as_codes = metrics.variant_model_as_codes

    def watched(model, upd, quant, vname):
        built.append(vname)
        vmodel = as_codes(model, upd, quant, vname)
        assert compact_bytes(vmodel.hf) > 0
        return vmodel

    monkeypatch.setattr(metrics, "variant_model_as_codes", watched)
    # (not a smaller budget: that would also run attribution in smaller passes, other last bits)
    monkeypatch.setattr(metrics, "_q_w_as_codes", lambda model, quant, attributed: True)
    got = metrics.measure_update(facts_tiny, split, update, quant=cfg)
    assert sorted(built) == sorted(metrics.QUANTIZED_VARIANTS)
    assert json.dumps(got.to_json(), sort_keys=True) == json.dumps(expected.to_json(), sort_keys=True)
    assert got.cad is not None and got.params_changed > 0
    # measured again, Q(w)'s scores and attribution memoised: Q(w) is not made at all
    built.clear()
    again = metrics.measure_update(facts_tiny, split, update, quant=cfg)
    assert sorted(built) == sorted(set(metrics.QUANTIZED_VARIANTS) - {"base_q"})
    assert json.dumps(again.to_json(), sort_keys=True) == json.dumps(expected.to_json(), sort_keys=True)


@pytest.mark.parametrize("vname", ["base_q", "after_qbase_delta", "after_q"])
def test_a_variant_as_codes_holds_the_variants_weights(facts_tiny, vname):
    """Weight for weight (read through ``module.weight``, as the bridge reads it) the variant as
    codes is the variant as tensors; the base is untouched."""
    from workbench.core.computed_weight import answer_weight_reads
    from workbench.measurement.metrics import quantized_base, variant_model, variant_model_as_codes

    update = _codes_test_update(facts_tiny)
    cfg = QuantConfig("nf4")
    before = {n: p.clone() for n, p in facts_tiny.hf.named_parameters()}
    tensors = variant_model(facts_tiny, update, cfg, vname, quantized_base(facts_tiny, cfg)).hf
    codes = variant_model_as_codes(facts_tiny, update, cfg, vname).hf
    answer_weight_reads(codes)
    for name, p in tensors.named_parameters():
        owner, _, attr = name.rpartition(".")
        assert torch.equal(getattr(codes.get_submodule(owner), attr), p), name
    assert all(torch.equal(p, before[n]) for n, p in facts_tiny.hf.named_parameters())
    with pytest.raises(WorkbenchError, match="not a quantized variant"):
        variant_model_as_codes(facts_tiny, update, cfg, "after_fp")


def _held_sparse(update):
    from workbench.models.update import SparseDelta, Update

    held = {}
    for name, d in update.deltas.items():
        index = torch.nonzero(d.reshape(-1)).reshape(-1)
        held[name] = SparseDelta(d.shape, index, d.reshape(-1)[index])
    return Update(held, update.meta)


def test_the_after_model_sums_a_sparse_update_at_forward_to_the_held_sums_weights(facts_tiny):
    """The measurement's after_fp variant holds a sparse update's Linear/Conv1D weights as base +
    delta summed at forward (no copy of them) and the rest as tensors: weight for weight the
    variant as tensors; the base untouched."""
    from workbench.core.computed_weight import answer_weight_reads
    from workbench.measurement.metrics import after_model_summing, variant_model
    from workbench.models.update import SumAtForward

    dense = _codes_test_update(facts_tiny)
    before = {n: p.clone() for n, p in facts_tiny.hf.named_parameters()}
    tensors = variant_model(facts_tiny, dense, QuantConfig("nf4"), "after_fp", {}).hf
    summed = after_model_summing(facts_tiny, _held_sparse(dense)).hf
    at_forward = {n: installed(summed.get_submodule(n.rpartition(".")[0])) for n in dense.names}
    assert sorted(n for n, a in at_forward.items() if isinstance(a, SumAtForward)) == sorted(
        n for n in dense.names if ".mlp." in n or ".attn." in n)  # the norm's weight is held
    answer_weight_reads(summed)
    for name, p in tensors.named_parameters():
        owner, _, attr = name.rpartition(".")
        assert torch.equal(getattr(summed.get_submodule(owner), attr), p), name
    assert all(torch.equal(p, before[n]) for n, p in facts_tiny.hf.named_parameters())
    # a dense update is held as tensors, as before
    held = after_model_summing(facts_tiny, dense).hf
    assert not any(installed(m) for m in held.modules())


def test_a_measurement_of_a_sparse_update_is_the_measurement_of_its_dense_one(facts_tiny, split):
    """Every number, CAD's attributions of the summed after_fp included, equals the dense update's."""
    import json

    from workbench.measurement.metrics import measure_update

    dense = _codes_test_update(facts_tiny)
    cfg = QuantConfig("nf4")
    expected = measure_update(facts_tiny, split, dense, quant=cfg)
    got = measure_update(facts_tiny, split, _held_sparse(dense), quant=cfg)
    assert json.dumps(got.to_json(), sort_keys=True) == json.dumps(expected.to_json(), sort_keys=True)
    assert got.cad is not None and got.params_changed == dense.nnz() > 0


def test_the_measurement_reads_q_w_as_codes_exactly_above_the_budget(facts_tiny, monkeypatch):
    from workbench.models.loaded import LoadedModel

    cfg = QuantConfig("nf4")
    params = dict(facts_tiny.hf.named_parameters(remove_duplicate=False))
    held = sum(params[n].numel() * params[n].element_size() for n in facts_tiny.adapter.quantizable(cfg))
    monkeypatch.setattr(LoadedModel, "working_budget_bytes", lambda self: held)
    assert not facts_tiny.reads_quantized_as_codes(cfg)
    monkeypatch.setattr(LoadedModel, "working_budget_bytes", lambda self: held - 1)
    assert facts_tiny.reads_quantized_as_codes(cfg)


def test_the_measurement_holds_q_w_as_codes_beside_cads_passes(facts_tiny, split, monkeypatch):
    """CAD's attribution passes are sized to the whole working budget, so a measurement (or the
    base measurement the app takes at its start) that attributes holds Q(w) as codes whatever
    Q(w) weighs; one without CAD holds it as tensors while it fits the budget."""
    import workbench.measurement.metrics as metrics
    from workbench.core.memo import clear_base_memo

    update = _codes_test_update(facts_tiny)
    cfg = QuantConfig("nf4")
    built: list[str] = []
    as_codes = metrics.variant_model_as_codes
    monkeypatch.setattr(metrics, "variant_model_as_codes",
                        lambda model, upd, quant, vname: built.append(vname) or as_codes(model, upd, quant, vname))
    clear_base_memo()
    metrics.measure_update(facts_tiny, split, update, quant=cfg, cad=False)
    assert not built
    clear_base_memo()
    metrics.base_measurement(facts_tiny, split, cfg)
    assert built == ["base_q"]  # one Q(w), as codes, for its scores and its attribution
    built.clear()
    metrics.measure_update(facts_tiny, split, update, quant=cfg)
    assert sorted(built) == sorted(set(metrics.QUANTIZED_VARIANTS) - {"base_q"})  # Q(w)'s numbers memoised


def test_quantized_bytes_counts_each_tensor_once_and_leaves_out_the_excluded(toy_gpt2):
    cfg = QuantConfig("nf4", include_embeddings=True, include_lm_head=True)
    names = toy_gpt2.adapter.quantizable(cfg)
    params = dict(toy_gpt2.hf.named_parameters(remove_duplicate=False))
    tensors = {id(params[n]): params[n] for n in names}
    assert toy_gpt2.quantized_bytes(cfg) == sum(p.numel() * p.element_size() for p in tensors.values())
    one = names[0]
    assert toy_gpt2.quantized_bytes(cfg, excluding=[one]) == (
        toy_gpt2.quantized_bytes(cfg) - params[one].numel() * params[one].element_size())
