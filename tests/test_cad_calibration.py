"""CAD calibrated on the retrain oracle: the structural threshold τ, the report card, the table, the run file."""

from __future__ import annotations

import tempfile

import pytest

from workbench.experiments.flow import attribute_forget_set, default_circuit, oracle_for, run_unlearning
from workbench.experiments.store import load_run
from workbench.faces.compare import compare_row
from workbench.interpretability.attribution import attribute
from workbench.interpretability.cad import circuit_attribution_divergence
from workbench.measurement.metrics import DEFAULT_CAD_MIN, Thresholds, report_card, summary_lines
from workbench.measurement.results import CadCalibration, CadScores, JsonFields, OracleAccuracies, VariantAccuracies
from workbench.unlearning.task import StopRule


def _card(cad: CadScores, thresholds: Thresholds = Thresholds()):
    same = VariantAccuracies(base_fp=1.0, base_q=1.0, after_fp=0.0, after_qbase_delta=0.0, after_q=0.0)
    return report_card(forget=same, retain=same, ptq_gap=0.0, cad=cad,
                       oracle=OracleAccuracies(forget_fp=0.0, retain_fp=1.0), thresholds=thresholds)


def _cad(fp: float, q: float, calibration: CadCalibration | None) -> CadScores:
    return CadScores(fp=fp, quantized=q, fp_detail={}, quantized_detail={}, calibration=calibration)


def test_threshold_is_half_way_from_the_noise_floor_to_the_oracle():
    calibration = CadCalibration(forget=0.15, retain=0.03)
    assert calibration.threshold == pytest.approx(0.09)
    card = _card(_cad(0.10, 0.08, calibration))  # worst CAD 0.08 < 0.09
    assert card.structural.passed is False and card.structural.threshold == pytest.approx(0.09)
    assert card.structural.margin == pytest.approx(-0.01)
    assert _card(_cad(0.10, 0.095, calibration)).structural.passed is True
    assert _cad(0.10, 0.06, calibration).oracle_ratio == pytest.approx(0.4)


def test_a_given_threshold_wins_and_no_calibration_means_the_default():
    calibration = CadCalibration(forget=0.15, retain=0.03)
    assert _card(_cad(0.05, 0.05, calibration), Thresholds(cad_min=0.04)).structural.passed is True
    assert _card(_cad(0.05, 0.05, None)).structural.threshold == DEFAULT_CAD_MIN
    # an oracle whose CAD does not rise above the noise floor calibrates nothing
    flat = CadCalibration(forget=0.02, retain=0.03)
    assert flat.threshold is None
    assert _card(_cad(0.05, 0.05, flat)).structural.threshold == DEFAULT_CAD_MIN


def test_calibration_round_trips_through_json():
    cad = _cad(0.1, 0.2, CadCalibration(forget=0.15, retain=0.03))
    assert CadScores.from_json(JsonFields(cad.to_json(), "cad")) == cad
    plain = _cad(0.1, 0.2, None)
    assert "calibration" not in plain.to_json()
    assert CadScores.from_json(JsonFields(plain.to_json(), "cad")) == plain


def test_a_run_with_an_oracle_is_judged_by_the_oracles_cad(facts_tiny, split):
    circuit = default_circuit(attribute_forget_set(facts_tiny, split))
    oracle = oracle_for(facts_tiny)
    assert oracle is not None
    root = tempfile.mkdtemp()
    _result, metrics, run = run_unlearning(facts_tiny, split, method="graddiff", circuit=circuit,
                                           stop=StopRule(max_steps=3), runs_root=root, oracle=oracle)
    assert metrics.cad is not None and metrics.cad.calibration is not None
    calibration = metrics.cad.calibration
    # the calibration is CAD(base, oracle) computed here independently, on each set
    for facts, measured in ((split.forget, calibration.forget), (split.retain, calibration.retain)):
        before, after = attribute(facts_tiny, facts), attribute(oracle, facts)
        expected = circuit_attribution_divergence(before.scores, after.scores, circuit=list(circuit.selected),
                                                  metric_before=before.clean_metric,
                                                  metric_after=after.clean_metric).cad
        assert measured == pytest.approx(expected, rel=1e-6)
    # never having learned the facts moves attribution more than a second training does
    assert calibration.forget > 2 * calibration.retain
    structural = metrics.properties.structural
    assert structural.threshold == pytest.approx(calibration.threshold)
    assert structural.passed == (min(metrics.cad.fp, metrics.cad.quantized) >= structural.threshold)
    # the saved run reads back with its calibration; the table and the summary show it
    assert run is not None
    saved = load_run(run.id, root=root)
    assert saved.metrics.cad == metrics.cad
    row = compare_row(saved)
    assert row["CAD oracle"] == pytest.approx(calibration.forget) and row["τ"] == pytest.approx(structural.threshold)
    assert any("retrain oracle: CAD" in line for line in summary_lines(metrics))
