"""MANSU's four components checked against what they promise (docs/SCIENCE.md):
null-space projection, the quantization floor (every moved code changes, under the real
bitsandbytes quantizer), the diagonal-Fisher budget, and circuit restriction."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import bf16_copy, large_circuit_paths
from torch import nn

from workbench.core.components import EMBED, all_components, head, mlp
from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact, FactSplit
from workbench.interpretability.parameters import circuit_parameters
from workbench.measurement.reference import diagonal_fisher_per_example
from workbench.models.scoring import FactBatch
from workbench.models.update import Update
from workbench.quant import (
    QuantConfig,
    quantizable_parameters,
    quantize_codes,
    quantize_dequantize,
    single_use_linear_owners,
    transposed_parameters,
)
from workbench.unlearning.batches import Batches
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.mansu.candidates import rank_moves, round_gradients, score_module
from workbench.unlearning.mansu.fisher import diagonal_fisher, fisher_bound
from workbench.unlearning.mansu.method import run_round
from workbench.unlearning.mansu.projection import (
    linear_inputs,
    null_space_projector,
    project_update,
    retain_output_change,
)
from workbench.unlearning.mansu.rounds import take_moves, verify_codes
from workbench.unlearning.mansu.state import setup_state
from workbench.unlearning.registry import unlearn
from workbench.unlearning.task import UnlearningTask

SMALL = dict(params_per_round=16, max_rounds=3, fisher_samples=32)


# --- (b) null-space projection ---------------------------------------------------------------


def _low_rank_inputs(n: int = 200, d: int = 32, rank: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=gen) @ torch.randn(rank, d, generator=gen)


def test_projector_is_symmetric_idempotent_and_kills_retain_inputs():
    k = _low_rank_inputs()
    p = null_space_projector(k, threshold=1e-6)
    assert p.shape == (32, 32)
    torch.testing.assert_close(p, p.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(p @ p, p, atol=1e-5, rtol=0)
    assert round(float(torch.trace(p))) == 32 - 8  # the null space of a rank-8 input set
    assert float((k @ p).norm() / k.norm()) < 1e-5  # P k ≈ 0 for every retain input
    # ... but P is not the zero map: directions outside the retain span survive.
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    assert float((p @ v).norm()) > 0.5 * float(v.norm())


def test_projector_min_fraction_keeps_the_smallest_eigendirections():
    k = torch.randn(300, 16, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.5, 3.0, 16)
    p = null_space_projector(k, threshold=1e-9, min_fraction=0.5)  # full rank: threshold keeps none
    assert round(float(torch.trace(p))) == 8
    evals = torch.linalg.eigvalsh(k.double().T @ k.double())
    # ‖K P‖² is the sum of the eigenvalues of the kept directions: the 8 smallest.
    assert float((k.double() @ p.double()).pow(2).sum()) == pytest.approx(float(evals[:8].sum()), rel=1e-3)
    with pytest.raises(WorkbenchError):
        null_space_projector(torch.zeros(0, 4))


def test_a_held_projector_gives_back_the_projector_bit_for_bit():
    """MANSU holds each projector as its upper triangle when it is symmetric bit for bit (half the
    bytes) and whole otherwise; either way :meth:`matrix` is the projector it was given."""
    from workbench.unlearning.mansu.projection import HeldProjector

    p = null_space_projector(_low_rank_inputs(d=48), threshold=1e-6)
    held = HeldProjector.of(p)
    assert held.packed and held.stored.numel() == 48 * 49 // 2
    assert held.nbytes < 0.52 * p.numel() * p.element_size()
    assert torch.equal(held.matrix(), p) and held.matrix().dtype == p.dtype
    assert held.trace() == float(torch.trace(p))
    lopsided = p.clone()
    lopsided[3, 7] += 1e-3  # no longer symmetric: held whole, given back as it was
    whole = HeldProjector.of(lopsided)
    assert not whole.packed and torch.equal(whole.matrix(), lopsided)
    with pytest.raises(WorkbenchError, match="square"):
        HeldProjector.of(torch.zeros(4, 5))


def test_mansu_with_held_projectors_is_the_run_with_whole_ones(facts_tiny, split, monkeypatch):
    """Packing the projectors changes no number: the same run with every projector kept whole."""
    from workbench.unlearning.mansu import projection

    def run() -> tuple[dict[str, torch.Tensor], list[dict[str, float]], dict]:
        result = unlearn(facts_tiny, split, method="mansu", quant=QuantConfig("nf4"), progress=lambda f, m: None,
                         method_config=MansuConfig(use_circuit=False, max_rounds=3))
        return result.update.deltas, result.history, result.diagnostics

    packed, packed_history, packed_diagnostics = run()
    monkeypatch.setattr(projection.HeldProjector, "of", classmethod(lambda cls, p: cls(p, p.shape[0])))
    whole, whole_history, whole_diagnostics = run()
    assert packed and whole_history == packed_history and sorted(whole) == sorted(packed)
    assert all(torch.equal(whole[n], d) for n, d in packed.items())
    for key in ("null_space_dims", "retain_output_change"):
        assert whole_diagnostics[key] == packed_diagnostics[key]


def _retain_and_delta(d_in: int, d_out: int, seed: int = 3):
    k = _low_rank_inputs(d=d_in, seed=seed)
    delta = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed + 1))
    return k, delta, null_space_projector(k)


def test_projected_update_leaves_nn_linear_retain_outputs_unchanged():
    d_in, d_out = 32, 24
    k, delta, p = _retain_and_delta(d_in, d_out)  # delta in nn.Linear layout [out, in]
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out)
    with torch.no_grad():
        base_out = layer(k)
        moved = copy.deepcopy(layer)
        moved.weight += project_update(delta, p, conv1d=False)
        raw = copy.deepcopy(layer)
        raw.weight += delta
        scale = float(base_out.abs().max())
        assert float((moved(k) - base_out).abs().max()) < 1e-4 * scale
        assert float((raw(k) - base_out).abs().max()) > 0.1 * scale  # the unprojected update does change them
        off = torch.randn(5, d_in, generator=torch.Generator().manual_seed(9))  # off the retain span
        assert float((moved(off) - layer(off)).abs().max()) > 1e-2


def test_projected_update_leaves_gpt2_conv1d_retain_outputs_unchanged():
    from transformers.pytorch_utils import Conv1D

    d_in, d_out = 32, 24
    k, delta_lin, p = _retain_and_delta(d_in, d_out)
    delta = delta_lin.T.contiguous()  # Conv1D layout [in, out]
    torch.manual_seed(0)
    layer = Conv1D(d_out, d_in)
    nn.init.normal_(layer.weight, std=0.2)
    with torch.no_grad():
        base_out = layer(k)
        moved = copy.deepcopy(layer)
        moved.weight += project_update(delta, p, conv1d=True)
        raw = copy.deepcopy(layer)
        raw.weight += delta
        scale = float(base_out.abs().max())
        assert float((moved(k) - base_out).abs().max()) < 1e-4 * scale
        assert float((raw(k) - base_out).abs().max()) > 0.1 * scale


def test_projection_layout_matters_for_square_conv1d():
    """With a square weight both products exist; only P ΔW is right for Conv1D ([in, out])."""
    from transformers.pytorch_utils import Conv1D

    k, delta, p = _retain_and_delta(32, 32, seed=5)
    layer = Conv1D(32, 32)
    nn.init.normal_(layer.weight, std=0.2)
    with torch.no_grad():
        base_out = layer(k)
        right, wrong = copy.deepcopy(layer), copy.deepcopy(layer)
        right.weight += project_update(delta, p, conv1d=True)
        wrong.weight += project_update(delta, p, conv1d=False)
        scale = float(base_out.abs().max())
        assert float((right(k) - base_out).abs().max()) < 1e-4 * scale
        assert float((wrong(k) - base_out).abs().max()) > 0.1 * scale


def test_modules_reading_one_input_share_it_and_its_projector(toy_llama_gqa):
    """Llama's q/k/v read one normalised residual: one captured input, hence one eigh."""
    facts = [Fact("w1 w2", "w3", ()), Fact("w4 w5 w6 w7", "w8", ()), Fact("w9", "w10", ())]
    batch = FactBatch.from_facts(toy_llama_gqa.tokenizer, facts)
    attn = "model.layers.0.self_attn"
    names = [f"{attn}.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    inputs = linear_inputs(toy_llama_gqa.hf, names, batch)
    assert inputs[names[0]] is inputs[names[1]] is inputs[names[2]]
    assert inputs[names[3]] is not inputs[names[0]]
    # the real (unpadded) tokens only, and the same rows as capturing k_proj on its own
    n_real = int((batch.last + 1).sum())
    alone = linear_inputs(toy_llama_gqa.hf, [names[1]], batch)[names[1]]
    assert alone.shape[0] == n_real and torch.equal(alone, inputs[names[0]])


def test_capturing_inputs_stops_the_forward_after_the_last_owner(toy_llama_gqa):
    """The blocks after the last module whose input is wanted, and the logits, are not run."""
    batch = FactBatch.from_facts(toy_llama_gqa.tokenizer, [Fact("w1 w2", "w3", ())])
    ran: list[str] = []
    hooks = [toy_llama_gqa.hf.get_submodule(m).register_forward_hook(lambda *_, m=m: ran.append(m))
             for m in ("model.layers.0.mlp", "model.layers.1.self_attn", "lm_head")]
    try:
        inputs = linear_inputs(toy_llama_gqa.hf, ["model.layers.0.mlp.down_proj.weight"], batch)
    finally:
        for h in hooks:
            h.remove()
    assert inputs["model.layers.0.mlp.down_proj.weight"].shape[1] == toy_llama_gqa.hf.config.intermediate_size
    assert ran == []  # stopped inside layer 0's MLP, before it returned


def test_retain_output_change_streams_inputs_and_equals_the_all_inputs_formula(toy_llama_gqa):
    """The diagnostic takes each module's terms as the forward reaches it; the number is the one
    computed from every module's retain inputs held at once (the code before), bit for bit."""
    facts = [Fact("w1 w2", "w3", ()), Fact("w4 w5 w6 w7", "w8", ()), Fact("w9", "w10", ())]
    batch = FactBatch.from_facts(toy_llama_gqa.tokenizer, facts)
    params = dict(toy_llama_gqa.hf.named_parameters())
    names = ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    gen = torch.Generator().manual_seed(0)
    update = Update({n: torch.randn(params[n].shape, generator=gen) * 1e-3 for n in names}, {})
    inputs = linear_inputs(toy_llama_gqa.hf, names, batch)
    num = den = 0.0
    for n, d in update.deltas.items():
        k = inputs[n].float()
        num += float((k @ d.T).norm())
        den += float(d.norm() * k.norm())
    got = retain_output_change(toy_llama_gqa.hf, update, {}, batch)
    assert got == num / den and got > 0
    assert retain_output_change(toy_llama_gqa.hf, Update({}, {}), {}, batch) == 0.0


# --- facts-tiny MANSU runs shared by the tests below --------------------------------------------


@pytest.fixture(scope="module")
def split(facts_tiny):
    from workbench.models.builtin_splits import builtin_split

    return builtin_split(facts_tiny)


@pytest.fixture(scope="module")
def every_module(facts_tiny):
    return all_components(facts_tiny.n_layers, facts_tiny.n_heads, include_embed=False)


def _run(model, split, circuit, quant=QuantConfig("nf4"), **cfg):
    return unlearn(model, split, method="mansu", circuit=circuit, quant=quant,
                   method_config=MansuConfig(**{**SMALL, **cfg}))


# --- (d) the floor: every moved code changes ----------------------------------------------------


def _assert_every_move_changes_code(model, update: Update, quant: QuantConfig) -> None:
    assert update.nnz() > 0, "MANSU moved nothing; the property would hold vacuously"
    base = model.state()
    tr = transposed_parameters(model.hf)
    quantizable = set(quantizable_parameters(model.hf, quant))
    for name, delta in update.deltas.items():
        assert name in quantizable, f"{name} is not quantized: its move cannot change a code"
        t = name in tr
        before = quantize_codes(base[name], quant, transposed=t)
        after = quantize_codes(base[name] + delta, quant, transposed=t)
        c0, c1 = before.codes_like_weight(), after.codes_like_weight()
        moved = delta != 0
        unchanged = int((c1[moved] == c0[moved]).sum())
        assert unchanged == 0, f"{name}: {unchanged} of {int(moved.sum())} moved weights kept their code"
        assert torch.equal(c1[~moved], c0[~moved]), f"{name}: a code changed where nothing moved"
        assert torch.equal(before.absmax_exact, after.absmax_exact), f"{name}: a block absmax changed"
        assert torch.equal(before.absmax, after.absmax)
        if quant.double_quant:
            continue  # the dequantization scale is the double-quantized absmax: values differ slightly
        # The floor puts a moved weight on a code value: Q(w+Δ) = w+Δ there.
        after_w = base[name] + delta
        deq = quantize_dequantize(after_w, quant, transposed=t)
        torch.testing.assert_close(deq[moved], after_w[moved], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("qtype", ["nf4", "fp4", "int8"])
def test_every_moved_code_changes_under_bitsandbytes(facts_tiny, split, every_module, qtype):
    quant = QuantConfig(qtype)
    before = facts_tiny.weights_hash()
    result = _run(facts_tiny, split, every_module, quant)
    assert facts_tiny.weights_hash() == before, "MANSU modified the base model"
    assert result.method == "mansu"
    assert result.update.meta["base_fingerprint"] == facts_tiny.fingerprint
    assert result.update.nnz() <= SMALL["params_per_round"] * result.steps
    _assert_every_move_changes_code(facts_tiny, result.update, quant)


def test_floor_property_holds_with_double_quant(facts_tiny, split, every_module):
    quant = QuantConfig("nf4", double_quant=True, blocksize=128)
    result = _run(facts_tiny, split, every_module, quant, max_rounds=2)
    _assert_every_move_changes_code(facts_tiny, result.update, quant)


def _task(model, split, circuit, quant=QuantConfig("nf4")):
    return UnlearningTask(model=model, batches=Batches.build(model, split), quant=quant, circuit=tuple(circuit))


def test_floor_verification_reverts_moves_that_keep_their_code(facts_tiny, split, every_module):
    """Sabotage half of one round's floor moves (put them on the weight's *own* code value, which
    the quantizer maps back to the same code): the bnb verification must undo exactly those."""
    quant = QuantConfig("int8")
    config = MansuConfig(**SMALL)
    task = _task(facts_tiny, split, every_module, quant)
    state = setup_state(facts_tiny, task.batches, task.circuit, quant, config, report=lambda *_: None)
    gradients = round_gradients(state, task.batches, config)
    moves = rank_moves([score_module(state, n, gradients, config) for n in state.names], state.per_round, config)
    sabotaged = set()
    for k, move in enumerate(moves[: state.per_round]):
        if k % 2:
            grid = state.grids[move.name]
            own = float(grid.values[grid.rank[move.index].long()] * grid.absmax[move.index])
            moves[k] = type(move)(move.saliency, move.name, move.index,
                                  own - float(state.base[move.name].view(-1)[move.index]))
            sabotaged.add((move.name, move.index))
    done = take_moves(state, moves, config)
    assert done.chosen == state.per_round and sabotaged
    verify_codes(state, done, quant)
    assert state.floor_reverted == len(sabotaged) and done.chosen == state.per_round - len(sabotaged)
    for name, index in sabotaged:
        assert float(state.deltas[name].view(-1)[index]) == 0.0, "a code-preserving move survived"
        assert not bool(state.masks[name].view(-1)[index]), "a code-preserving move may be tried again"
        assert not bool(state.deltas.moved(name)[index]), "a reverted move still counts as moved"
    for name, idx in done.touched.items():
        kept = [i for i in idx if (name, i) not in sabotaged]
        codes = quantize_codes(state.base[name] + state.deltas[name], quant,
                               transposed=state.transposed[name]).codes_like_weight().reshape(-1).long()
        assert all(int(codes[i]) != int(state.grids[name].code[i]) for i in kept)


# --- (c) diagonal Fisher --------------------------------------------------------------------------


def test_diagonal_fisher_is_the_mean_per_example_squared_gradient(toy_gpt2):
    from workbench.models.scoring import answer_token

    facts = [Fact("w1 w2", "w3", ()), Fact("w4 w5 w6 w7", "w8", ()), Fact("w9 w10 w11", "w12", ()),
             Fact("w20", "w21", ())]
    name = "transformer.h.0.mlp.c_fc.weight"
    hand = copy.deepcopy(toy_gpt2.hf)
    param = dict(hand.named_parameters())[name]
    param.requires_grad_(True)
    grads = []
    for f in facts:
        ids = torch.tensor([toy_gpt2.tokenizer(f.prompt)["input_ids"]])
        logp = torch.log_softmax(hand(ids).logits[0, -1].float(), -1)[answer_token(toy_gpt2.tokenizer, f.answer)]
        (g,) = torch.autograd.grad(logp, [param])
        grads.append(g)
    expected = torch.stack([g**2 for g in grads]).mean(0)
    batch = FactBatch.from_facts(toy_gpt2.tokenizer, facts)
    before = toy_gpt2.weights_hash()
    got = diagonal_fisher(copy.deepcopy(toy_gpt2.hf), [name], batch, samples=len(facts))[name]
    assert toy_gpt2.weights_hash() == before
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-12)
    # per-example squares, not the square of the mean gradient
    assert not torch.allclose(got, torch.stack(grads).mean(0) ** 2, rtol=1e-2)
    # ``samples`` caps the examples used (the first ones)
    two = diagonal_fisher(copy.deepcopy(toy_gpt2.hf), [name], batch, samples=2)[name]
    torch.testing.assert_close(two, (grads[0] ** 2 + grads[1] ** 2) / 2, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("fixture", ["toy_gpt2", "toy_llama_gqa", "facts_tiny"])
def test_batched_fisher_equals_one_backward_per_example(fixture, request):
    """The fast path (per-example gradients of Linear/Conv1D weights from one batched
    backward) against the reference loop, on GPT-2 Conv1D, Llama Linear with GQA and a
    trained model; the tied embedding takes the loop inside the fast function too."""
    model = request.getfixturevalue(fixture)
    facts = [Fact("w1 w2", "w3", ()), Fact("w4 w5 w6 w7", "w8", ()), Fact("w9 w10 w11", "w12", ()),
             Fact("w20", "w21", ()), Fact("w13 w14", "w15", ())]
    if fixture == "facts_tiny":
        from workbench.models.builtin_splits import builtin_split

        facts = list(builtin_split(model).retain)[:20]
    batch = FactBatch.from_facts(model.tokenizer, facts)
    quantizable = quantizable_parameters(model.hf, QuantConfig("nf4"))
    embedding = next(n for n, _ in model.hf.named_parameters() if "wte" in n or "embed_tokens" in n)
    names = sorted({*quantizable, embedding})
    before = model.weights_hash()
    work = copy.deepcopy(model.hf)
    # every quantized weight takes the batched path; the (tied) embedding does not
    assert set(single_use_linear_owners(work, names)) == set(quantizable) - {embedding}
    fast = diagonal_fisher(work, names, batch, samples=len(facts) - 1)  # ``samples`` caps: the first ones
    reference = diagonal_fisher_per_example(copy.deepcopy(model.hf), names, batch, samples=len(facts) - 1)
    assert model.weights_hash() == before
    assert not any(p.requires_grad for p in work.parameters())
    assert list(fast) == names
    for n in names:
        assert fast[n].abs().sum() > 0, n
        torch.testing.assert_close(fast[n], reference[n], rtol=1e-3, atol=1e-10, msg=n)


def test_fisher_bound_is_half_sum_f_delta_squared():
    fisher = {"a": torch.tensor([1.0, 2.0, 4.0]), "b": torch.tensor([[3.0]])}
    update = Update({"a": torch.tensor([3.0, 0.0, -0.5]), "c": torch.tensor([100.0])})
    assert fisher_bound(fisher, update) == pytest.approx(0.5 * (1 * 9 + 4 * 0.25))


def test_fisher_budget_holds(facts_tiny, split, every_module):
    free = _run(facts_tiny, split, every_module, fisher_budget=None, max_rounds=2)
    unbounded = free.diagnostics["fisher_bound"]
    assert unbounded > 0
    # Without a cap the running bound is still reported per round (live plots) ...
    assert free.history and free.history[-1]["fisher_bound"] > 0
    if free.diagnostics["floor_reverted"] == 0 and not free.diagnostics.get("rounds_undone_by_retain_guard"):
        # ... and, when nothing was undone, it is the final update's bound.
        assert free.history[-1]["fisher_bound"] == pytest.approx(unbounded, rel=1e-4)
    budget = unbounded / 4
    result = _run(facts_tiny, split, every_module, fisher_budget=budget, max_rounds=4)
    assert result.update.nnz() > 0
    bound = result.diagnostics["fisher_bound"]
    assert 0 < bound <= budget * (1 + 1e-5)
    assert result.diagnostics["fisher_budget"] == budget
    assert all(h["fisher_bound"] <= budget * (1 + 1e-5) for h in result.history)
    # An independent Fisher estimate over the same retain examples gives the same bound.
    batches = Batches.build(facts_tiny, split)
    names = sorted(result.update.deltas)
    fisher = diagonal_fisher(copy.deepcopy(facts_tiny.hf), names, batches.retain, SMALL["fisher_samples"])
    assert fisher_bound(fisher, result.update) == pytest.approx(bound, rel=1e-3)
    assert fisher_bound(fisher, result.update) <= budget * (1 + 1e-3)
    # The budget binds: the run ends because no further move fits, not by its round budget.
    assert result.stopped == "fisher budget"


# --- the retain guard ------------------------------------------------------------------------------


def _alternating_guard_run(model, split, components, **cfg):
    """Rounds driven one by one, the guard made to fail on odd rounds and pass on even ones (its
    baseline set above any reachable top-1, then back), forgetting never reaching its target."""
    config = MansuConfig(**{**SMALL, "params_per_round": 8, "max_rounds": 40, "guard_patience": 3,
                            "forget_target": 0.0, **cfg})
    task = _task(model, split, components)
    state = setup_state(model, task.batches, task.circuit, task.quant, config, report=lambda *_: None)
    real_base = state.guard_base
    for rounds in range(1, config.max_rounds + 1):
        state.guard_base = 2.0 if rounds % 2 else real_base
        stop, record = run_round(state, task, config, rounds)
        assert (record is None) == (rounds % 2 == 1), "an undone round must leave no record"
        if stop is not None:
            return state, stop, rounds
    return state, "budget", config.max_rounds


def test_retain_guard_stops_when_passing_and_undone_rounds_alternate(facts_tiny, split, every_module):
    """The failure seen on SmolLM2: every other round is undone by the guard, the rounds in
    between barely forget. The guard's patience counts undone rounds over the whole run, so
    the run ends after ``guard_patience`` of them instead of running its round budget."""
    state, stop, rounds = _alternating_guard_run(facts_tiny, split, every_module)
    assert stop == "retain guard"
    # undone rounds are 1, 3, 5: the third ends the run at round 5, long before the budget of 40
    assert rounds == 5
    assert state.guard_undone == 3 and state.blocked == 3
    assert len(state.history) == 2  # only the passing rounds are recorded
    # rounds 2 and 4 follow an undone round: same weights, so the gradients are reused ...
    assert state.reused_gradients == 2
    assert all(v >= 0 for v in state.timings.values())
    # ... and reusing them changes nothing: recomputing every round gives the same edit
    reference, _, _ = _alternating_guard_run(facts_tiny, split, every_module, reuse_gradients=False)
    assert reference.reused_gradients == 0
    for name, delta in state.deltas.items():
        assert torch.equal(delta, reference.deltas[name]), name


@pytest.mark.parametrize("steps", [{}, {"use_floor": False}, {"floor_mode": "snap"}])
def test_an_undone_round_leaves_the_state_as_it_found_it(facts_tiny, split, every_module, steps):
    """After a round the guard undoes, the deltas, the moved flags (the undone weights may move
    again) and both working models are what they were before the round, and the Fisher bound
    is back (to its float rounding). Sub-bin steps (no floor, snap) move a weight again, so an
    undone round must restore nonzero deltas too."""
    config = MansuConfig(**{**SMALL, "params_per_round": 8, "max_rounds": 4, "forget_target": 0.0, **steps})
    task = _task(facts_tiny, split, every_module)
    state = setup_state(facts_tiny, task.batches, task.circuit, task.quant, config, report=lambda *_: None)
    for rounds in (1, 2):  # kept rounds first: moved weights (and, with sub-bin steps, deltas) to restore
        assert run_round(state, task, config, rounds)[1] is not None

    def snapshot():
        return ({n: (state.deltas[n], state.deltas.moved(n)) for n in state.names}, state.bound,
                {n: p.detach().clone() for n, p in state.work.named_parameters()},
                {n: p.detach().clone() for n, p in state.qwork.named_parameters()})

    before = snapshot()
    moved_before = state.n_moved()
    state.guard_base = 2.0  # above any reachable top-1: the guard undoes the round
    stop, record = run_round(state, task, config, 3)
    assert record is None and stop is None and state.guard_undone == 1
    after = snapshot()
    # the bound is restored by subtracting the round's cost: exact up to the float rounding of the two
    assert state.n_moved() == moved_before and after[1] == pytest.approx(before[1], rel=1e-12, abs=0)
    for n in state.names:
        assert torch.equal(after[0][n][0], before[0][n][0]) and torch.equal(after[0][n][1], before[0][n][1]), n
    for held_after, held_before in ((after[2], before[2]), (after[3], before[3])):
        assert all(torch.equal(held_after[n], held_before[n]) for n in held_before)


def test_the_guard_reading_is_its_samples_accuracy_now(facts_tiny, split, every_module):
    """The retain the live progress shows is the guard's sample's accuracy at the round's models."""
    from workbench.quant import quantized_copy
    from workbench.unlearning.mansu.rounds import guard_reading

    config = MansuConfig(**SMALL, guard_precision="both", retain_guard=0.5)
    task = _task(facts_tiny, split, every_module)
    state = setup_state(facts_tiny, task.batches, task.circuit, task.quant, config, report=lambda *_: None)
    # A sample the model gets partly wrong (every other retain fact given its neighbour's answer),
    # so a reading that is not this sample's accuracy now (e.g. the base's) shows.
    retain = list(split.retain)
    swapped = tuple(dataclasses.replace(f, answer=retain[(i + 1) % len(retain)].answer, choices=()) if i % 2 else f
                    for i, f in enumerate(retain))
    state.guard_batch = Batches.build(facts_tiny, dataclasses.replace(split, retain=swapped)).retain_set
    # and a quantized model that answers otherwise than the full-precision one (a noisy deep copy of
    # Q(w): the copy shares the base's unquantized tensors, which must not be touched)
    before = facts_tiny.weights_hash()
    noisy = copy.deepcopy(quantized_copy(facts_tiny.hf, task.quant, progress=lambda *_: None))
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.5 * p.std())
    state.q_answers = noisy
    fp, q = state.guard_batch.accuracy(facts_tiny.hf), state.guard_batch.accuracy(noisy)
    assert 0 < fp < 1 and q != fp
    reading = guard_reading(state, config)
    assert (reading.retain, reading.retain_q) == (fp, q)
    assert reading.drop == max(state.guard_base - fp, state.guard_base_q - q)
    assert reading.record() == {"retain_top1": fp, "retain_top1_q": q}
    only_fp = guard_reading(state, MansuConfig(**SMALL, retain_guard=0.5))
    assert (only_fp.retain, only_fp.retain_q, only_fp.record()) == (fp, None, {"retain_top1": fp})
    assert guard_reading(state, MansuConfig(**SMALL, retain_guard=None)).record() == {}
    # a multiple-choice sample names its entries so
    assert dataclasses.replace(reading, criterion="mc").record() == {"retain_mc": fp, "retain_mc_q": q}
    assert facts_tiny.weights_hash() == before


@pytest.mark.parametrize("precision", ["full_precision", "both"])
def test_each_kept_round_shows_the_retain_its_guard_measured(facts_tiny, split, every_module, monkeypatch,
                                                             precision):
    """Round, forget fp/quantized and retain in the round's record and its progress line: the
    guard's own reading of that round (no extra forward)."""
    from workbench.unlearning.mansu import method
    from workbench.unlearning.mansu.rounds import GuardReading, guard_reading

    readings: list[GuardReading] = []

    def recorded(state, config):
        readings.append(guard_reading(state, config))
        return readings[-1]

    monkeypatch.setattr(method, "guard_reading", recorded)
    seen: list[str] = []
    task = dataclasses.replace(_task(facts_tiny, split, every_module), progress=lambda _f, m: seen.append(m))
    result = method.mansu(task, MansuConfig(**{**SMALL, "max_rounds": 2}, guard_precision=precision,
                                            retain_guard=0.5))
    assert len(result.history) == len(readings) == 2  # no round undone at this guard
    for record, reading in zip(result.history, readings):
        assert {k: v for k, v in record.items() if k.startswith("retain")} == reading.record()
        assert ("retain_top1_q" in record) == (precision == "both")
        line = next(m for m in seen if m.startswith(f"MANSU round {int(record['step'])}: moved"))
        assert f"retain top-1 {record['retain_top1']:.3f}" in line and "guard's sample" in line
    off = method.mansu(_task(facts_tiny, split, every_module), MansuConfig(**{**SMALL, "max_rounds": 1},
                                                                           retain_guard=None))
    assert off.history and not any(k.startswith("retain") for k in off.history[0])


def test_a_round_the_guard_undoes_is_shown(facts_tiny, split, every_module, monkeypatch):
    from workbench.unlearning.mansu import method
    from workbench.unlearning.mansu.rounds import GuardReading, guard_reading

    calls: list[int] = []

    def first_fails(state, config):
        calls.append(1)
        return GuardReading(1.0, 0.0) if len(calls) == 1 else guard_reading(state, config)

    monkeypatch.setattr(method, "guard_reading", first_fails)
    seen: list[str] = []
    task = dataclasses.replace(_task(facts_tiny, split, every_module), progress=lambda _f, m: seen.append(m))
    method.mansu(task, MansuConfig(**{**SMALL, "max_rounds": 2}, retain_guard=0.5))
    assert (f"MANSU round 1: undone by the retain guard; the next round makes at most "
            f"{SMALL['params_per_round'] // 2} moves") in seen
    assert any(m.startswith("MANSU round 2: moved") for m in seen)


def test_a_run_reports_every_phase(facts_tiny, split, every_module):
    result = _run(facts_tiny, split, every_module, max_rounds=2)
    phases = result.diagnostics["seconds_by_phase"]
    assert set(phases) == {"setup", "gradients", "selection", "quantizer", "evaluation"}
    assert phases == result.seconds_by_phase
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= result.seconds * 1.01


# --- (a) circuit restriction -----------------------------------------------------------------------


def _assert_inside(update: Update, masks: dict[str, torch.Tensor]) -> None:
    assert update.nnz() > 0
    for name, delta in update.deltas.items():
        assert name in masks, f"{name} moved but belongs to no circuit component"
        outside = int(((delta != 0) & ~masks[name]).sum())
        assert outside == 0, f"{name}: {outside} moved entries outside the circuit"


def _outside(update: Update, masks: dict[str, torch.Tensor]) -> int:
    return sum(int(((d != 0) & ~masks.get(n, torch.zeros_like(d, dtype=torch.bool))).sum())
               for n, d in update.deltas.items())


def test_nothing_outside_the_circuit_moves_gpt2(facts_tiny, split):
    components = [head(1, 2), mlp(0)]
    masks = circuit_parameters(facts_tiny, components)
    result = _run(facts_tiny, split, components)
    _assert_inside(result.update, masks)
    free = _run(facts_tiny, split, components, use_circuit=False, max_rounds=2)
    assert _outside(free.update, masks) > 0, "without the circuit restriction MANSU never left the circuit"


@pytest.fixture(scope="module")
def llama_split(toy_llama_gqa):
    """Hand-made facts whose answers are the toy model's own top-1 (forget accuracy starts at 1)."""
    from workbench.models.scoring import encode_prompts, last_token_logits

    m = toy_llama_gqa
    prompts = [f"w{i} w{i + 1} w{(3 * i) % 97}" for i in range(60)]
    ids, last, _ = encode_prompts(m.tokenizer, prompts)
    with torch.no_grad():
        top = last_token_logits(m.hf, ids, last).argmax(-1)
    facts = []
    for prompt, t in zip(prompts, top.tolist()):
        answer = m.tokenizer.convert_ids_to_tokens(int(t))
        if answer.startswith("w"):  # skip special tokens
            facts.append(Fact(prompt, answer, ()))
    assert len(facts) >= 30
    return FactSplit("toy-llama", forget=tuple(facts[:10]), retain=tuple(facts[10:]))


def test_nothing_outside_the_circuit_moves_llama_gqa(toy_llama_gqa, llama_split):
    from workbench.measurement.evaluation import evaluate_facts

    assert evaluate_facts(toy_llama_gqa, llama_split.forget, multiple_choice=False).top1 == 1.0
    components = [head(0, 1), mlp(1)]
    masks = circuit_parameters(toy_llama_gqa, components)
    assert any("k_proj" in n for n in masks) and any("o_proj" in n for n in masks)
    before = toy_llama_gqa.weights_hash()
    result = _run(toy_llama_gqa, llama_split, components)
    assert toy_llama_gqa.weights_hash() == before
    _assert_inside(result.update, masks)
    _assert_every_move_changes_code(toy_llama_gqa, result.update, QuantConfig("nf4"))
    free = _run(toy_llama_gqa, llama_split, components, use_circuit=False, max_rounds=2)
    assert _outside(free.update, masks) > 0


def test_circuit_restriction_needs_a_circuit_with_weights(facts_tiny, split):
    with pytest.raises(WorkbenchError, match="non-empty circuit"):
        _run(facts_tiny, split, None)
    with pytest.raises(WorkbenchError, match="no quantized weight"):
        _run(facts_tiny, split, [EMBED])


def test_mansu_config_is_validated():
    for bad in (dict(params_per_round=0), dict(forget_target=1.5), dict(null_threshold=0.0),
                dict(fisher_budget=0.0), dict(code_steps=0), dict(fisher_samples=0), dict(guard_patience=0)):
        with pytest.raises(WorkbenchError):
            MansuConfig(**bad)
    assert MansuConfig(use_floor=False, use_circuit=False).label == "mansu-no_circuit-no_floor"


# --- the readings compared in docs/results/mansu_study.md --------------------------------------------


def test_snap_puts_every_kept_move_on_a_code_and_drops_the_rest(facts_tiny, split, every_module):
    """floor_mode="snap": sub-bin rounds, then one snap; every surviving move changes its code
    (Q(w+Δ) = w+Δ there) and the moves below ``snap_fraction`` of a bin are gone."""
    result = _run(facts_tiny, split, every_module, use_fisher=False, floor_mode="snap", snap_fraction=0.2,
                  max_rounds=6, retain_guard=None)
    d = result.diagnostics
    assert d["snapped"] > 0 and d["snap_dropped"] > 0
    assert result.update.nnz() == d["snapped"] - d["floor_reverted"]
    _assert_every_move_changes_code(facts_tiny, result.update, QuantConfig("nf4"))
    assert result.history[-1]["moved"] == result.update.nnz()  # the record after the snap


def test_best_step_picks_the_largest_gain_per_cost_for_each_weight():
    from workbench.unlearning.mansu.candidates import ModuleScores, _best_per_weight

    one = ModuleScores("w", gain=torch.tensor([1.0, 4.0, 0.0]), cost=torch.tensor([1.0, 1.0, 1.0]),
                       step=torch.tensor([0.1, 0.1, 0.1]))
    two = ModuleScores("w", gain=torch.tensor([3.0, 4.0, 2.0]), cost=torch.tensor([1.0, 4.0, 1.0]),
                       step=torch.tensor([0.2, 0.2, 0.2]))
    best = _best_per_weight([one, two], MansuConfig(code_choice="best"))
    assert best.step.tolist() == pytest.approx([0.2, 0.1, 0.2])
    assert best.gain.tolist() == [3.0, 4.0, 2.0] and best.cost.tolist() == [1.0, 1.0, 1.0]


def test_best_step_moves_stay_within_max_code_steps(facts_tiny, split, every_module):
    result = _run(facts_tiny, split, every_module, code_choice="best", max_code_steps=3, max_rounds=2)
    _assert_every_move_changes_code(facts_tiny, result.update, QuantConfig("nf4"))
    base, quant = facts_tiny.state(), QuantConfig("nf4")
    tr = transposed_parameters(facts_tiny.hf)
    steps = set()
    for name, delta in result.update.deltas.items():
        before = quantize_codes(base[name], quant, transposed=name in tr).codes_like_weight().long()
        after = quantize_codes(base[name] + delta, quant, transposed=name in tr).codes_like_weight().long()
        moved = delta != 0
        steps |= set((after[moved] - before[moved]).abs().tolist())  # NF4 codes are in value order
    # With the quadratic Fisher cost, gain per cost falls with the move's size, so one code
    # usually wins; the choice itself is tested above on hand-made scores.
    assert steps and steps <= {1, 2, 3}, steps


def test_guard_in_both_precisions_sees_a_quantized_drop(facts_tiny, split, every_module):
    from workbench.unlearning.mansu.rounds import guard_reading

    config = MansuConfig(**SMALL, guard_precision="both")
    task = _task(facts_tiny, split, every_module)
    state = setup_state(facts_tiny, task.batches, task.circuit, task.quant, config, report=lambda *_: None)
    assert state.guard_base_q is not None and guard_reading(state, config).drop == 0.0
    state.guard_base_q += 0.5  # as if the quantized model had lost half its retain facts
    assert guard_reading(state, config).drop == pytest.approx(0.5)
    assert guard_reading(state, MansuConfig(**SMALL)).drop == 0.0  # the full-precision guard does not see it


@pytest.mark.parametrize("where", ["full_precision", "quantized"])
def test_forget_direction_at_one_model_only(facts_tiny, split, every_module, where):
    from workbench.unlearning.mansu.candidates import forget_direction

    config = MansuConfig(**SMALL, forget_direction=where)
    task = _task(facts_tiny, split, every_module)
    state = setup_state(facts_tiny, task.batches, task.circuit, task.quant, config, report=lambda *_: None)
    assert (state.q_still is None) == (where == "full_precision")
    got = round_gradients(state, task.batches, config).forget
    model, still = (state.work, state.still) if where == "full_precision" else (state.qwork, state.q_still)
    expected = forget_direction(model, state.names, task.batches.forget, still)
    average = round_gradients(state, task.batches, MansuConfig(**SMALL)) if state.q_still is not None else None
    for n in state.names:
        assert torch.equal(got[n], expected[n])
        if average is not None:
            assert not torch.equal(got[n], average.forget[n])


def test_variant_names_show_in_the_method_label():
    from workbench.unlearning.mansu.config import MANSU_VARIANTS

    assert MANSU_VARIANTS["v1"] == MansuConfig() and MANSU_VARIANTS["v1"].label == "mansu"
    assert MANSU_VARIANTS["snap"].label == "mansu-snap"
    assert MansuConfig(name="snap", use_floor=False).label == "mansu-snap-no_floor"
    assert MansuConfig(use_floor=False, state_precision="storage").label == "mansu-no_floor-state_storage"
    for bad in (dict(forget_direction="sideways"), dict(snap_fraction=0.0), dict(max_code_steps=0),
                dict(state_precision="float16")):
        with pytest.raises(WorkbenchError):
            MansuConfig(**bad)


def test_why_a_run_stopped_is_told_apart(facts_tiny, split, every_module):
    """A run whose moves do not fit the budget says "fisher budget"; one with nothing left to move
    says "no candidates"; a code step past the table is refused before any work."""
    tight = _run(facts_tiny, split, every_module, fisher_budget=1e-12, max_rounds=3)
    assert tight.stopped == "fisher budget" and tight.update.nnz() < 16  # a near-zero-cost move or two fit
    # every candidate used up (or blocked): the round has nothing to move
    config = MansuConfig(**SMALL)
    task = _task(facts_tiny, split, every_module)
    state = setup_state(facts_tiny, task.batches, task.circuit, task.quant, config, report=lambda *_: None)
    for name in state.masks.names():  # written (allocated) first: a whole tensor holds no mask until then
        state.masks.write(name).zero_()
    assert run_round(state, task, config, 1) == ("no candidates", None)
    with pytest.raises(WorkbenchError, match="moves past every code"):
        _run(facts_tiny, split, every_module, code_steps=16)


@pytest.mark.parametrize("qtype", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("transposed", [False, True])
def test_grid_and_floor_targets_are_bin_geometrys_values_in_fewer_bytes(qtype, transposed):
    """MANSU's grid comes from :func:`bin_placement` (no distances, int16 ranks) and its floor
    rule counts ranks in int16: the same values as :func:`bin_geometry` and the int64 formula."""
    from workbench.quant import bin_geometry
    from workbench.unlearning.mansu.grid import floor_targets, weight_grid

    gen = torch.Generator().manual_seed(5)
    cfg = QuantConfig(qtype)
    for dtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(48, 40, generator=gen) * 0.05).to(dtype)
        w[3, :8] = 0.0  # an all-zero run: zero absmax where the block is all zero
        grid, geo = weight_grid(w, cfg, transposed=transposed), bin_geometry(w, cfg, transposed=transposed)
        assert torch.equal(grid.code, geo.code.reshape(-1).to(torch.int16))
        assert grid.rank.dtype == torch.int16 and torch.equal(grid.rank, geo.rank.reshape(-1).to(torch.int16))
        for mine, theirs in ((grid.absmax, geo.absmax), (grid.bin_width, geo.bin_width),
                             (grid.is_block_max, geo.is_block_max)):
            assert torch.equal(mine, theirs.reshape(-1))
        direction = torch.randn(w.numel(), generator=gen)
        direction[::7] = 0.0
        for steps in (1, 2, 3):
            sign = torch.sign(direction).long()  # the int64 formula floor_targets used before
            rank = grid.rank.long() + steps * sign
            n = grid.values.numel()
            valid = (sign != 0) & (rank >= 0) & (rank < n) & ~grid.is_block_max
            target, ok = floor_targets(direction, grid, steps)
            assert torch.equal(ok, valid) and bool(valid.any()) and bool((~valid).any())
            assert torch.equal(target, grid.values[rank.clamp(0, n - 1)] * grid.absmax)


def test_live_costs_are_the_concatenation_of_each_tensors_and_give_the_same_mean():
    """The damping's pooled costs, written into one buffer as each tensor is scored, are the
    tensor ``torch.cat`` made (same order, same values) and their mean is the same to the bit."""
    from workbench.unlearning.mansu.candidates import ModuleScores, live_costs

    g = torch.Generator().manual_seed(5)
    scores = []
    for k, n in enumerate([1000, 0, 70_001, 3, 250_000]):
        gain = torch.randn(n, generator=g).clamp_min(0)
        cost = torch.rand(n, generator=g) * 10.0 ** (k - 2)
        scores.append(ModuleScores(f"t{k}", gain, cost, torch.zeros(n)))
    pieces = torch.cat([s.cost[s.gain > 0] for s in scores])
    pooled = live_costs(iter(scores), sum(s.cost.numel() for s in scores))
    assert 0 < pooled.numel() < sum(s.cost.numel() for s in scores)
    assert torch.equal(pooled, pieces)
    assert float(pooled.mean()) == float(pieces.mean())
    assert live_costs(iter([]), 0).numel() == 0


def test_the_streamed_mean_cost_is_the_pooled_mean_without_the_buffer():
    """``state_precision="storage"``'s damping: the mean of the same costs, summed per tensor in
    float64 (so within float32's rounding of the pooled mean, not bit for bit); 0 with no gain."""
    from workbench.unlearning.mansu.candidates import ModuleScores, live_costs, streamed_mean_cost

    g = torch.Generator().manual_seed(6)
    scores = []
    for k, n in enumerate([1000, 0, 70_001, 3, 250_000]):
        gain = torch.randn(n, generator=g).clamp_min(0)
        scores.append(ModuleScores(f"t{k}", gain, torch.rand(n, generator=g) * 10.0 ** (k - 2), torch.zeros(n)))
    pooled = live_costs(iter(scores), sum(s.cost.numel() for s in scores))
    exact = float(pooled.double().sum()) / pooled.numel()
    assert streamed_mean_cost(iter(scores)) == pytest.approx(exact, rel=1e-12)
    assert streamed_mean_cost(iter(scores)) == pytest.approx(float(pooled.mean()), rel=1e-6)
    # a tensor's costs count only where its move gains: doubling the others' costs changes nothing
    masked = [ModuleScores(s.name, s.gain, torch.where(s.gain > 0, s.cost, 2 * s.cost + 1), s.step) for s in scores]
    assert streamed_mean_cost(iter(masked)) == streamed_mean_cost(iter(scores))
    none = [ModuleScores("z", torch.zeros(4), torch.ones(4), torch.zeros(4))]
    assert streamed_mean_cost(iter(none)) == 0.0 and streamed_mean_cost(iter([])) == 0.0


# --- scoring's memory: the same scores as the plain expressions ---------------------------------


def _plain_score_module(state, name, gradients, config):
    """:func:`score_module` as it was written before its temporaries were cut (the scale bench's
    peak): every mask multiplied, the dense delta, the grid and the projected direction held to
    the end, out-of-place arithmetic. The reference the rewritten one must equal bit for bit."""
    from workbench.unlearning.mansu.candidates import ModuleScores, _best_per_weight
    from workbench.unlearning.mansu.grid import floor_targets

    mask = state.masks[name]
    raw = gradients.forget[name].float() * mask
    d = project_update(raw, _plain_matrix(state.projectors[name]), conv1d=state.conv1d[name]) * mask \
        if config.use_projection else raw
    flat = d.reshape(-1)
    grid, delta = state.grids[name], state.deltas[name].reshape(-1)
    base = state.base[name].reshape(-1)
    if config.steps_on_grid:
        ks = [config.code_steps] if config.code_choice == "fixed" else range(1, config.max_code_steps + 1)
        moved = state.deltas.moved(name)
        options = []
        for k in ks:
            target, valid = floor_targets(flat, grid, k)
            options.append((target - base, valid & ~moved))
    else:
        valid = (flat != 0) & ~grid.is_block_max
        rel = flat.abs() / flat.abs().max().clamp_min(1e-30)
        step = torch.sign(flat) * config.no_floor_step * grid.bin_width * rel
        options = [((base + delta + step) - base, valid)]
    scored = []
    for step, valid in options:
        valid = valid & mask.reshape(-1)
        if config.use_fisher:
            move = step - delta
            gain = (raw.reshape(-1) * move).clamp_min(0)
            cost = 0.5 * state.fisher[name].reshape(-1).float() * move**2
            if gradients.retain is not None:
                cost = cost + (-(gradients.retain[name].reshape(-1) * move)).clamp_min(0)
        else:
            gain, cost = flat.abs(), torch.zeros_like(flat)
        scored.append(ModuleScores(name, torch.where(valid, gain, torch.zeros_like(gain)), cost, step))
    return scored[0] if len(scored) == 1 else _best_per_weight(scored, config)


def _plain_matrix(held):
    """:meth:`HeldProjector.matrix` as it was: zeros, scatter, ``torch.where`` with the transpose."""
    from workbench.unlearning.mansu.projection import _upper

    if not held.packed:
        return held.stored.float()
    upper = _upper(held.size, held.stored.device)
    full = torch.zeros(held.size, held.size, dtype=held.stored.dtype)
    full.masked_scatter_(upper, held.stored)
    return torch.where(upper, full, full.T).float()


SCORING_VARIANTS = {
    "default": {},
    "best code": {"code_choice": "best", "max_code_steps": 3},
    "no fisher": {"use_fisher": False},
    "no retain term": {"retain_first_order": False},
    "sub-bin steps": {"use_floor": False},
    "no projection": {"use_projection": False},
}


@pytest.mark.parametrize("model_kind", ["facts-tiny", "bf16 llama", "bf16 llama, storage state, large"])
def test_scoring_equals_the_plain_expressions_bit_for_bit(model_kind, facts_tiny, split, toy_llama_gqa, llama_split,
                                                           monkeypatch):
    """Each candidate tensor's gain, cost and step, after two rounds (deltas set, weights marked
    moved, a circuit that takes some tensors in part), equal :func:`_plain_score_module`'s to
    the bit in every scoring variant; the projectors too (:meth:`HeldProjector.matrix`). The
    facts-tiny tensors are scored in one chunk each, the bf16 Llama's in chunks of 97 weights."""
    if model_kind == "facts-tiny":
        model, data = facts_tiny, split
        circuit = [head(0, 0), head(0, 1), head(1, 2), mlp(1)]  # heads: partial q/k/v/o masks
        state_cfg = {}
    else:
        model = bf16_copy(toy_llama_gqa)
        data = llama_split
        circuit = [head(0, 1), head(1, 0), mlp(0)]
        state_cfg = {"state_precision": "storage"} if "storage" in model_kind else {}
        import workbench.unlearning.mansu.candidates as candidates

        monkeypatch.setattr(candidates, "SCORE_CHUNK", 97)  # many chunks, moved weights in several
        if "large" in model_kind:  # grids rebuilt per use, Q(w+Δ) as codes, two scoring passes
            large_circuit_paths(monkeypatch)
    from workbench.unlearning.mansu import projection

    monkeypatch.setattr(projection, "MIRROR_ROWS", 5)  # several blocks, the last one short, at these widths
    config = MansuConfig(**{**SMALL, "params_per_round": 64, **state_cfg})
    task = _task(model, data, circuit)
    state = setup_state(model, task.batches, task.circuit, task.quant, config, report=lambda *_: None)
    for rounds in (1, 2):
        run_round(state, task, config, rounds)
    assert state.n_moved() > 0 and any(m is not None for m in map(state.masks.held, state.names))
    assert any(state.masks.held(n) is None for n in state.names)
    gradients = round_gradients(state, task.batches, config)
    for n, held in state.projectors.items():
        assert torch.equal(held.matrix(), _plain_matrix(held)), n
    for variant, changes in SCORING_VARIANTS.items():
        variant_config = dataclasses.replace(config, **changes)
        gains = 0
        for n in state.names:
            mine, plain = score_module(state, n, gradients, variant_config), _plain_score_module(
                state, n, gradients, variant_config)
            for field in ("gain", "cost", "step"):
                a, b = getattr(mine, field), getattr(plain, field)
                assert a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32)), (variant, n, field)
            gains += int((mine.gain > 0).sum())
        assert gains > 0, variant  # something to score: the comparison is not of zeros only
