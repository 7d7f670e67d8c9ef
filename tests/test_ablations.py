"""Which ablation would have passed: the reading of ablated report cards against the full run's
(hand-made cards), and the session re-running its MANSU run with one component off (facts-tiny)."""

from __future__ import annotations

import pytest

from workbench.core.errors import WorkbenchError
from workbench.experiments.store import load_run
from workbench.faces.session import Session
from workbench.measurement.ablations import ablation_lines, read_ablations
from workbench.measurement.results import Property, ReportCard


def _p(passed: bool | None, margin: float | None = None) -> Property:
    if passed is None:
        return Property(passed=None, value=None, threshold=0.1, margin=None)
    m = margin if margin is not None else (0.02 if passed else -0.02)
    return Property(passed=passed, value=0.1 - m, threshold=0.1, margin=m)


def _card(forgetting, retain, ptq, structural=None) -> ReportCard:
    return ReportCard(forgetting=_p(*forgetting), retain=_p(*retain), ptq=_p(*ptq),
                      structural=_p(*structural or (None,)))


FULL = _card((False, -0.024), (True,), (True,), (False, -0.08))


def test_an_ablation_that_fixes_every_failure_and_loses_nothing_would_pass():
    outcomes = read_ablations(FULL, [
        ("floor", _card((True, 0.03), (True,), (True,), (True, 0.01))),      # fixes both
        ("fisher", _card((True, 0.05), (False, -0.1), (True,), (True, 0.2))),  # fixes both, loses retain
        ("circuit", _card((True, 0.04), (True,), (True,), (False, -0.05))),   # structural still fails
    ])
    floor, fisher, circuit = outcomes
    assert (floor.fixes, floor.still_failing, floor.loses, floor.would_pass) == (
        ("forgetting", "structural"), (), (), True)
    assert (fisher.loses, fisher.would_pass) == (("retain",), False)
    assert (circuit.fixes, circuit.still_failing, circuit.would_pass) == (("forgetting",), ("structural",), False)
    lines = ablation_lines(FULL, outcomes)
    assert lines[0].startswith("MANSU without its floor would have passed")
    assert "forgetting +0.030" in lines[0] and "structural erasure +0.010" in lines[0]
    assert len(lines) == 4 and "loses retain (retain -0.100)" in lines[2]
    assert "still fails structural erasure (structural erasure -0.050)" in lines[3]


def test_no_ablation_passes_and_unmeasured_properties_are_skipped():
    outcomes = read_ablations(FULL, [("projection", _card((False, -0.01), (True,), (True,), (None,)))])
    (o,) = outcomes
    assert (o.fixes, o.still_failing, o.would_pass) == ((), ("forgetting",), False)  # structural unmeasured
    lines = ablation_lines(FULL, outcomes)
    assert lines[0] == "no ablation passes everything the full run failed (forgetting, structural erasure)"
    assert lines[1] == "without the projection: fixes nothing; still fails forgetting (forgetting -0.010)"


def test_a_full_run_that_passes_needs_no_ablation():
    full = _card((True,), (True,), (True,))
    assert ablation_lines(full, []) == ["the full method passes every measured property; no ablation is needed"]


def test_session_re_runs_its_mansu_run_with_one_component_off(tmp_path):
    s = Session(runs_root=tmp_path)
    s.setup("facts-tiny")
    with pytest.raises(WorkbenchError, match="run MANSU first"):
        s.try_ablations(["floor"])
    s.unlearn("graddiff", stop={"max_steps": 1, "forget_target": None}, measure_cad=False, use_oracle=False)
    with pytest.raises(WorkbenchError, match="run MANSU first"):  # a baseline has no MANSU ablations
        s.try_ablations(["floor"])
    full = s.unlearn("mansu", mansu={"max_rounds": 2}, measure_cad=False, use_oracle=False)
    with pytest.raises(WorkbenchError, match="unknown ablation"):
        s.try_ablations(["wings"])
    seen: list[str] = []
    (outcome,) = s.try_ablations(["floor"], progress=lambda _f, m: seen.append(m))
    assert seen and outcome.ablation == "floor"
    saved = [r for r in tmp_path.rglob("metrics.json") if r.parent.name != full.run_id]
    assert len(saved) == 2  # the graddiff run and the ablated MANSU run
    ablated = next(p for p in saved if "mansu" in p.parent.name)
    run = load_run(ablated.parent.name, root=ablated.parent.parent)
    assert run.metrics.properties == outcome.card
    assert run.metrics.diagnostics["config"]["use_floor"] is False
    assert run.metrics.diagnostics["config"]["max_rounds"] == 2
    assert run.metrics.circuit == full.metrics.circuit  # the same circuit as the full run
    lines = s.ablation_text().splitlines()
    assert lines == ablation_lines(full.metrics.properties, [outcome])
    assert lines[-1].startswith("without the floor:") or lines[0].startswith("the full method passes")
