"""Unlearning losses against their formulas, the baselines' term combinations, and the shared
loop's NaN guard (docs/SCIENCE.md §4)."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact, FactSplit
from workbench.models.scoring import FactBatch, answer_logits
from workbench.quant import QuantConfig
from workbench.unlearning import losses
from workbench.unlearning.batches import Batches
from workbench.unlearning.loop import run_gradient_method
from workbench.unlearning.methods import GRADIENT_OBJECTIVES
from workbench.unlearning.objectives import BaselineConfig
from workbench.unlearning.registry import REGISTRY, MethodSpec, unlearn
from workbench.unlearning.task import OptimConfig, StopRule, UnlearningTask

# A hand example: two rows, three classes.
LOGITS = [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]
REF = [[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]]
ANSWERS = [0, 2]


def _log_softmax(row: list[float]) -> list[float]:
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def _logp(rows: list[list[float]], answers: list[int]) -> list[float]:
    return [_log_softmax(r)[a] for r, a in zip(rows, answers)]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_answer_logprob_nll_and_ga_match_formula():
    lp = _logp(LOGITS, ANSWERS)
    got = losses.answer_logprob(_t(LOGITS), torch.tensor(ANSWERS))
    assert got.tolist() == pytest.approx(lp, abs=1e-6)
    assert float(losses.nll(_t(LOGITS), torch.tensor(ANSWERS))) == pytest.approx(-sum(lp) / 2, abs=1e-6)
    assert float(losses.gradient_ascent(_t(LOGITS), torch.tensor(ANSWERS))) == pytest.approx(sum(lp) / 2, abs=1e-6)


def test_kl_to_reference_is_kl_ref_to_model_batchmean():
    expected = 0.0
    for row, ref in zip(LOGITS, REF):
        lq, lp = _log_softmax(row), _log_softmax(ref)
        expected += sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))
    expected /= len(LOGITS)  # batchmean: sum over classes, mean over rows
    reverse = 0.0
    for row, ref in zip(LOGITS, REF):
        lq, lp = _log_softmax(row), _log_softmax(ref)
        reverse += sum(math.exp(b) * (b - a) for a, b in zip(lp, lq))
    reverse /= len(LOGITS)
    assert abs(expected - reverse) > 1e-3, "the example must tell the two KL directions apart"
    assert float(losses.kl_to_reference(_t(LOGITS), _t(REF))) == pytest.approx(expected, abs=1e-6)
    assert losses.kl_on_retain(_t(LOGITS), _t(REF)) == pytest.approx(expected, abs=1e-6)
    assert float(losses.kl_to_reference(_t(REF), _t(REF))) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
def test_npo_matches_formula(beta):
    lp, lr = _logp(LOGITS, ANSWERS), _logp(REF, ANSWERS)
    expected = -(2 / beta) * sum(_log_sigmoid(-beta * (a - b)) for a, b in zip(lp, lr)) / 2
    got = losses.npo(_t(LOGITS), _t(REF), torch.tensor(ANSWERS), beta=beta)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # At the reference the ratio is 0: loss = (2/β) ln 2.
    at_ref = losses.npo(_t(REF), _t(REF), torch.tensor(ANSWERS), beta=beta)
    assert float(at_ref) == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_npo_does_not_backpropagate_into_the_reference():
    logits = _t(LOGITS).requires_grad_(True)
    ref = _t(REF).requires_grad_(True)
    losses.npo(logits, ref, torch.tensor(ANSWERS)).backward()
    assert ref.grad is None
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(("beta", "gamma", "length"), [(0.1, 0.0, 1), (1.0, 0.5, 1), (2.0, 1.0, 3)])
def test_simnpo_matches_formula(beta, gamma, length):
    lp = _logp(LOGITS, ANSWERS)
    expected = -(2 / beta) * sum(_log_sigmoid(-beta * a / length - gamma) for a in lp) / 2
    got = losses.simnpo(_t(LOGITS), torch.tensor(ANSWERS), beta=beta, gamma=gamma, length=length)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_losses_decrease_as_the_answer_is_forgotten():
    """Every forget loss is minimised by lowering the answer's probability."""
    answers = torch.tensor(ANSWERS)
    lowered = _t(LOGITS).clone()
    lowered[0, 0] -= 3.0
    lowered[1, 2] -= 3.0
    assert losses.gradient_ascent(lowered, answers) < losses.gradient_ascent(_t(LOGITS), answers)
    assert losses.npo(lowered, _t(REF), answers) < losses.npo(_t(LOGITS), _t(REF), answers)
    assert losses.simnpo(lowered, answers) < losses.simnpo(_t(LOGITS), answers)


# --- baselines: which terms, with which weight -----------------------------------------------


def _toy_facts(model, n: int, offset: int = 0) -> list[Fact]:
    vocab = [f"w{i}" for i in range(100)]
    return [Fact(f"w{i + offset} w{i + offset + 1} w{(i * 7 + offset) % 90}", vocab[(i * 13 + offset) % 100], ())
            for i in range(n)]


@pytest.fixture(scope="module")
def toy_batches(toy_gpt2):
    split = FactSplit("toy", forget=tuple(_toy_facts(toy_gpt2, 6)), retain=tuple(_toy_facts(toy_gpt2, 8, 40)))
    return Batches.build(toy_gpt2, split)


def _explicit_terms(model, b: Batches, beta: float, gamma: float) -> dict[str, float]:
    """Each term computed from the raw logits by the formulas, in float64."""
    with torch.no_grad():
        lf = answer_logits(model, b.forget).double()
        lr = answer_logits(model, b.retain).double()
    def logp(logits, answers):
        return (logits.gather(-1, answers[:, None]).squeeze(-1) - torch.logsumexp(logits, -1))
    lp_f = logp(lf, b.forget.answers)
    # single-token answers: the reference span logits have one position
    ref_f, ref_r = b.ref_forget[:, 0].double(), b.ref_retain[:, 0].double()
    lp_ref = logp(ref_f, b.forget.answers)
    lp_r = logp(lr, b.retain.answers)
    p_ref = torch.softmax(ref_r, -1)
    kl = (p_ref * (torch.log_softmax(ref_r, -1) - torch.log_softmax(lr, -1))).sum(-1).mean()
    return {
        "ga": float(lp_f.mean()),
        "npo": float(-(2 / beta) * torch.nn.functional.logsigmoid(-beta * (lp_f - lp_ref)).mean()),
        "simnpo": float(-(2 / beta) * torch.nn.functional.logsigmoid(-beta * lp_f - gamma).mean()),
        "gdr": float(-lp_r.mean()),
        "klr": float(kl),
    }


COMBOS = {
    "ga": ("ga", None), "graddiff": ("ga", "gdr"), "ga_klr": ("ga", "klr"),
    "npo": ("npo", None), "npo_gdr": ("npo", "gdr"), "npo_klr": ("npo", "klr"), "simnpo": ("simnpo", None),
}


BETA, GAMMA = 0.7, 0.3


@pytest.fixture(scope="module")
def perturbed(toy_gpt2, toy_batches):
    """The toy model moved away from the reference (so NPO's ratio and the KLR term are non-zero),
    and every loss term computed explicitly on it."""
    import copy

    model = copy.deepcopy(toy_gpt2.hf)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    terms = _explicit_terms(model, toy_batches, BETA, GAMMA)
    assert terms["klr"] > 1e-4 and abs(terms["npo"] - 2 / BETA * math.log(2)) > 1e-4
    return model, terms


@pytest.mark.parametrize("method", sorted(COMBOS))
@pytest.mark.parametrize("alpha", [0.0, 2.5])
def test_objectives_combine_terms_with_alpha(toy_batches, perturbed, method, alpha):
    model, terms = perturbed
    cfg = BaselineConfig(alpha=alpha, beta=BETA, gamma=GAMMA)
    forget, retain = COMBOS[method]
    expected = terms[forget] + (alpha * terms[retain] if retain else 0.0)
    b = toy_batches
    got = GRADIENT_OBJECTIVES[method](cfg)(model, b.forget, b.ref_forget, b.retain, b.ref_retain)
    assert float(got) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_the_family_is_registered_and_bad_configs_are_refused():
    assert set(GRADIENT_OBJECTIVES) == set(COMBOS)
    with pytest.raises(WorkbenchError, match="unknown method"):
        unlearn(None, None, method="nope")  # type: ignore[arg-type]
    with pytest.raises(WorkbenchError, match="alpha"):
        BaselineConfig(alpha=-1.0)
    with pytest.raises(WorkbenchError, match="beta"):
        BaselineConfig(beta=0.0)


# --- the loop: NaN stops the run, the base is untouched ---------------------------------------


def _nan_objective(model, fb, ref_f, rb, ref_r):
    return answer_logits(model, fb).sum() * float("nan")


def test_nan_loss_raises_and_leaves_the_base_untouched(toy_gpt2, toy_batches):
    before = toy_gpt2.weights_hash()
    with pytest.raises(WorkbenchError, match="(?i)nan") as err:
        run_gradient_method(_task(toy_gpt2, toy_batches, lr=1e-3, max_steps=5), _nan_objective, method="ga")
    assert "step 1" in str(err.value)
    assert toy_gpt2.weights_hash() == before
    assert not any(p.requires_grad for p in toy_gpt2.hf.parameters())


def _task(model, batches, *, lr, max_steps, forget_target=0.1):
    return UnlearningTask(model=model, batches=batches, quant=QuantConfig("nf4"), optim=OptimConfig(lr=lr),
                          stop=StopRule(max_steps=max_steps, forget_target=forget_target))


def test_nan_loss_through_unlearn(toy_gpt2, monkeypatch):
    """A method whose loss turns NaN, registered like any other: the error reaches the caller."""
    calls = []

    def run(task, _config):
        calls.append(task.stop.max_steps)
        return run_gradient_method(task, _nan_objective, method="npo")

    monkeypatch.setitem(REGISTRY, "npo", MethodSpec("npo", "NPO", "always NaN", run))
    split = FactSplit("toy", forget=tuple(_toy_facts(toy_gpt2, 4)), retain=tuple(_toy_facts(toy_gpt2, 4, 40)))
    before = toy_gpt2.weights_hash()
    with pytest.raises(WorkbenchError, match="(?i)nan"):
        unlearn(toy_gpt2, split, method="npo", stop=StopRule(max_steps=3))
    assert calls == [3]
    assert toy_gpt2.weights_hash() == before


def test_gradient_method_moves_only_trainable_weights_and_returns_the_difference(toy_gpt2, toy_batches):
    before = toy_gpt2.weights_hash()
    result = run_gradient_method(_task(toy_gpt2, toy_batches, lr=1e-2, max_steps=3, forget_target=None),
                                 GRADIENT_OBJECTIVES["graddiff"](), method="graddiff")
    assert toy_gpt2.weights_hash() == before
    assert result.steps == 3 and result.stopped == "budget" and len(result.history) == 3
    from workbench.quant import QuantConfig, quantizable_parameters

    allowed = set(quantizable_parameters(toy_gpt2.hf, QuantConfig("nf4")))
    assert result.update.nnz() > 0
    assert set(result.update.deltas) <= allowed
    assert result.update.meta["base_fingerprint"] == toy_gpt2.fingerprint


def test_fact_batch_subset_trims_padding(toy_gpt2):
    facts = [Fact("w1 w2", "w3", ()), Fact("w1 w2 w3 w4 w5", "w6", ())]
    batch = FactBatch.from_facts(toy_gpt2.tokenizer, facts)
    sub = batch.subset(torch.tensor([0]))
    assert sub.ids.shape[1] == int(batch.last[0]) + 1
