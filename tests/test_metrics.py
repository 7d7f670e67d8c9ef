"""measure_update: every metrics.json number the issue asks for, cross-checked against independent
computations (evaluation of the variants, the real quantizer), and the report card's logic."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.core.components import all_components
from workbench.core.errors import WorkbenchError
from workbench.core.memo import clear_base_memo
from workbench.measurement.evaluation import evaluate_facts
from workbench.measurement.metrics import Thresholds, build_variants, measure_update, quantized_base, report_card
from workbench.measurement.results import (
    CadScores,
    OracleAccuracies,
    RunMetrics,
    UpdateMetrics,
    VariantAccuracies,
)
from workbench.models.update import Update
from workbench.quant import QuantConfig, quantize_dequantize, transposed_parameters
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.registry import unlearn
from workbench.unlearning.task import OptimConfig, StopRule

NF4 = QuantConfig("nf4")


@pytest.fixture(scope="module")
def split(facts_tiny):
    from workbench.models.builtin_splits import builtin_split

    return builtin_split(facts_tiny)


@pytest.fixture(scope="module")
def mansu_measured(facts_tiny, split):
    circuit = all_components(facts_tiny.n_layers, facts_tiny.n_heads, include_embed=False)
    result = unlearn(facts_tiny, split, method="mansu", quant=NF4, circuit=circuit,
                     method_config=MansuConfig(params_per_round=16, max_rounds=3, fisher_samples=32))
    before = facts_tiny.weights_hash()
    metrics = measure_update(facts_tiny, split, result.update, quant=NF4, circuit=circuit)
    return result, metrics, before == facts_tiny.weights_hash()


@pytest.fixture(scope="module")
def graddiff_measured(facts_tiny, split):
    """A dense baseline update that really moves the forget accuracy (non-trivial PTQ numbers)."""
    result = unlearn(facts_tiny, split, method="graddiff", optim=OptimConfig(lr=1e-3),
                     stop=StopRule(max_steps=3, forget_target=None))
    metrics = measure_update(facts_tiny, split, result.update, quant=NF4, cad=False)
    return result, metrics


REQUIRED = {
    "quant", "forget", "retain", "paraphrase", "multiple_choice", "ptq_gap", "ptq_gap_decomposition",
    "bucket_overlap", "code_overlap", "codes_changed", "codes_changed_fraction", "params_changed",
    "params_changed_unquantized", "moved_code_changed_fraction", "absmax_changes", "update_to_bin_width",
    "update_norm", "quantization", "retain_kl", "cad", "properties", "exact", "logprob",
}


def test_measure_update_reports_every_key(mansu_measured):
    _result, m, untouched = mansu_measured
    assert untouched, "measure_update modified the base model"
    assert isinstance(m, UpdateMetrics)
    j = m.to_json()
    assert set(j) == REQUIRED
    assert j["quant"] == {"type": "nf4", "blocksize": 64, "double_quant": False,
                          "include_embeddings": False, "include_lm_head": False}
    for variant in ("base_fp", "base_q", "after_fp", "after_q", "after_qbase_delta"):
        assert 0.0 <= j["forget"][variant] == getattr(m.forget, variant) <= 1.0
        assert 0.0 <= j["retain"][variant] == getattr(m.retain, variant) <= 1.0
    assert set(j["update_to_bin_width"]) == {"median", "p90"}
    assert set(j["cad"]) == {"fp", "quantized", "fp_detail", "quantized_detail"}
    assert set(j["properties"]) == {"forgetting", "retain", "ptq", "structural"}
    for name, prop in m.properties.items():
        assert j["properties"][name] == {"pass": prop.passed, "margin": prop.margin, "threshold": prop.threshold,
                                         "value": prop.value}
        assert isinstance(prop.passed, bool)
    assert set(j["paraphrase"]) == {"forget_paraphrase", "retain_paraphrase"}


def test_mansu_quantization_numbers_match_the_floor(facts_tiny, mansu_measured):
    result, m, _ = mansu_measured
    nnz = result.update.nnz()
    assert nnz > 0
    assert m.params_changed == nnz
    assert m.params_changed_unquantized == 0
    assert m.codes_changed == nnz, "every weight MANSU moves must change its NF4 code"
    assert m.moved_code_changed_fraction == 1.0
    assert m.absmax_changes == 0
    n_weights = m.quantization["overall"]["n_weights"]
    assert m.codes_changed_fraction == pytest.approx(nnz / n_weights)
    assert m.code_overlap == pytest.approx(1 - nnz / n_weights)
    assert m.bucket_overlap <= m.code_overlap < 1.0
    # floor-sized moves: |Δw| is of the order of a bin width, not a sliver of one
    assert m.update_to_bin_width.median > 0.4
    assert m.update_to_bin_width.p90 >= m.update_to_bin_width.median
    assert m.update_norm == pytest.approx(result.update.norm())
    assert m.retain_kl >= 0.0
    assert 0.0 <= m.cad.fp <= 1.0 and 0.0 <= m.cad.quantized <= 1.0


def test_ptq_gap_and_its_decomposition(graddiff_measured):
    _, m = graddiff_measured
    f = m.forget
    # part-way (here: about half the forget facts still right), so the variants can disagree
    assert 0.0 < f.after_fp < f.base_fp, "the baseline update did not move forget accuracy part-way"
    assert m.ptq_gap == pytest.approx(f.after_q - f.after_fp, abs=1e-12)
    d = m.ptq_gap_decomposition
    assert d.base_shift == pytest.approx(f.after_qbase_delta - f.after_fp, abs=1e-12)
    assert d.rounding == pytest.approx(f.after_q - f.after_qbase_delta, abs=1e-12)
    assert d.base_shift + d.rounding == pytest.approx(m.ptq_gap, abs=1e-12)
    assert m.cad is None and "cad" not in m.to_json() and m.properties.structural.passed is None
    # A dense update moves almost every block's absmax: bucket overlap far below code overlap.
    assert m.absmax_changes > 0
    assert m.bucket_overlap < m.code_overlap


def test_variants_and_gap_decomposition_with_distinct_accuracies(toy_gpt2, monkeypatch):
    """Give each of the five variants its own forget accuracy (identified by its weights, built
    here independently) so every difference in the decomposition is distinct and non-zero."""
    import workbench.measurement.metrics as metrics_mod
    from workbench.data.facts import Fact, FactSplit
    from workbench.measurement.evaluation import FactScores

    name = "transformer.h.0.mlp.c_fc.weight"
    base = toy_gpt2.state()[name]
    delta = 0.3 * torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    update = Update({name: delta})
    q = lambda w: quantize_dequantize(w, NF4, transposed=True)  # noqa: E731  (GPT-2 Conv1D)
    expected = {"base_fp": base, "base_q": q(base), "after_fp": base + delta,
                "after_qbase_delta": q(base) + delta, "after_q": q(base + delta)}
    assert all(not torch.equal(expected[a], expected[b]) for a in expected for b in expected if a < b)
    forget_acc = {"base_fp": 1.0, "base_q": 0.875, "after_fp": 0.25, "after_qbase_delta": 0.375, "after_q": 0.625}
    retain_acc = {"base_fp": 0.9, "base_q": 0.8, "after_fp": 0.7, "after_qbase_delta": 0.6, "after_q": 0.5}

    def fake_evaluate(model, facts, multiple_choice=True, **_):
        w = model.state()[name]
        (variant,) = [k for k, v in expected.items() if torch.equal(w, v)]
        table = forget_acc if facts[0].prompt.startswith("w1 ") else retain_acc
        return FactScores(top1=table[variant], mc=float("nan"), mean_prob=0.5, n=len(facts))

    monkeypatch.setattr(metrics_mod, "evaluate_facts", fake_evaluate)
    split = FactSplit("toy", forget=(Fact("w1 w2", "w3", ()),), retain=(Fact("w4 w5", "w6", ()),))
    m = measure_update(toy_gpt2, split, update, quant=NF4, cad=False)
    assert m.forget.by_variant() == forget_acc
    assert m.retain.by_variant() == retain_acc
    assert m.ptq_gap == pytest.approx(0.625 - 0.25)
    assert m.ptq_gap_decomposition.base_shift == pytest.approx(0.375 - 0.25)
    assert m.ptq_gap_decomposition.rounding == pytest.approx(0.625 - 0.375)
    assert m.multiple_choice.after_q is None  # NaN is reported as null
    assert m.to_json()["multiple_choice"]["forget"]["after_q"] is None
    assert m.properties.ptq.passed is False
    assert m.properties.retain.value == pytest.approx(0.3)  # max(0.9-0.7, 0.8-0.5)


def test_variant_accuracies_match_independent_evaluation(facts_tiny, split, graddiff_measured):
    result, m = graddiff_measured
    update = result.update
    tr = transposed_parameters(facts_tiny.hf)
    base = facts_tiny.state()
    after_fp = update.apply(facts_tiny)
    names = [n for n in base if n.endswith("weight") and n in update.deltas and n != "transformer.wte.weight"]
    assert names
    after_q_state = {n: quantize_dequantize(base[n] + update.deltas[n], NF4, transposed=n in tr) for n in names}
    variants = build_variants(facts_tiny, update, NF4)
    torch.testing.assert_close(variants["after_q"].state()[names[0]], after_q_state[names[0]], rtol=0, atol=0)

    def top1(model, facts):
        return evaluate_facts(model, facts, multiple_choice=False).top1

    assert m.forget.base_fp == top1(facts_tiny, split.forget)
    assert m.forget.after_fp == top1(after_fp, split.forget)
    assert m.retain.after_fp == top1(after_fp, split.retain)
    assert m.forget.after_q == top1(variants["after_q"], split.forget)


def _count_base_work(monkeypatch) -> tuple[list[str], list[str]]:
    """The names of the models the measurement evaluates and attributes (metrics calls the
    evaluate_facts and attribute it imported), in call order."""
    import workbench.measurement.metrics as metrics_mod

    evaluated: list[str] = []
    attributed: list[str] = []
    real_evaluate, real_attribute = metrics_mod.evaluate_facts, metrics_mod.attribute
    monkeypatch.setattr(metrics_mod, "evaluate_facts",
                        lambda m, facts, **kw: evaluated.append(m.name) or real_evaluate(m, facts, **kw))
    monkeypatch.setattr(metrics_mod, "attribute",
                        lambda m, facts, *a, **kw: attributed.append(m.name) or real_attribute(m, facts, *a, **kw))
    return evaluated, attributed


def test_base_measurements_are_memoised_per_model_and_quantizer(facts_tiny, split, monkeypatch):
    """A second update on the same model re-measures only its own variants; the base numbers
    (w, Q(w), their attributions) are reused and equal; another quantizer recomputes Q(w)."""
    evaluated, attributed = _count_base_work(monkeypatch)
    name = "transformer.h.1.mlp.c_fc.weight"
    delta = torch.zeros_like(facts_tiny.state()[name])
    delta[:4, :4] = 0.5
    circuit = all_components(facts_tiny.n_layers, facts_tiny.n_heads, include_embed=False)
    first = measure_update(facts_tiny, split, Update({name: delta}), quant=NF4, circuit=circuit)
    n_sets = sum(1 for s in (split.forget, split.retain, split.forget_paraphrase, split.retain_paraphrase) if s)
    assert len(evaluated) == 5 * n_sets and len(attributed) == 4
    evaluated.clear()
    attributed.clear()
    second = measure_update(facts_tiny, split, Update({name: 2 * delta}), quant=NF4, circuit=circuit)
    assert len(evaluated) == 3 * n_sets, "the base variants were evaluated again"
    assert facts_tiny.name not in evaluated
    assert len(attributed) == 2, "the base attributions were recomputed"
    for key in ("base_fp", "base_q"):
        assert getattr(second.forget, key) == getattr(first.forget, key)
        assert getattr(second.retain, key) == getattr(first.retain, key)
    assert second.update_norm == pytest.approx(2 * first.update_norm)  # the after side is its own
    # the memoised numbers are the ones a fresh measurement gives
    clear_base_memo()
    fresh = measure_update(facts_tiny, split, Update({name: 2 * delta}), quant=NF4, circuit=circuit)
    assert fresh.forget == second.forget and fresh.retain == second.retain
    assert fresh.cad.fp == pytest.approx(second.cad.fp)
    # another quantizer is another Q(w)
    evaluated.clear()
    measure_update(facts_tiny, split, Update({name: delta}), quant=QuantConfig("fp4"), cad=False)
    assert len(evaluated) == 5 * n_sets


def test_base_scores_are_the_setups_and_the_measurements_and_taken_ahead_of_a_run(facts_tiny, split, monkeypatch):
    """The app's setup reads top-1 from base_scores, and base_measurement takes ahead of any run
    what a measurement reads from the base alone: the scores equal the plain evaluations (setup's
    fake-quantized copy for Q(w); multiple choice added to the memoised scores equals scoring with
    it), and a measurement after base_measurement evaluates and attributes only the update's
    variants, with metrics equal to a cold measurement's."""
    from dataclasses import asdict

    import workbench.measurement.metrics as metrics_mod
    from workbench.measurement.evaluation import evaluate_split
    from workbench.measurement.metrics import base_measurement, base_scores

    def fields_of(scores):  # every field, correct included; nan (no multiple choice) equal to nan
        return {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(scores).items()}

    def same(a, b):
        return a.keys() == b.keys() and all(fields_of(a[k]) == fields_of(b[k]) for k in a)

    plain = base_scores(facts_tiny, split, NF4, multiple_choice=False)
    assert same(plain["base_fp"], evaluate_split(facts_tiny, split, multiple_choice=False))
    assert same(plain["base_q"], evaluate_split(facts_tiny, split, quant=NF4, multiple_choice=False))
    with_mc = base_scores(facts_tiny, split, NF4)
    q_model = facts_tiny.with_state(quantized_base(facts_tiny, NF4), "q")
    for vname, model in (("base_fp", facts_tiny), ("base_q", q_model)):
        expected = evaluate_facts(model, split.forget, multiple_choice=True)
        assert fields_of(with_mc[vname]["forget"]) == fields_of(expected)
        assert not math.isnan(with_mc[vname]["forget"].mc) and math.isnan(with_mc[vname]["retain"].mc)
    with pytest.raises(WorkbenchError, match="not a base variant"):
        base_scores(facts_tiny, split, NF4, variants=("after_q",))

    name = "transformer.h.1.mlp.c_fc.weight"
    delta = torch.zeros_like(facts_tiny.state()[name])
    delta[:4, :4] = 0.5
    circuit = all_components(facts_tiny.n_layers, facts_tiny.n_heads, include_embed=False)
    cold = measure_update(facts_tiny, split, Update({name: delta}), quant=NF4, circuit=circuit)
    clear_base_memo()
    base_measurement(facts_tiny, split, NF4)
    evaluated, attributed = _count_base_work(monkeypatch)
    monkeypatch.setattr(metrics_mod, "multiple_choice_accuracy", lambda *a, **kw: pytest.fail("base MC again"))
    warm = measure_update(facts_tiny, split, Update({name: delta}), quant=NF4, circuit=circuit)
    n_sets = sum(1 for s in (split.forget, split.retain, split.forget_paraphrase, split.retain_paraphrase) if s)
    assert len(evaluated) == 3 * n_sets and facts_tiny.name not in evaluated
    assert len(attributed) == 2
    assert warm == cold


def test_the_retain_kl_shares_the_after_evaluations_forwards_with_the_same_numbers(facts_tiny, split, monkeypatch):
    """w+Δ's retain prompts run once for its evaluation and the retain KL: reads taken by the KL's
    walk change no number of the evaluation (equal to taking them again), reads of another fact
    set are refused, and the measurement never holds a set's [n, vocab] logits whole."""
    import workbench.measurement.evaluation as evaluation_mod
    from workbench.measurement.evaluation import retain_reads_and_kl
    from workbench.measurement.metrics import retain_kl

    name = "transformer.h.1.mlp.c_fc.weight"
    delta = torch.zeros_like(facts_tiny.state()[name])
    delta[:4, :4] = 0.5
    after = facts_tiny.with_state({name: facts_tiny.state()[name] + delta}, "after")
    reads, kl = retain_reads_and_kl(facts_tiny, after, split.retain)
    given = evaluate_facts(after, split.retain, first_token=reads)
    again = evaluate_facts(after, split.retain)
    assert (given.top1, given.exact, given.logprob, given.mean_prob, given.correct) == (
        again.top1, again.exact, again.logprob, again.mean_prob, again.correct)
    assert kl == retain_kl(facts_tiny, after, split.retain) > 0
    with pytest.raises(WorkbenchError, match="first_token must read"):
        evaluate_facts(after, split.retain[:-1], first_token=reads)
    # in the measurement: each set of the retain set's size runs once per variant, and the retain
    # set once more for the base's side of the KL; w+Δ's run serves its evaluation and the KL
    sets = (split.forget, split.retain, split.forget_paraphrase, split.retain_paraphrase)
    like_retain = sum(1 for f in sets if f and len(f) == len(split.retain))
    runs: list[int] = []
    real = evaluation_mod.last_token_logit_chunks
    monkeypatch.setattr(evaluation_mod, "last_token_logit_chunks",
                        lambda hf, ids, *a, **kw: runs.append(len(ids)) or real(hf, ids, *a, **kw))

    def whole(*args, **kwargs):
        raise AssertionError("the measurement took a fact set's [n, vocab] logits whole")

    monkeypatch.setattr(evaluation_mod, "last_token_logits", whole)
    measure_update(facts_tiny, split, Update({name: delta}), quant=NF4, cad=False)
    assert runs.count(len(split.retain)) == 5 * like_retain + 1


def test_measure_update_refuses_an_update_for_another_model(facts_tiny, split):
    with pytest.raises(WorkbenchError, match="does not have"):
        measure_update(facts_tiny, split, Update({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}),
                       quant=NF4, cad=False)


def _synthetic(forget, retain, ptq_gap, cad=None, oracle=None, thresholds=Thresholds()):
    """The report card of made-up accuracies ((base_fp, base_q, after_fp, after_q) per set)."""

    def accuracies(values):
        base_fp, base_q, after_fp, after_q = values
        return VariantAccuracies(base_fp=base_fp, base_q=base_q, after_fp=after_fp, after_qbase_delta=after_fp,
                                 after_q=after_q)

    return report_card(forget=accuracies(forget), retain=accuracies(retain), ptq_gap=ptq_gap,
                       cad=None if cad is None else CadScores(fp=cad[0], quantized=cad[1], fp_detail={},
                                                               quantized_detail={}),
                       oracle=None if oracle is None else OracleAccuracies(forget_fp=oracle, retain_fp=1.0),
                       thresholds=thresholds)


def test_report_card_logic():
    card = _synthetic(forget=(1.0, 1.0, 0.1, 0.15), retain=(0.9, 0.88, 0.87, 0.86), ptq_gap=0.05, cad=(0.3, 0.2))
    # forgetting: worst of fp and quantized (0.15) against 0.2 (no oracle)
    assert card.forgetting.passed is True
    assert card.forgetting.margin == pytest.approx(0.05)
    # retain: worst drop over fp (0.03) and quantized (0.02) against 0.05
    assert card.retain.passed is True and card.retain.value == pytest.approx(0.03)
    # ptq: a positive gap fails the non-positive-gap property
    assert card.ptq.passed is False and card.ptq.margin == pytest.approx(-0.05)
    # structural: worst CAD (0.2) >= 0.1
    assert card.structural.passed is True and card.structural.margin == pytest.approx(0.1)
    assert [p.verdict for _, p in card.items()] == ["PASS", "PASS", "fail", "PASS"] and card.passes() == 3
    # the forget threshold never exceeds half the base's forget accuracy
    low = _synthetic((0.3, 0.3, 0.16, 0.16), (1, 1, 1, 1), 0.0)
    assert low.forgetting.threshold == pytest.approx(0.15) and low.forgetting.passed is False
    # with an oracle the threshold follows it (capped the same way)
    with_oracle = _synthetic((1.0, 1.0, 0.3, 0.3), (1, 1, 1, 1), 0.0, oracle=0.25)
    assert with_oracle.forgetting.threshold > 0.25 and with_oracle.forgetting.passed is True
    explicit = _synthetic((1.0, 1.0, 0.3, 0.3), (1, 1, 1, 1), -0.1, thresholds=Thresholds(forget_max=0.25))
    assert explicit.forgetting.passed is False and explicit.ptq.passed is True
    # retain drop measured in each precision against the base in the same precision
    drop_q = _synthetic((1, 1, 0, 0), (0.9, 0.8, 0.9, 0.7), 0.0)
    assert drop_q.retain.value == pytest.approx(0.1) and drop_q.retain.passed is False
    no_cad = _synthetic((1, 1, 0, 0), (1, 1, 1, 1), 0.0)
    assert no_cad.structural.passed is None and no_cad.structural.verdict == "–"
    assert no_cad.to_json()["structural"] == {"pass": None, "margin": None, "threshold": 0.1, "value": None}


def _as_run(measured, **run):
    """``measured`` as a run's metrics (the bookkeeping run_unlearning adds), with ``run`` overrides."""
    fields = {"method": "mansu", "model": "facts-tiny", "model_fingerprint": "0" * 16, "split": "s", "n_forget": 1,
              "n_retain": 1, "steps": 1, "stopped": "target", "seconds": 1.0, "unlearning_seconds": None,
              "diagnostics": {}, "circuit": None}
    return RunMetrics.of_update(measured, **{**fields, **run})


def test_summary_says_where_the_time_went(mansu_measured, graddiff_measured):
    from workbench.measurement.metrics import summary_lines

    def time_line(metrics):
        return next(line for line in summary_lines(metrics) if line.startswith("time:"))

    _, metrics, _ = mansu_measured
    timed = _as_run(metrics, seconds=5.0, unlearning_seconds=3.14159,
                    diagnostics={"seconds_by_phase": {"setup": 2.5, "gradients": 0.0312}})
    # whole tenths from a second up, hundredths below (a short run's phases are not all 0.0)
    assert time_line(timed) == "time: unlearning 3.1 s (setup 2.5, gradients 0.03) · measuring 1.9 s"
    # a real MANSU run names every phase it timed
    result, _, _ = mansu_measured
    real = time_line(_as_run(metrics, seconds=result.seconds + 1.0, unlearning_seconds=result.seconds,
                             diagnostics=result.diagnostics))
    assert result.seconds_by_phase and all(f"{phase} " in real for phase in result.seconds_by_phase)
    # a baseline has no phases: the line has the two totals only
    gd_result, gd_metrics = graddiff_measured
    assert "seconds_by_phase" not in gd_result.diagnostics
    assert time_line(_as_run(gd_metrics, method="graddiff", seconds=2.0, unlearning_seconds=0.5,
                             diagnostics=gd_result.diagnostics)) == "time: unlearning 0.50 s · measuring 1.5 s"
    # runs saved before the unlearning time was recorded get no time line
    assert not any(line.startswith("time:") for line in summary_lines(_as_run(gd_metrics)))


def test_summary_lines_read_the_numbers(run_metrics):
    from workbench.measurement.metrics import summary_lines

    m = run_metrics
    lines = summary_lines(m)
    d = m.ptq_gap_decomposition
    failed = [name for name, p in m.properties.items() if p.passed is False]
    measured = sum(1 for _, p in m.properties.items() if p.passed is not None)
    assert lines[0].startswith(f"passes {measured - len(failed)} of {measured} measured properties; fails "
                               if failed else f"passes all {measured}")
    for name in failed:  # each failed property with how far it is past its threshold
        p = dict(m.properties.items())[name]
        assert f"by {abs(p.margin):.3f} (value" in lines[0]
    assert lines[1] == f"PTQ gap {m.ptq_gap:+.3f} = base shift {d.base_shift:+.3f} + rounding {d.rounding:+.3f}"
    assert f"params changed {m.params_changed:,} · codes changed {m.codes_changed:,}" in lines[2]
    assert any(line.startswith(f"CAD fp {m.cad.fp:.3f} · quantized {m.cad.quantized:.3f} · τ ") for line in lines)
    assert f"retain KL {m.retain_kl:.4g}" in lines


def test_thresholds_are_validated():
    for bad in (dict(forget_max=1.5), dict(retain_tolerance=-0.1), dict(cad_min=2.0)):
        with pytest.raises(WorkbenchError):
            Thresholds(**bad)
    assert Thresholds().cad_min is None  # calibrated on the oracle, else DEFAULT_CAD_MIN


def test_bin_occupancy_before_and_after_match_the_quantizer(facts_tiny, mansu_measured):
    """The occupancy stored in metrics.json equals bin_occupancy of w and of w+Δ (bnb codes)."""
    from workbench.quant import bin_occupancy, code_order, quantizable_parameters

    result, metrics, _ = mansu_measured
    names = quantizable_parameters(facts_tiny.hf, NF4)
    tr = transposed_parameters(facts_tiny.hf)
    order = code_order(NF4).numpy()
    before = bin_occupancy(facts_tiny.state(), names, NF4, transposed=tr, progress=lambda *_: None)
    after = bin_occupancy({**facts_tiny.state(), **result.update.after_state(facts_tiny.state())}, names, NF4,
                          transposed=tr, progress=lambda *_: None)
    overall = metrics.quantization["overall"]
    assert overall["occupancy_before"] == before["overall"][order].tolist()
    assert overall["occupancy_after"] == after["overall"][order].tolist()
    assert sum(overall["occupancy_after"]) == overall["n_weights"]
    # every code change moves one weight out of one bar into another
    moved = sum(abs(a - b) for a, b in zip(overall["occupancy_before"], overall["occupancy_after"], strict=True))
    assert 0 < moved <= 2 * overall["code_flips"]


def test_before_after_figures_draw_the_measured_numbers(mansu_measured, graddiff_measured):
    from workbench.faces import plots
    from workbench.measurement.metrics import report_card_rows

    _, m, _ = mansu_measured
    _, g = graddiff_measured
    q = m.quantization
    fig = plots.occupancy_figure(q)
    assert [list(t.y) for t in fig.data[:2]] == [q["overall"]["occupancy_before"], q["overall"]["occupancy_after"]]
    assert list(fig.data[2].y) == [a - b for a, b in zip(q["overall"]["occupancy_after"],
                                                         q["overall"]["occupancy_before"], strict=True)]
    module = q["modules"][0]["name"]
    assert "of" in plots.occupancy_figure(q, module).layout.title.text
    with pytest.raises(WorkbenchError, match="no quantization analysis"):
        plots.occupancy_figure(q, "no.such.weight")

    ratio = plots.update_ratio_figure({"mansu": q, "graddiff": g.quantization})
    assert [t.name for t in ratio.data] == ["mansu", "graddiff"]
    assert all(0 < sum(t.y) <= 1.0 + 1e-9 for t in ratio.data)  # below/above-range ratios are not drawn
    # MANSU's moves sit at or beyond one bin width more often than the dense baseline's
    def mass_above_one(trace):
        return sum(y for x, y in zip(trace.x, trace.y, strict=True) if x >= 1.0)
    assert mass_above_one(ratio.data[0]) > mass_above_one(ratio.data[1])

    acc = plots.accuracy_figure({"mansu": m, "graddiff": g})
    assert list(acc.data[0].y) == [getattr(m.forget, v) for v in plots.VARIANT_LABELS]
    assert list(acc.data[3].y) == [getattr(g.retain, v) for v in plots.VARIANT_LABELS]
    single = plots.accuracy_figure(m)
    assert list(single.data[1].y) == [getattr(m.retain, v) for v in plots.VARIANT_LABELS]

    cad = plots.cad_diff_figure(m)
    assert f"{m.cad.fp:.3f}" in cad.layout.title.text
    assert f"{m.cad.quantized:.3f}" in plots.cad_diff_figure(m, "quantized").layout.title.text
    with pytest.raises(WorkbenchError, match="without CAD"):
        plots.cad_diff_figure(g)

    rows = report_card_rows(m)
    assert len(rows) == 4 and {r["verdict"] for r in rows} <= {"PASS", "fail", "–"}
    assert rows[0]["verdict"] == ("PASS" if m.properties.forgetting.passed else "fail")
    assert [r["value"] for r in rows] == [p.value for _, p in m.properties.items()]
