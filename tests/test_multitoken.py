"""Multi-token answers: the span scores, every loss and the MANSU forget gradient against
direct torch computations on hand-built examples (docs/SCIENCE.md §4, §7)."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.data.facts import Fact, FactSplit
from workbench.measurement.evaluation import evaluate_facts
from workbench.models.scoring import FactBatch, span_exact, span_logits, span_logprob, span_scores
from workbench.unlearning import losses
from workbench.unlearning.batches import Batches
from workbench.unlearning.mansu.candidates import answer_logprob_gradient
from workbench.unlearning.methods import GRADIENT_OBJECTIVES
from workbench.unlearning.objectives import BaselineConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# --- the losses on a hand example: two rows, answer spans of 2 and 1 tokens, vocabulary of 3 ------

LOGITS = [[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]],
          [[0.5, 0.5, 3.0], [9.0, -9.0, 9.0]]]  # row 1's second position is padding
REF = [[[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]],
       [[0.0, 2.0, 1.0], [1.0, 1.0, 1.0]]]
TARGETS = [[0, 1], [2, 0]]
MASK = [[True, True], [True, False]]


def _lsm(row: list[float]) -> list[float]:
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def _seq_logp(logits) -> list[float]:
    """Σ over the real tokens of log p(target), by hand."""
    return [sum(_lsm(logits[i][k])[TARGETS[i][k]] for k in range(2) if MASK[i][k]) for i in range(2)]


def _t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_span_losses_match_hand_formulas():
    lg, tg, mk = _t(LOGITS), torch.tensor(TARGETS), torch.tensor(MASK)
    lp, lp_ref = _seq_logp(LOGITS), _seq_logp(REF)
    assert losses.answer_logprob(lg, tg, mk).tolist() == pytest.approx(lp, abs=1e-6)
    assert float(losses.nll(lg, tg, mk)) == pytest.approx(-sum(lp) / 2, abs=1e-6)
    assert float(losses.gradient_ascent(lg, tg, mk)) == pytest.approx(sum(lp) / 2, abs=1e-6)
    beta = 0.7
    npo = -(2 / beta) * sum(-math.log1p(math.exp(beta * (a - b))) for a, b in zip(lp, lp_ref)) / 2
    assert float(losses.npo(lg, _t(REF), tg, beta=beta, mask=mk)) == pytest.approx(npo, rel=1e-5)
    # SimNPO normalises by each answer's own length: 2 tokens, then 1
    gamma = 0.3
    simnpo = -(2 / beta) * sum(-math.log1p(math.exp(beta * a / n + gamma)) for a, n in zip(lp, (2, 1))) / 2
    assert float(losses.simnpo(lg, tg, beta=beta, gamma=gamma, mask=mk)) == pytest.approx(simnpo, rel=1e-5)
    # KL(p_ref || p) per real position, averaged over the 3 real positions
    kl = 0.0
    for i, k in ((0, 0), (0, 1), (1, 0)):
        lq, lr = _lsm(LOGITS[i][k]), _lsm(REF[i][k])
        kl += sum(math.exp(a) * (a - b) for a, b in zip(lr, lq))
    assert float(losses.kl_to_reference(lg, _t(REF), mk)) == pytest.approx(kl / 3, rel=1e-5)


def test_padding_never_reaches_a_loss_or_its_gradient():
    lg = _t(LOGITS).requires_grad_(True)
    losses.nll(lg, torch.tensor(TARGETS), torch.tensor(MASK)).backward()
    assert lg.grad is not None and float(lg.grad[1, 1].abs().sum()) == 0.0
    assert float(lg.grad[0, 1].abs().sum()) > 0


def test_span_exact_needs_every_real_token():
    lg, tg, mk = _t(LOGITS), torch.tensor(TARGETS), torch.tensor(MASK)
    # row 0: argmax 0 then 1 = targets; row 1: argmax 2 = target (the padded position is ignored)
    assert span_exact(lg, tg, mk).tolist() == [True, True]
    tg2 = torch.tensor([[0, 2], [2, 0]])
    assert span_exact(lg, tg2, mk).tolist() == [False, True]


# --- batched, padded span scores against one unpadded forward per fact ------------------------------


def _facts() -> list[Fact]:
    """Prompts of 1..5 words and answers of 1..4 words (so both the prompts and spans are padded)."""
    out = []
    for i in range(10):
        prompt = " ".join(f"w{(7 * i + 3 * k) % 100}" for k in range(1 + i % 5))
        answer = " ".join(f"w{(11 * i + 5 * k) % 100}" for k in range(1 + i % 4))
        out.append(Fact(prompt, answer, ()))
    return out


def _direct(hf, tok, fact: Fact) -> tuple[float, bool, float]:
    """(Σ log p(answer tokens), greedy reproduces the answer, log p(first token)) by one forward."""
    p = tok(fact.prompt)["input_ids"]
    a = tok(" " + fact.answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([p + a])).logits[0].double(), -1)
    rows = [logp[len(p) - 1 + k] for k in range(len(a))]
    exact = all(int(r.argmax()) == t for r, t in zip(rows, a))
    return sum(float(r[t]) for r, t in zip(rows, a)), exact, float(rows[0][a[0]])


def _greedy(hf, tok, fact: Fact) -> bool:
    """Greedy decoding, token by token, reproduces the answer."""
    ids = tok(fact.prompt)["input_ids"]
    a = tok(" " + fact.answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in a:
            ids = [*ids, int(hf(torch.tensor([ids])).logits[0, -1].argmax())]
    return ids[-len(a):] == a


@pytest.mark.parametrize("fixture", ["toy_gpt2", "toy_llama_gqa"])
def test_span_scores_equal_per_fact_forwards(fixture, request):
    model = request.getfixturevalue(fixture)
    facts = _facts()
    batch = FactBatch.from_facts(model.tokenizer, facts)
    assert batch.targets.shape == (10, 4) and batch.lengths.tolist() == [1 + i % 4 for i in range(10)]
    direct = [_direct(model.hf, model.tokenizer, f) for f in facts]
    for size in (64, 3):
        logp, exact = span_scores(model.hf, batch, batch_size=size)
        assert logp.tolist() == pytest.approx([d[0] for d in direct], abs=1e-4)
        assert exact.tolist() == [d[1] for d in direct]
    scores = evaluate_facts(model, facts)
    assert scores.logprob == pytest.approx(sum(d[0] for d in direct) / 10, abs=1e-4)
    assert scores.exact == pytest.approx(sum(d[1] for d in direct) / 10)


def test_exact_match_is_greedy_decoding(toy_gpt2):
    """On facts whose answers are the model's own greedy continuation, and perturbed ones."""
    hf, tok = toy_gpt2.hf, toy_gpt2.tokenizer
    facts = []
    for i in range(6):
        prompt = f"w{i} w{i + 9}"
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            for _ in range(3):
                ids = [*ids, int(hf(torch.tensor([ids])).logits[0, -1].argmax())]
        own = " ".join(tok.convert_ids_to_tokens(ids[-3:]))
        facts.append(Fact(prompt, own, ()))
        facts.append(Fact(prompt + " w99", own, ()))  # same answer after another prompt: usually wrong
    _, exact = span_scores(hf, FactBatch.from_facts(tok, facts))
    assert exact.tolist() == [_greedy(hf, tok, f) for f in facts]
    assert all(exact[::2].tolist())


def test_single_token_answers_keep_todays_numbers(toy_gpt2):
    facts = [Fact(f.prompt, f.answer.split()[0], ()) for f in _facts()]
    scores = evaluate_facts(toy_gpt2, facts)
    direct = [_direct(toy_gpt2.hf, toy_gpt2.tokenizer, f) for f in facts]
    assert scores.exact == scores.top1
    assert scores.logprob == pytest.approx(sum(d[2] for d in direct) / len(facts), abs=1e-5)
    batch = FactBatch.from_facts(toy_gpt2.tokenizer, facts)
    # no answer column is added to the inputs: the batch is the prompts alone, as before
    assert batch.ids.shape[1] == int(batch.last.max()) + 1


# --- the objectives and the MANSU forget gradient on multi-token batches --------------------------


@pytest.fixture(scope="module")
def multi_batches(toy_gpt2):
    facts = _facts()
    retain = [Fact(f"w{i} w{i + 1} w{i + 2}", f"w{(3 * i) % 100} w{(5 * i) % 100}", ()) for i in range(40, 48)]
    return Batches.build(toy_gpt2, FactSplit("multi", forget=tuple(facts), retain=tuple(retain)))


def _explicit(model, b: Batches, beta: float, gamma: float) -> dict[str, float]:
    """Every term from one unpadded forward per fact, in float64."""
    def rows(batch: FactBatch, hf) -> list[torch.Tensor]:
        out = []
        for i in range(len(batch)):
            n = int(batch.lengths[i])
            ids = batch.ids[i, : int(batch.last[i]) + n]
            with torch.no_grad():
                out.append(hf(ids[None]).logits[0, int(batch.last[i]) : int(batch.last[i]) + n].double())
        return out

    def seq(logits_rows, batch):
        return torch.tensor([float(torch.log_softmax(r, -1)[torch.arange(len(r)), batch.targets[i, : len(r)]].sum())
                             for i, r in enumerate(logits_rows)], dtype=torch.float64)

    lf, lr = rows(b.forget, model), rows(b.retain, model)
    lp_f, lp_r = seq(lf, b.forget), seq(lr, b.retain)
    ref_f = [b.ref_forget[i, : int(b.forget.lengths[i])].double() for i in range(len(b.forget))]
    ref_r = [b.ref_retain[i, : int(b.retain.lengths[i])].double() for i in range(len(b.retain))]
    lp_ref = seq(ref_f, b.forget)
    kl_terms = [(torch.softmax(rr, -1) * (torch.log_softmax(rr, -1) - torch.log_softmax(q, -1))).sum(-1)
                for rr, q in zip(ref_r, lr)]
    kl = torch.cat(kl_terms).mean()
    n_f = b.forget.lengths.double()
    sig = torch.nn.functional.logsigmoid
    return {"ga": float(lp_f.mean()), "npo": float(-(2 / beta) * sig(-beta * (lp_f - lp_ref)).mean()),
            "simnpo": float(-(2 / beta) * sig(-beta * lp_f / n_f - gamma).mean()),
            "gdr": float(-lp_r.mean()), "klr": float(kl)}


COMBOS = {"ga": ("ga", None), "graddiff": ("ga", "gdr"), "ga_klr": ("ga", "klr"), "npo": ("npo", None),
          "npo_gdr": ("npo", "gdr"), "npo_klr": ("npo", "klr"), "simnpo": ("simnpo", None)}


def test_objectives_sum_over_answer_tokens(toy_gpt2, multi_batches):
    import copy

    model = copy.deepcopy(toy_gpt2.hf)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    terms = _explicit(model, multi_batches, 0.7, 0.3)
    assert terms["klr"] > 1e-4
    b = multi_batches
    for method, (forget, retain) in COMBOS.items():
        got = GRADIENT_OBJECTIVES[method](BaselineConfig(alpha=2.0, beta=0.7, gamma=0.3))(
            model, b.forget, b.ref_forget, b.retain, b.ref_retain)
        expected = terms[forget] + (2.0 * terms[retain] if retain else 0.0)
        assert float(got) == pytest.approx(expected, rel=1e-4, abs=1e-5), method
    # a sampled subset (as the loop draws) trims the span; the reference logits follow it
    idx = torch.tensor([0, 4, 8])  # answers of 1 token each: the subset's span is 1
    sub = b.forget.subset(idx)
    assert sub.targets.shape[1] == 1
    got = GRADIENT_OBJECTIVES["npo"](BaselineConfig())(model, sub, b.ref_forget[idx], b.retain, b.ref_retain)
    assert torch.isfinite(got)


def test_mansu_forget_gradient_is_the_span_logprob_gradient(toy_gpt2, multi_batches):
    import copy

    work = copy.deepcopy(toy_gpt2.hf)
    names = ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_proj.weight"]
    got = answer_logprob_gradient(work, names, multi_batches.forget)
    params = dict(work.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    total = 0.0
    b = multi_batches.forget
    for i in range(len(b)):  # one unpadded forward per fact
        n_ans = int(b.lengths[i])
        ids = b.ids[i, : int(b.last[i]) + n_ans]
        logits = work(ids[None]).logits[0, int(b.last[i]) : int(b.last[i]) + n_ans]
        total = total + torch.log_softmax(logits, -1)[torch.arange(n_ans), b.targets[i, :n_ans]].sum()
    want = torch.autograd.grad(total / len(b), [params[n] for n in names])
    for n, w in zip(names, want):
        torch.testing.assert_close(got[n], w, atol=1e-5, rtol=1e-4)


def test_span_logits_positions(toy_gpt2):
    """span_logits row k is the logits at last + k of the teacher-forced input."""
    facts = _facts()[:4]
    batch = FactBatch.from_facts(toy_gpt2.tokenizer, facts)
    with torch.no_grad():
        full = toy_gpt2.hf(batch.ids).logits
        got = span_logits(toy_gpt2.hf, batch)
    for i in range(4):
        for k in range(int(batch.lengths[i])):
            torch.testing.assert_close(got[i, k], full[i, int(batch.last[i]) + k], atol=1e-5, rtol=1e-5)
    lp = span_logprob(got, batch.targets, batch.mask)
    assert lp.shape == (4,) and bool((lp < 0).all())


def test_span_logprob_without_grad_over_row_chunks_equals_the_whole_tensor(monkeypatch):
    """Without grad the answer log-probabilities are normalised a few facts at a time (a float copy of a
    whole batch's [n, A, vocab] logits was the measurement's memory peak on SmolLM2): bit for bit the
    whole tensor's, seams included (3 facts per chunk over 10); with grad the whole tensor, as before."""
    import workbench.models.scoring as scoring_mod

    monkeypatch.setattr(scoring_mod, "SPAN_ROWS_PER_SOFTMAX", 3)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 4, 500, generator=gen) * 6
    targets = torch.randint(0, 500, (10, 4), generator=gen)
    mask = torch.rand(10, 4, generator=gen) > 0.3
    whole = (torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1) * mask).sum(-1)
    assert torch.equal(span_logprob(logits, targets, mask), whole)
    leaf = logits.clone().requires_grad_(True)
    with_grad = span_logprob(leaf, targets, mask)
    assert torch.equal(with_grad.detach(), whole)
    (grad,) = torch.autograd.grad(with_grad.sum(), leaf)
    assert grad.shape == logits.shape and bool((grad != 0).any())
