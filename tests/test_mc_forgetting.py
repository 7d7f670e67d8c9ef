"""Unlearning toward a multiple-choice target: on a forget set of multiple-choice questions
(WMDP/MMLU-style rows) "the model still answers" means it picks the answer among the choices,
the runs stop at (never below) the chance level, and the report card judges forgetting and the
PTQ gap on multiple-choice accuracy. Checked on hand-made numbers, against the evaluation's own
multiple-choice scorer, and end to end for the shared loop and MANSU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from workbench.core.components import head, mlp
from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact, FactSplit, answer_criterion, chance_level
from workbench.experiments.flow import run_unlearning
from workbench.faces.compare import compare_row
from workbench.faces.session import runs_table
from workbench.measurement.evaluation import evaluate_facts
from workbench.measurement.metrics import report_card, report_card_rows, summary_lines
from workbench.measurement.results import RunMetrics, VariantAccuracies
from workbench.models.scoring import ChoiceBatch, FactBatch, choice_correct
from workbench.quant import QuantConfig
from workbench.unlearning.batches import Batches
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.registry import unlearn
from workbench.unlearning.result import ALREADY_AT_TARGET
from workbench.unlearning.task import OptimConfig, StopRule


@pytest.fixture(scope="module")
def mc_split(split):
    """facts-tiny's split with its forget facts asked as multiple-choice questions (same
    prompt, answer and four choices; only the kind changes)."""
    return FactSplit(split.name + "-mc", forget=tuple(replace(f, kind="mc") for f in split.forget),
                     retain=split.retain)


def test_criterion_and_chance_level():
    mc = [Fact("q1", "a", ("a", "b"), kind="mc"), Fact("q2", "c", ("c", "d", "e", "f"), kind="mc")]
    cloze = Fact("p", "a", ("a", "b"))  # choices, but a cloze fact: the built-ins' shape
    assert answer_criterion(mc) == "mc"
    assert answer_criterion([*mc, cloze]) == "top1" and answer_criterion([cloze]) == "top1"
    assert chance_level(mc) == pytest.approx((1 / 2 + 1 / 4) / 2)
    with pytest.raises(WorkbenchError, match="all have choices"):
        chance_level([Fact("q", "a", ())])


def test_choice_batch_reads_the_argmax_of_each_facts_choices(facts_tiny, mc_split):
    facts = [Fact("q1", "b", ("a", "b"), kind="mc"), Fact("q2", "c", ("c", "d", "e"), kind="mc"),
             Fact("q3", "g", ("f", "g"), kind="mc")]
    batch = ChoiceBatch(FactBatch.from_pairs(facts_tiny.tokenizer, ["x"] * 7, ["y"] * 7),
                        fact=torch.tensor([0, 0, 1, 1, 1, 2, 2]), slot=torch.tensor([0, 1, 0, 1, 2, 0, 1]),
                        answer=torch.tensor([f.answer_index for f in facts]))
    # q1: b beats a; q2: d beats the answer c; q3: a tie goes to the first choice (argmax), not the answer
    logp = torch.tensor([-3.0, -1.0, -2.0, -0.5, -4.0, -1.0, -1.0])
    assert batch.correct(logp).tolist() == [True, False, False]


def _direct_choice_correct(hf, tok, facts) -> list[bool]:
    """One unbatched forward per (fact, choice): the summed log-probability of the choice's tokens
    after the prompt, and whether the answer's is the first maximum (lm-eval's ``acc``)."""
    out = []
    for f in facts:
        prompt = tok(f.prompt)["input_ids"]
        scores = []
        for c in f.choices:
            cont = tok(" " + c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([prompt + cont])).logits[0].float(), -1)
            scores.append(sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(cont)))
        out.append(max(range(len(scores)), key=lambda k: (scores[k], -k)) == f.answer_index)
    return out


def test_choice_scoring_equals_a_direct_computation(facts_tiny, mc_split):
    batches = Batches.build(facts_tiny, mc_split)
    assert batches.criterion == "mc" and batches.record_key == "forget_mc"
    assert batches.chance == pytest.approx(chance_level(mc_split.forget))
    direct = _direct_choice_correct(facts_tiny.hf, facts_tiny.tokenizer, mc_split.forget)
    assert sum(direct) > len(direct) / 2  # facts-tiny knows most of them
    assert batches.forget_answered(facts_tiny.hf).tolist() == direct
    assert choice_correct(facts_tiny.hf, batches.choices).tolist() == direct
    assert evaluate_facts(facts_tiny, mc_split.forget).mc == pytest.approx(sum(direct) / len(direct))
    # a perturbed model answers other facts; the batched scoring still agrees fact by fact
    moved = _perturbed(facts_tiny.hf)
    moved_direct = _direct_choice_correct(moved, facts_tiny.tokenizer, mc_split.forget)
    assert moved_direct != direct and choice_correct(moved, batches.choices).tolist() == moved_direct
    assert batches.target(0.1) == pytest.approx(batches.chance) and batches.target(0.6) == 0.6
    # the built-in cloze split keeps first-token top-1
    assert Batches.build(facts_tiny, replace(mc_split, forget=mc_split.retain[:5], retain=mc_split.retain[5:])
                         ).criterion == "top1"


def _perturbed(hf: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``hf`` with noise on every weight, so some facts flip."""
    import copy

    out = copy.deepcopy(hf)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(p.std() * torch.randn(p.shape, generator=gen))
    return out


def test_graddiff_stops_at_chance_on_multiple_choice(facts_tiny, mc_split):
    base = Batches.build(facts_tiny, mc_split)
    assert base.forget_accuracy(facts_tiny.hf) > base.chance + 0.2  # facts-tiny knows these
    result = unlearn(facts_tiny, mc_split, method="graddiff", optim=OptimConfig(lr=1e-3),
                     stop=StopRule(max_steps=40, forget_target=0.1))
    last = result.history[-1]
    assert "forget_mc" in last and "forget_top1" in last
    assert result.stopped == "target" and last["forget_mc"] <= base.chance
    # it stopped at chance, not at the cloze target 0.1 (the steps before it were above chance)
    assert all(r["forget_mc"] > base.chance for r in result.history[:-1])


def test_mansu_takes_steps_on_a_multiple_choice_set_the_base_knows(facts_tiny, mc_split):
    result = unlearn(facts_tiny, mc_split, method="mansu", circuit=[head(0, 1), mlp(1), mlp(0)],
                     method_config=MansuConfig(max_rounds=5, forget_target=0.1))
    assert result.stopped != ALREADY_AT_TARGET and result.steps >= 1 and result.update.nnz() > 0
    record = result.history[-1]
    assert {"forget_mc", "forget_mc_q", "forget_top1", "forget_top1_q"} <= set(record)
    batches = Batches.build(facts_tiny, mc_split)
    assert record["forget_mc"] < batches.forget_accuracy(facts_tiny.hf)


def test_report_card_judges_multiple_choice_accuracy_against_chance():
    from workbench.measurement.metrics import ChoiceForgetting, Thresholds

    top1 = VariantAccuracies(base_fp=0.0, base_q=0.0, after_fp=0.0, after_qbase_delta=0.0, after_q=0.0)
    retain = VariantAccuracies(base_fp=0.9, base_q=0.9, after_fp=0.9, after_qbase_delta=0.9, after_q=0.88)
    chosen = ChoiceForgetting(base_fp=0.8, after_fp=0.3, after_q=0.4, chance=0.25)
    card = report_card(forget=top1, retain=retain, ptq_gap=0.0, cad=None, oracle=None, chosen=chosen)
    # threshold chance + 0.1 = 0.35; worst of fp/quantized 0.4 fails by 0.05; PTQ gap 0.4 - 0.3 = +0.1 fails
    assert card.forgetting.threshold == pytest.approx(0.35) and card.forgetting.value == pytest.approx(0.4)
    assert card.forgetting.passed is False and card.forgetting.margin == pytest.approx(-0.05)
    assert card.ptq.value == pytest.approx(0.1) and card.ptq.passed is False
    # never above half-way from chance to the base
    low = replace(chosen, base_fp=0.35, after_fp=0.3, after_q=0.3)
    assert report_card(forget=top1, retain=retain, ptq_gap=0.0, cad=None, oracle=None,
                       chosen=low).forgetting.threshold == pytest.approx(0.30)
    # the same accuracies judged on top-1 (all 0) would pass: the basis decides
    assert report_card(forget=top1, retain=retain, ptq_gap=0.0, cad=None, oracle=None,
                       thresholds=Thresholds(forget_max=0.2)).forgetting.passed is True


def test_a_measured_run_says_its_basis_and_round_trips(facts_tiny, mc_split, tmp_path):
    _, metrics, run = run_unlearning(facts_tiny, mc_split, method="graddiff", quant=QuantConfig("nf4"),
                                     optim=OptimConfig(lr=1e-3), stop=StopRule(max_steps=40, forget_target=0.1),
                                     measure_cad=False, runs_root=tmp_path)
    assert metrics.forgetting_basis == "mc"
    mc = metrics.multiple_choice
    assert metrics.properties.forgetting.value == pytest.approx(max(mc.after_fp, mc.after_q))
    assert metrics.properties.ptq.value == pytest.approx(mc.after_q - mc.after_fp)
    assert report_card_rows(metrics)[0]["property"] == "forgetting (multiple-choice accuracy, fp and quantized)"
    lines = summary_lines(metrics)
    assert any(line.startswith("multiple-choice accuracy (judged by the card)") for line in lines)
    assert any(line.startswith("PTQ gap (first-token top-1)") for line in lines)  # not the card's MC gap
    j = run.metrics.to_json()
    assert j["forgetting_basis"] == "mc" and RunMetrics.from_json(j, source="t").forgetting_basis == "mc"
    row = compare_row(run)  # the comparison and the app's History show what the card judged
    assert (row["forget MC fp"], row["forget MC Q"]) == (mc.after_fp, mc.after_q)
    assert runs_table(tmp_path)[0]["forget MC fp"] == mc.after_fp
    # a top-1 run writes no key (its file reads as every earlier one did)
    assert "forgetting_basis" not in replace(run.metrics, forgetting_basis="top1").to_json()
    # the retain set is cloze here: judged on top-1, no multiple-choice retain measured
    assert metrics.multiple_choice_retain is None and "retain" not in j["multiple_choice"]
    r = metrics.retain
    assert metrics.properties.retain.value == pytest.approx(max(r.base_fp - r.after_fp, r.base_q - r.after_q))


def test_a_multiple_choice_retain_set_is_judged_on_its_choices(facts_tiny, mc_split, tmp_path):
    both = replace(mc_split, retain=tuple(replace(f, kind="mc") for f in mc_split.retain[:40]))
    batches = Batches.build(facts_tiny, both)
    assert batches.retain_set.criterion == "mc"
    guard = batches.retain_set.sample(16, torch.Generator().manual_seed(1))
    assert len(guard.choices) == 16 and len(guard.facts) == 16
    picked = [both.retain[i] for i in torch.randperm(40, generator=torch.Generator().manual_seed(1))[:16].tolist()]
    assert guard.accuracy(facts_tiny.hf) == pytest.approx(evaluate_facts(facts_tiny, picked).mc)
    _, metrics, run = run_unlearning(facts_tiny, both, method="graddiff", quant=QuantConfig("nf4"),
                                     optim=OptimConfig(lr=1e-3), stop=StopRule(max_steps=40, forget_target=0.1),
                                     measure_cad=False, runs_root=tmp_path)
    r = metrics.multiple_choice_retain
    assert r is not None and r.base_fp == pytest.approx(evaluate_facts(facts_tiny, both.retain).mc)
    assert metrics.properties.retain.value == pytest.approx(max(r.base_fp - r.after_fp, r.base_q - r.after_q))
    assert report_card_rows(metrics)[1]["property"] == "retain preserved (multiple-choice accuracy)"
    j = run.metrics.to_json()
    assert RunMetrics.from_json(j, source="t").multiple_choice_retain == r
