"""RunMetrics and metrics.json: version 1 files read unchanged, the round trip is exact, and
every file this workbench cannot read is refused with a message naming the file and the key."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace

import pytest

from workbench.core.errors import WorkbenchError
from workbench.experiments.store import list_runs, load_run, save_run
from workbench.measurement.metrics import summary_lines
from workbench.measurement.results import SCHEMA_VERSION, RunMetrics
from workbench.models.update import Update
from workbench.unlearning.mansu import MansuDiagnostics

SOURCE = "runs/r1/metrics.json"


def read(data: dict) -> RunMetrics:
    return RunMetrics.from_json(data, source=SOURCE)


def refused(data: object, *needles: str) -> str:
    with pytest.raises(WorkbenchError) as info:
        RunMetrics.from_json(data, source=SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: "), message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_a_version_1_file_reads_into_its_numbers(metrics_v1_json):
    assert "schema_version" not in metrics_v1_json
    m = read(metrics_v1_json)
    assert m.schema_version == 1
    f = metrics_v1_json["forget"]
    assert (m.forget.base_fp, m.forget.base_q, m.forget.after_fp, m.forget.after_qbase_delta, m.forget.after_q) == (
        f["base_fp"], f["base_q"], f["after_fp"], f["after_qbase_delta"], f["after_q"])
    assert m.retain.by_variant() == metrics_v1_json["retain"]
    assert m.paraphrase.forget.after_q == metrics_v1_json["paraphrase"]["forget_paraphrase"]["after_q"]
    assert m.multiple_choice.after_fp == metrics_v1_json["multiple_choice"]["forget"]["after_fp"]
    assert m.ptq_gap == metrics_v1_json["ptq_gap"]
    assert m.ptq_gap_decomposition.rounding == metrics_v1_json["ptq_gap_decomposition"]["rounding"]
    assert m.codes_changed == metrics_v1_json["codes_changed"] and isinstance(m.codes_changed, int)
    assert m.update_to_bin_width.p90 == metrics_v1_json["update_to_bin_width"]["p90"]
    assert m.quant.label == "nf4/b64" and m.quant.blocksize == 64
    assert m.oracle.forget_fp == metrics_v1_json["oracle"]["forget_fp"]
    assert m.cad.quantized == metrics_v1_json["cad"]["quantized"]
    assert m.cad.detail(quantized=True) == metrics_v1_json["cad"]["quantized_detail"]
    structural, read_back = metrics_v1_json["properties"]["structural"], m.properties.structural
    assert (read_back.passed, read_back.margin) == (structural["pass"], structural["margin"])
    assert m.quantization == metrics_v1_json["quantization"]
    assert (m.method, m.model, m.steps, m.seconds) == tuple(metrics_v1_json[k] for k in ("method", "model", "steps",
                                                                                          "seconds"))
    assert m.circuit == tuple(metrics_v1_json["circuit"]) and m.run_id == metrics_v1_json["run_id"]
    assert m.seconds_by_phase == metrics_v1_json["diagnostics"]["seconds_by_phase"]
    assert m.mansu_diagnostics.fisher_budget == metrics_v1_json["diagnostics"]["fisher_budget"]


def test_to_json_writes_version_1_exactly_plus_the_version(metrics_v1_json):
    written = read(copy.deepcopy(metrics_v1_json)).to_json()
    assert written.pop("schema_version") == 1
    # same keys, same order, same numbers: the files differ by the version line only
    assert json.dumps(written, indent=2) == json.dumps(metrics_v1_json, indent=2)
    fresh = replace(read(metrics_v1_json), schema_version=SCHEMA_VERSION).to_json()
    assert fresh["schema_version"] == SCHEMA_VERSION == 4


def test_round_trip_to_json_from_json(run_metrics):
    for m in (run_metrics, replace(run_metrics, schema_version=2),
              replace(run_metrics, oracle=None, cad=None, unlearning_seconds=None, circuit=None, run_id=None)):
        back = RunMetrics.from_json(json.loads(json.dumps(m.to_json())), source="x")
        assert back == m
        assert back.to_json() == m.to_json()


def test_an_older_run_without_unlearning_seconds_reads_and_has_no_time_line(metrics_v1_json):
    del metrics_v1_json["unlearning_seconds"]
    m = read(metrics_v1_json)
    assert m.unlearning_seconds is None and "unlearning_seconds" not in m.to_json()
    assert not any(line.startswith("time:") for line in summary_lines(m))


def test_a_newer_or_unknown_version_is_refused(metrics_v1_json):
    refused({**metrics_v1_json, "schema_version": 5}, "schema_version 5", "1, 2, 3, 4", "newer workbench")
    message = refused({**metrics_v1_json, "schema_version": 0}, "schema_version 0")
    assert "newer" not in message
    refused({**metrics_v1_json, "schema_version": "2"}, "'schema_version' must be a whole number", "'2'")


@pytest.mark.parametrize("path", ["forget.after_q", "ptq_gap", "properties.structural.pass", "quantization",
                                  "model_fingerprint", "cad.fp_detail", "multiple_choice.forget.base_q"])
def test_a_missing_key_is_named(metrics_v1_json, path):
    *parents, last = path.split(".")
    obj = metrics_v1_json
    for key in parents:
        obj = obj[key]
    del obj[last]
    refused(metrics_v1_json, f"'{path}' is missing")


@pytest.mark.parametrize("path,value,expected", [
    ("ptq_gap", "0.1", "a number"),
    ("forget.after_fp", None, "a number"),
    ("codes_changed", 3.5, "a whole number"),
    ("codes_changed", True, "a whole number"),
    ("properties.ptq.pass", "yes", "true, false or null"),
    ("circuit", "L0.H1", "a list of strings or null"),
    ("method", 7, "a string"),
    ("quantization", [], "a JSON object"),
    ("diagnostics.seconds_by_phase", {"setup": "1 s"}, "map phases to seconds"),
])
def test_a_wrong_type_is_named(metrics_v1_json, path, value, expected):
    *parents, last = path.split(".")
    obj = metrics_v1_json
    for key in parents:
        obj = obj[key]
    obj[last] = value
    refused(metrics_v1_json, path, expected)


def test_other_refusals(metrics_v1_json):
    refused([1, 2], "metrics.json must be a JSON object", "a list")
    refused({**metrics_v1_json, "surprise": 1}, "does not know: surprise")
    metrics_v1_json["forget"]["after_oracle"] = 0.5
    refused(metrics_v1_json, "'forget' has key(s)", "after_oracle")
    del metrics_v1_json["forget"]["after_oracle"]
    metrics_v1_json["quant"]["type"] = "nf3"
    refused(metrics_v1_json, "'quant' is not a quantizer", "nf3")


def test_mansu_diagnostics_are_typed_and_checked(run_metrics, metrics_v1_json):
    saved = metrics_v1_json["diagnostics"]
    d = run_metrics.mansu_diagnostics
    assert isinstance(d, MansuDiagnostics) and d.params_per_round == saved["params_per_round"] == 16
    assert {k: v for k, v in d.to_dict().items() if k in saved} == saved
    # counters MANSU gained after this run was saved read as what the run did: nothing
    assert "snapped" not in saved and d.snapped == 0 and d.snap_dropped == 0
    assert replace(run_metrics, method="graddiff", diagnostics={"lr": 0.003}).mansu_diagnostics is None
    assert replace(run_metrics, method="mansu-no_floor").mansu_diagnostics == d
    assert replace(run_metrics, method="mansu-snap").mansu_diagnostics == d
    no_modules = {k: v for k, v in saved.items() if k != "n_modules"}
    with pytest.raises(WorkbenchError, match="missing n_modules"):
        _ = replace(run_metrics, diagnostics=no_modules).mansu_diagnostics
    with pytest.raises(WorkbenchError, match="unknown surprise"):
        _ = replace(run_metrics, diagnostics={**saved, "surprise": 1}).mansu_diagnostics


def test_load_run_names_the_run_and_its_file(tmp_path, run_metrics, metrics_v1_json):
    run = save_run(config={"method": "mansu", "model": "facts-tiny"}, metrics=run_metrics,
                   update=Update({}), run_id="future", root=tmp_path)
    on_disk = json.loads((run.path / "metrics.json").read_text())
    assert on_disk == {**run_metrics.to_json(), "run_id": "future"}
    (run.path / "metrics.json").write_text(json.dumps({**on_disk, "schema_version": 9}))
    with pytest.raises(WorkbenchError) as info:
        load_run("future", root=tmp_path)
    assert re.search(r"run future \(.*future/metrics\.json\): schema_version 9", str(info.value)), str(info.value)
    assert list_runs(root=tmp_path) == []  # listed runs are the ones that read
    # a version-1 file from an older workbench, saved in a run directory, opens
    (run.path / "metrics.json").write_text(json.dumps(metrics_v1_json, indent=2))
    assert load_run("future", root=tmp_path).metrics == run_metrics
