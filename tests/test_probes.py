"""Robustness probes: AUC and PrivLeak against their definitions, the relearning attack's halves
and effect, the paraphrase probe against direct evaluation, and ``workbench probe``."""

from __future__ import annotations

import json

import pytest
import torch

from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact
from workbench.experiments.flow import run_unlearning
from workbench.faces.cli import main
from workbench.measurement.evaluation import evaluate_facts
from workbench.measurement.probes import (
    answer_losses,
    auc,
    counterfactual_twins,
    forget_halves,
    membership_inference,
    paraphrase_probe,
    privleak,
    relearning_attack,
)
from workbench.models.update import Update
from workbench.quant import QuantConfig
from workbench.unlearning.registry import unlearn
from workbench.unlearning.task import OptimConfig, StopRule

NF4 = QuantConfig("nf4")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unlearned(facts_tiny, split):
    return unlearn(facts_tiny, split, method="graddiff", optim=OptimConfig(lr=3e-3), stop=StopRule(max_steps=20)).update


def test_auc_is_the_mann_whitney_statistic():
    members = torch.tensor([3.0, 1.0, 2.0])
    non = torch.tensor([0.0, 2.0])
    # pairs (m > n): 3>0,3>2,1>0,2>0 = 4; ties 2==2 = ½ -> 4.5 / 6
    assert auc(members, non) == pytest.approx(4.5 / 6)
    assert auc(torch.tensor([5.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    with pytest.raises(WorkbenchError):
        auc(torch.tensor([]), non)
    assert privleak(0.6, 0.5) == pytest.approx(20.0)
    assert privleak(0.4, 0.5) == pytest.approx(-20.0)
    assert privleak(0.7, 0.0) is None


def test_counterfactual_twins_keep_the_prompt_and_change_the_answer(split):
    twins = counterfactual_twins(split.forget)
    assert len(twins) == len(split.forget)
    for f, t in zip(split.forget, twins):
        assert t.prompt == f.prompt and t.answer != f.answer
        assert t.answer in f.choices
    plain = [Fact("w1 w2", "a", ()), Fact("w3 w4", "a", ()), Fact("w5", "b", ())]
    assert [t.answer for t in counterfactual_twins(plain)] == ["b", "b", "a"]
    with pytest.raises(WorkbenchError, match="two different answers"):
        counterfactual_twins([Fact("w1", "a", ()), Fact("w2", "a", ())])


def test_membership_inference_against_the_oracle(facts_tiny, split, unlearned):
    from workbench.models.loading import load_model

    oracle = load_model("facts-tiny-oracle")
    result = membership_inference(facts_tiny, unlearned, split, oracle, quant=NF4)
    # recompute the full-precision numbers by the definitions
    twins = counterfactual_twins(split.forget)
    after = unlearned.apply(facts_tiny)

    def by_hand(m):
        tok = facts_tiny.tokenizer
        return auc(-answer_losses(m, split.forget, tok), -answer_losses(m, twins, tok))

    fp = result["fp"]
    assert fp["auc"] == by_hand(after) and fp["auc_oracle"] == by_hand(oracle) and fp["auc_base"] == by_hand(facts_tiny)
    assert fp["privleak"] == pytest.approx((fp["auc"] - fp["auc_oracle"]) / fp["auc_oracle"] * 100)
    # the base knows its forget facts: members separate from their false twins; the oracle never saw them
    assert fp["auc_base"] > 0.9 and fp["auc_oracle"] < fp["auc_base"]
    assert set(result["quantized"]) == set(fp)


def test_relearning_attack_uses_disjoint_halves_and_leaves_inputs_alone(facts_tiny, split, unlearned):
    a, b = forget_halves(len(split.forget), seed=3)
    assert len(a) + len(b) == len(split.forget) and not set(a.tolist()) & set(b.tolist())
    before = facts_tiny.weights_hash()
    snapshot = {n: d.clone() for n, d in unlearned.deltas.items()}
    result = relearning_attack(facts_tiny, split, unlearned, quant=NF4, steps=5, lr=3e-3)
    assert facts_tiny.weights_hash() == before
    assert all(torch.equal(snapshot[n], d) for n, d in unlearned.deltas.items())
    assert result["n_train"] + result["n_eval"] == len(split.forget)
    held = [split.forget[i] for i in forget_halves(len(split.forget), 0)[1].tolist()]
    assert result["fp"]["unlearned"] == evaluate_facts(unlearned.apply(facts_tiny), held, multiple_choice=False).top1
    for k in ("fp", "quantized"):
        r = result[k]
        assert r["recovery"] == pytest.approx(r["relearned"] - r["unlearned"])
    # relearning on the attacker's half raises the training facts' accuracy (the attack does something)
    assert result["train_top1_after_relearn"] > result["fp"]["unlearned"]
    with pytest.raises(WorkbenchError, match="steps"):
        relearning_attack(facts_tiny, split, unlearned, quant=NF4, steps=0)


def test_paraphrase_probe_matches_direct_evaluation(facts_tiny, split, unlearned):
    result = paraphrase_probe(facts_tiny, split, unlearned, NF4)
    assert set(result) == {"forget_paraphrase", "retain_paraphrase"}
    direct = evaluate_facts(unlearned.apply(facts_tiny), split.forget_paraphrase, multiple_choice=False).top1
    assert result["forget_paraphrase"]["after_fp"] == direct
    empty = Update({})
    same = paraphrase_probe(facts_tiny, split, empty, NF4)["forget_paraphrase"]
    assert same["after_fp"] == same["base_fp"] and same["after_q"] == same["base_q"]


def test_cli_probe(capsys, facts_tiny, split, tmp_path):
    _, _, run = run_unlearning(facts_tiny, split, method="ga", optim=OptimConfig(lr=3e-3), stop=StopRule(max_steps=3),
                               measure_cad=False, runs_root=str(tmp_path))
    capsys.readouterr()
    code = main(["probe", run.id, "--runs-root", str(tmp_path), "--relearn-steps", "3", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["run_id"] == run.id and data["method"] == "ga"
    assert data["relearning"]["steps"] == 3
    assert set(data["membership"]) >= {"fp", "quantized"}
    assert data["paraphrase"]["forget_paraphrase"]["after_fp"] == pytest.approx(
        run.metrics.paraphrase.forget.after_fp)
    code = main(["probe", str(run.path), "--relearn-steps", "2"])  # the run's directory works as well as its id
    out, _ = capsys.readouterr()
    assert code == 0 and f"probes of run {run.id}:" in out and "PrivLeak %" in out and "recovery" in out
    code = main(["probe", "missing-run", "--runs-root", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 1 and "no run 'missing-run'" in err
