"""The baselines with their own module (RMU, SURE, QUAIL, LoRA): losses against their formulas on
hand examples, QUAIL's margin against an independent half-step computation, LoRA merge against
running the adapters, SURE's row selection, RMU's layer restriction — and every method of
``METHODS`` run end to end on facts-tiny into a saved run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from workbench.core.errors import WorkbenchError
from workbench.experiments.flow import run_unlearning
from workbench.models.scoring import answer_logits
from workbench.quant import QuantConfig, quantizable_parameters, transposed_parameters
from workbench.unlearning import losses
from workbench.unlearning.batches import Batches
from workbench.unlearning.methods.lora import LoraConfig
from workbench.unlearning.methods.quail import QuailConfig
from workbench.unlearning.methods.rmu import RmuConfig
from workbench.unlearning.methods.sure import SureConfig
from workbench.unlearning.registry import BASELINES, METHODS, unlearn
from workbench.unlearning.task import OptimConfig, StopRule, UnlearningTask

pytestmark = pytest.mark.usefixtures("one_thread")


def _task(model, batches, *, lr, max_steps):
    """A task for calling one method's run function directly (no stopping by forgetting)."""
    return UnlearningTask(model=model, batches=batches, quant=QuantConfig("nf4"), optim=OptimConfig(lr=lr),
                          stop=StopRule(max_steps=max_steps, forget_target=None))


@pytest.fixture(scope="module")
def batches(facts_tiny, split):
    return Batches.build(facts_tiny, split)


# --- losses on hand examples ------------------------------------------------------------------


def test_rmu_terms_match_formula_over_real_tokens_only():
    # two prompts, three positions, d = 2; row 0 has one padding position
    acts = torch.tensor([[[1.0, 2.0], [0.0, 1.0], [9.0, 9.0]],
                         [[2.0, 0.0], [1.0, 1.0], [3.0, -1.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    control = torch.tensor([1.0, 0.0])
    # real rows: (1,2),(0,1),(2,0),(1,1),(3,-1); squared distances to (1,0): 4, 1+1, 1, 1, 4+1
    expected = (4 + 2 + 1 + 1 + 5) / (5 * 2)
    assert float(losses.rmu_forget(acts, mask, control)) == pytest.approx(expected)
    frozen = torch.zeros_like(acts)
    frozen[..., 0] = 1.0
    assert float(losses.rmu_retain(acts, frozen, mask)) == pytest.approx(expected)
    assert float(losses.rmu_retain(acts, acts.clone(), mask)) == 0.0
    # padding never counts, whatever its value
    acts2 = acts.clone()
    acts2[0, 2] = 1e6
    assert float(losses.rmu_forget(acts2, mask, control)) == pytest.approx(expected)


def test_quail_hinge_matches_formula():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, 4.0, 0.0]])
    ref = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 3.5], [1.0, 1.0, 0.0]])
    answers = torch.tensor([0, 2, 1])
    margin = torch.tensor([0.5, 1.0, 2.0])
    # drops z_ref - z: 1.0, 0.5, -3.0 -> hinge max(0, m - drop): 0, 0.5, 5.0
    expected = (0.0 + 0.5 + 5.0) / 3
    assert float(losses.quail_hinge(logits, ref, answers, margin)) == pytest.approx(expected)
    # a scalar margin broadcasts
    assert float(losses.quail_hinge(logits, ref, answers, torch.tensor(0.25))) == pytest.approx((0 + 0 + 3.25) / 3)
    # no gradient into the reference; gradient pushes the answer logit down where active
    lg = logits.clone().requires_grad_(True)
    rf = ref.clone().requires_grad_(True)
    losses.quail_hinge(lg, rf, answers, margin).backward()
    assert rf.grad is None
    assert lg.grad[0].abs().sum() == 0  # row 0 already past its margin
    assert lg.grad[1, 2] > 0 and lg.grad[2, 1] > 0


# --- QUAIL margin = half the local quantization step -------------------------------------------


def _independent_bin_widths(w: torch.Tensor, quant: QuantConfig) -> torch.Tensor:
    """Bin width of every weight of a [out, in] Linear weight, from the code table and block absmax
    directly (not through bin_geometry): nearest code of w/absmax, mean of the two gaps around it."""
    from workbench.quant import code_table

    values = torch.sort(code_table(quant).double()).values
    flat = w.reshape(-1).double()
    bs = quant.blocksize
    pad = (-flat.numel()) % bs
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, bs)
    absmax = blocks.abs().amax(1, keepdim=True).expand_as(blocks).reshape(-1)[: flat.numel()]
    s = flat / absmax
    rank = (s[:, None] - values[None, :]).abs().argmin(1)
    gaps = values[1:] - values[:-1]
    left = torch.cat([gaps[:1], gaps])[rank]  # edge codes mirror their one neighbour
    right = torch.cat([gaps, gaps[-1:]])[rank]
    return ((left + right) / 2 * absmax).float().view_as(w)


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_quail_margin_is_half_the_local_step(facts_tiny, batches, qtype):
    from workbench.unlearning.methods.quail import final_hidden, quail_margins

    quant = QuantConfig(qtype)
    w = facts_tiny.hf.get_output_embeddings().weight.detach()
    widths = _independent_bin_widths(w, quant)
    h = final_hidden(facts_tiny.hf, batches.forget)
    expected = 0.5 * (widths[batches.forget.answers] * h.abs()).sum(-1)
    got = quail_margins(facts_tiny, batches.forget, quant)
    assert got.shape == (len(batches.forget),)
    assert torch.allclose(got, expected, rtol=1e-4)
    assert torch.allclose(quail_margins(facts_tiny, batches.forget, quant, scale=3.0), 3 * got)
    # What "half a step" means: rounding the answer rows to the quantizer moves each answer
    # logit by at most the margin (each weight moves by at most half its bin).
    from workbench.quant import quantize_dequantize

    qw = quantize_dequantize(w, quant)
    rows = batches.forget.answers
    shift = ((qw[rows] - w[rows]) * h).sum(-1).abs()
    assert bool((shift <= got * (1 + 1e-4)).all())
    assert float(shift.max()) > 0


# --- SURE: salient rows only, larger learning rate ---------------------------------------------


def test_sure_moves_only_the_top_rows(facts_tiny, batches):
    from workbench.unlearning.methods.sure import row_masks, row_saliency, sure

    names = quantizable_parameters(facts_tiny.hf, QuantConfig("nf4"))
    saliency = row_saliency(facts_tiny, batches, names)
    conv1d = transposed_parameters(facts_tiny.hf)
    params = dict(facts_tiny.hf.named_parameters())
    for n in names:  # Conv1D [in, out]: one saliency per output column
        assert saliency[n].shape == (params[n].shape[1] if n in conv1d else params[n].shape[0],)
    masks = row_masks(facts_tiny, saliency, 0.1)
    total_rows = sum(s.numel() for s in saliency.values())
    selected = {n: m.any(0) if n in conv1d else m.any(1) for n, m in masks.items()}
    assert sum(int(s.sum()) for s in selected.values()) == round(0.1 * total_rows)
    # the selected rows are the most salient ones
    lowest_in = min(float(saliency[n][s].min()) for n, s in selected.items() if s.any())
    highest_out = max(float(saliency[n][~s].max()) for n, s in selected.items() if (~s).any())
    assert lowest_in >= highest_out

    before = facts_tiny.weights_hash()
    result = sure(_task(facts_tiny, batches, lr=1e-3, max_steps=2), SureConfig(row_fraction=0.1, lr_scale=4.0))
    assert facts_tiny.weights_hash() == before
    assert result.diagnostics["lr"] == pytest.approx(4e-3)
    assert result.update.nnz() > 0
    for n, d in result.update.deltas.items():
        assert not bool((d != 0)[~masks[n]].any()), f"{n} moved outside its selected rows"


# --- RMU: only blocks up to the steered layer, activations move to c·u ------------------------


def test_rmu_moves_only_upstream_blocks_and_steers_activations(facts_tiny, batches):
    from workbench.unlearning.methods.rmu import control_vector, hidden_at, rmu

    cfg = RmuConfig(layer=0, steering_scale=4.0, alpha=10.0)
    result = rmu(_task(facts_tiny, batches, lr=3e-3, max_steps=5), cfg)
    assert result.update.nnz() > 0
    assert all(".h.0." in n for n in result.update.deltas), result.update.names
    d = result.diagnostics
    assert d["layer"] == 0 and d["steering_coeff"] == pytest.approx(4.0 * d["base_forget_norm"])
    control = control_vector(facts_tiny.d_model, d["steering_coeff"], cfg.seed)
    assert float(control.norm()) == pytest.approx(d["steering_coeff"], rel=1e-5)
    after = result.update.apply(facts_tiny)
    with torch.no_grad():
        a0, mask = hidden_at(facts_tiny.hf, batches.forget, 0)
        a1, _ = hidden_at(after.hf, batches.forget, 0)
    assert float(losses.rmu_forget(a1, mask, control)) < float(losses.rmu_forget(a0, mask, control))
    with pytest.raises(WorkbenchError, match="out of range"):
        rmu(_task(facts_tiny, batches, lr=3e-3, max_steps=5), RmuConfig(layer=facts_tiny.n_layers - 1))


# --- LoRA: the merged update is the adapters ---------------------------------------------------


def test_lora_merged_update_equals_running_the_adapters(facts_tiny, batches):
    from workbench.unlearning.methods.lora import adapted_copy, adapter_names, merged_update

    peft_model = adapted_copy(facts_tiny, LoraConfig(rank=4, alpha=8.0))
    inner = peft_model.get_base_model()
    names = adapter_names(peft_model)
    assert names and all("lora_" in n for n in names)
    # non-trivial adapters (B starts at 0, which would make the check vacuous)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in inner.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    update = merged_update(facts_tiny, peft_model)
    assert set(update.deltas) <= set(quantizable_parameters(facts_tiny.hf, QuantConfig("nf4")))
    assert update.nnz() > 0
    with torch.no_grad():
        adapters = answer_logits(inner, batches.forget)
        merged = answer_logits(update.apply(facts_tiny).hf, batches.forget)
        base = answer_logits(facts_tiny.hf, batches.forget)
    assert torch.allclose(adapters, merged, atol=1e-4)
    assert float((adapters - base).abs().max()) > 1e-2  # the adapters do change the logits
    # rank-r change per adapted matrix
    for d in update.deltas.values():
        assert int(torch.linalg.matrix_rank(d)) <= 4


def test_lora_run_returns_the_merged_difference(facts_tiny, batches):
    from workbench.unlearning.methods.lora import lora

    before = facts_tiny.weights_hash()
    result = lora(_task(facts_tiny, batches, lr=3e-3, max_steps=2), LoraConfig(rank=2, alpha=4.0))
    assert facts_tiny.weights_hash() == before
    assert result.steps == 2 and result.update.nnz() > 0
    for d in result.update.deltas.values():
        assert int(torch.linalg.matrix_rank(d)) <= 2
    assert result.diagnostics["adapter_params"] > 0


# --- every method, end to end --------------------------------------------------------------------


def test_methods_are_registered():
    assert {"rmu", "sure", "quail", "lora"} <= set(BASELINES)
    assert METHODS[0] == "mansu" and set(BASELINES) < set(METHODS)


@pytest.mark.parametrize("method", BASELINES)
def test_every_baseline_runs_into_a_saved_run(facts_tiny, split, method, tmp_path):
    before = facts_tiny.weights_hash()
    result, metrics, run = run_unlearning(facts_tiny, split, method=method, optim=OptimConfig(lr=3e-3),
                                          stop=StopRule(max_steps=3), measure_cad=False, runs_root=str(tmp_path))
    assert facts_tiny.weights_hash() == before
    assert 1 <= result.steps <= 3 and result.stopped in ("target", "budget")
    assert result.update.nnz() > 0
    result.update.check_fits(facts_tiny)
    on_disk = json.loads((run.path / "metrics.json").read_text())
    assert on_disk["method"] == method and on_disk["model"] == "facts-tiny"
    f = on_disk["forget"]
    assert on_disk["ptq_gap"] == pytest.approx(f["after_q"] - f["after_fp"], abs=1e-12)
    d = on_disk["ptq_gap_decomposition"]
    assert d["base_shift"] + d["rounding"] == pytest.approx(on_disk["ptq_gap"], abs=1e-12)
    assert on_disk["params_changed"] == result.update.nnz()
    assert set(on_disk["properties"]) == {"forgetting", "retain", "ptq", "structural"}
    assert all(math.isfinite(v) for v in f.values())
    assert on_disk == run.metrics.to_json() and metrics.saved_as(run.id) == run.metrics
    back = run.update()
    assert back.names == result.update.names


def test_unlearn_checks_the_method_config_type(facts_tiny, split):
    with pytest.raises(WorkbenchError, match="takes RmuConfig"):
        unlearn(facts_tiny, split, method="rmu", method_config=SureConfig())
    with pytest.raises(WorkbenchError, match="unknown method"):
        unlearn(facts_tiny, split, method="retrain")
    for bad in (lambda: SureConfig(row_fraction=0.0), lambda: RmuConfig(steering_scale=0),
                lambda: QuailConfig(margin_scale=-1), lambda: LoraConfig(rank=0)):
        with pytest.raises(WorkbenchError):
            bad()


# The reference logits each baseline's losses read: the frozen base's, on forget and on retain
# (SURE and LoRA run GradDiff's objective by default).
REFERENCE_READ = {"ga": set(), "graddiff": set(), "simnpo": set(), "rmu": set(), "sure": set(), "lora": set(),
                  "npo": {"forget"}, "npo_gdr": {"forget"}, "quail": {"forget"}, "ga_klr": {"retain"},
                  "npo_klr": {"forget", "retain"}}


@pytest.mark.parametrize("method", BASELINES)
def test_a_baseline_computes_only_the_reference_logits_its_losses_read(facts_tiny, split, method, monkeypatch):
    """The frozen base's answer-span logits over a whole side (~0.9 GB on SmolLM2's retain set)
    are computed only for a side a loss reads: never for GA, GradDiff, SimNPO or RMU."""
    import workbench.unlearning.batches as batches_mod

    read: list[str] = []
    real = batches_mod.span_logits

    def counted(model, batch):
        read.append("forget" if len(batch) == len(split.forget) else "retain")
        return real(model, batch)

    monkeypatch.setattr(batches_mod, "span_logits", counted)
    result = unlearn(facts_tiny, split, method=method, optim=OptimConfig(lr=3e-3),
                     stop=StopRule(max_steps=2, forget_target=None))
    assert result.steps == 2 and result.update.nnz() > 0
    assert set(read) == REFERENCE_READ[method] and len(read) == len(set(read))  # once per side at most


def test_a_loss_that_reads_an_undeclared_reference_is_refused(facts_tiny, split, monkeypatch):
    """An objective that says it reads no reference but does gets an error naming it, not a wrong loss."""
    from workbench.unlearning.methods.npo import NPO

    monkeypatch.setattr(NPO, "forget_reference", False)
    with pytest.raises(WorkbenchError, match="npo: a loss read the reference logits without declaring it"):
        unlearn(facts_tiny, split, method="npo", optim=OptimConfig(lr=3e-3), stop=StopRule(max_steps=1))


@pytest.mark.parametrize("method", ["graddiff", "npo_klr", "rmu", "sure", "lora"])
def test_a_step_over_the_working_budget_recomputes_the_blocks_with_the_same_numbers(facts_tiny, split, method,
                                                                                    monkeypatch):
    """A step whose saved activations outweigh the working budget recomputes each block in its
    backward: the same update and history to the bit (plain forward/backward, both references,
    hidden states, a gradient mask, LoRA's adapters), said in the diagnostics; within the budget
    the blocks are never wrapped."""
    import workbench.unlearning.loop as loop_mod
    from workbench.models.loaded import LoadedModel

    entered: list[int] = []
    real = loop_mod.blocks_recomputed

    def counted(*args, **kwargs):
        entered.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "blocks_recomputed", counted)

    def run(budget: int):
        entered.clear()
        monkeypatch.setattr(LoadedModel, "working_budget_bytes", lambda self: budget)
        result = unlearn(facts_tiny, split, method=method, optim=OptimConfig(lr=3e-3),
                         stop=StopRule(max_steps=3, forget_target=None))
        return result, len(entered)

    plain, plain_entered = run(1 << 40)
    recomputed, recomputed_entered = run(1)
    assert plain_entered == 0 and recomputed_entered == 3  # once per step
    assert "blocks_recomputed" not in plain.diagnostics and recomputed.diagnostics["blocks_recomputed"] is True
    assert plain.update.nnz() > 0 and sorted(plain.update.deltas) == sorted(recomputed.update.deltas)
    for name, delta in plain.update.deltas.items():
        assert torch.equal(recomputed.update.deltas[name], delta), name
    assert plain.history == recomputed.history


def test_step_memory_counts_both_sides_rows_of_their_longest_fact(facts_tiny, batches, monkeypatch):
    """A step's estimate: per side, the longest fact's saved bytes times the rows a step takes
    (at most the side's size); recomputing only above the budget."""
    import copy

    from workbench.models.loaded import LoadedModel
    from workbench.models.recompute import saved_bytes
    from workbench.models.scoring import span_logits
    from workbench.unlearning.loop import StepMemory, step_memory

    work = copy.deepcopy(facts_tiny.hf).float().train()  # as the loop hands it over
    for p in work.parameters():
        p.requires_grad_(True)
    work.eval()  # the estimate's own forwards run without dropout
    one_forget = saved_bytes(work, lambda: span_logits(work, batches.forget.longest()))
    one_retain = saved_bytes(work, lambda: span_logits(work, batches.retain.longest()))
    work.train()
    optim = OptimConfig(forget_batch=3, retain_batch=10**5)
    monkeypatch.setattr(LoadedModel, "working_budget_bytes", lambda self: 12345)
    memory = step_memory(facts_tiny, work, optim, batches.forget, batches.retain)
    assert memory == StepMemory(3 * one_forget + len(batches.retain) * one_retain, 12345)
    assert work.training  # as it was
    assert StepMemory(11, 10).recompute and not StepMemory(10, 10).recompute
    assert "20 MiB, over the 10 MiB budget" in StepMemory(20 << 20, 10 << 20).message("graddiff")
