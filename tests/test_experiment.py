"""The whole flow the faces share (attribute → circuit → unlearn → measure → save), and the CLI's
``unlearn`` / ``runs list`` / ``report`` commands on facts-tiny."""

from __future__ import annotations

import json

import pytest

from workbench.core.errors import WorkbenchError
from workbench.data.facts import FactSplit
from workbench.data.world import fact_world
from workbench.experiments.flow import (
    attribute_forget_set,
    default_circuit,
    no_oracle_reason,
    oracle_fits,
    oracle_for,
    run_unlearning,
)
from workbench.experiments.store import list_runs, load_run
from workbench.faces.cli import main
from workbench.interpretability.circuit import Circuit
from workbench.models.builtin_splits import builtin_split, facts_preset
from workbench.quant import QuantConfig
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.task import OptimConfig, StopRule

SMALL = MansuConfig(params_per_round=16, max_rounds=3, fisher_samples=32)


@pytest.fixture(scope="module")
def split(facts_tiny):
    from workbench.models.builtin_splits import builtin_split

    return builtin_split(facts_tiny)


@pytest.fixture(scope="module")
def circuit(facts_tiny, split):
    return default_circuit(attribute_forget_set(facts_tiny, split), top_k=4)


@pytest.fixture(scope="module")
def mansu_run(facts_tiny, split, circuit, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    before = facts_tiny.weights_hash()
    result, metrics, run = run_unlearning(facts_tiny, split, method="mansu", circuit=circuit,
                                          quant=QuantConfig("nf4"), method_config=SMALL, save=True, runs_root=root)
    return result, metrics, run, root, before == facts_tiny.weights_hash()


def _check_prop(p: dict) -> None:
    assert isinstance(p["pass"], bool)
    assert isinstance(p["margin"], float)


def test_run_unlearning_saves_every_required_metric(mansu_run, circuit):
    result, metrics, run, _root, untouched = mansu_run
    assert untouched, "run_unlearning modified the base model"
    on_disk = json.loads((run.path / "metrics.json").read_text())
    assert metrics.run_id is None and run.metrics == metrics.saved_as(run.id)
    assert on_disk == run.metrics.to_json() == json.loads(json.dumps(metrics.saved_as(run.id).to_json()))
    assert on_disk["schema_version"] == 4 and on_disk["run_id"] == run.id
    m = on_disk
    assert m["method"] == "mansu" and m["model"] == "facts-tiny"
    assert {"type", "blocksize", "double_quant"} <= set(m["quant"])
    assert (m["quant"]["type"], m["quant"]["blocksize"], m["quant"]["double_quant"]) == ("nf4", 64, False)
    for key in ("forget", "retain"):
        assert {"base_fp", "base_q", "after_fp", "after_q"} <= set(m[key])
        assert all(0.0 <= m[key][v] <= 1.0 for v in ("base_fp", "base_q", "after_fp", "after_q"))
    for key in ("ptq_gap", "bucket_overlap", "seconds"):
        assert isinstance(m[key], float)
    assert isinstance(m["codes_changed"], int) and isinstance(m["params_changed"], int)
    assert m["params_changed"] == result.update.nnz() > 0
    assert set(m["update_to_bin_width"]) == {"median", "p90"}
    assert isinstance(m["cad"]["fp"], float) and isinstance(m["cad"]["quantized"], float)
    assert set(m["properties"]) == {"forgetting", "retain", "ptq", "structural"}
    for p in m["properties"].values():
        _check_prop(p)
    assert m["seconds"] >= m["unlearning_seconds"] > 0
    assert m["steps"] == result.steps and m["stopped"] == result.stopped
    assert m["circuit"] == [c.name for c in sorted(circuit.selected)] and len(m["circuit"]) == 4
    assert m["diagnostics"]["params_per_round"] == 16 == metrics.mansu_diagnostics.params_per_round
    assert metrics.seconds_by_phase == result.seconds_by_phase


def test_numbers_in_metrics_json_are_the_run_metrics_values(mansu_run):
    """Every number in the saved file is the RunMetrics attribute of the same name (the file
    is written from the typed object, not beside it)."""
    _, metrics, run, _, _ = mansu_run
    m = json.loads((run.path / "metrics.json").read_text())
    for name in ("ptq_gap", "bucket_overlap", "code_overlap", "codes_changed", "codes_changed_fraction",
                 "params_changed", "params_changed_unquantized", "moved_code_changed_fraction", "absmax_changes",
                 "update_norm", "retain_kl", "method", "model", "model_fingerprint", "split", "n_forget",
                 "n_retain", "steps", "stopped", "seconds", "unlearning_seconds"):
        assert m[name] == getattr(metrics, name), name
    for variant in ("base_fp", "base_q", "after_fp", "after_qbase_delta", "after_q"):
        assert m["forget"][variant] == getattr(metrics.forget, variant)
        assert m["retain"][variant] == getattr(metrics.retain, variant)
        assert m["multiple_choice"]["forget"][variant] == getattr(metrics.multiple_choice, variant)
        assert m["paraphrase"]["forget_paraphrase"][variant] == getattr(metrics.paraphrase.forget, variant)
    assert m["ptq_gap_decomposition"] == {"base_shift": metrics.ptq_gap_decomposition.base_shift,
                                          "rounding": metrics.ptq_gap_decomposition.rounding,
                                          "storage": metrics.ptq_gap_decomposition.storage}
    assert m["update_to_bin_width"] == {"median": metrics.update_to_bin_width.median,
                                        "p90": metrics.update_to_bin_width.p90}
    assert (m["cad"]["fp"], m["cad"]["quantized"]) == (metrics.cad.fp, metrics.cad.quantized)
    for name, p in metrics.properties.items():
        assert m["properties"][name] == {"pass": p.passed, "margin": p.margin, "threshold": p.threshold,
                                         "value": p.value}
    assert m["quant"] == metrics.quant.to_dict() and m["quantization"] == metrics.quantization
    assert m["diagnostics"] == json.loads(json.dumps(metrics.diagnostics))


def test_ptq_gap_in_metrics_json_is_consistent(mansu_run):
    m = mansu_run[2].metrics
    f = m.forget
    assert m.ptq_gap == pytest.approx(f.after_q - f.after_fp, abs=1e-12)
    d = m.ptq_gap_decomposition
    assert d.base_shift + d.rounding == pytest.approx(m.ptq_gap, abs=1e-12)
    assert m.properties.ptq.value == m.ptq_gap


def test_saved_run_reopens_with_config_circuit_history_and_update(facts_tiny, mansu_run, circuit):
    result, _, run, root, _ = mansu_run
    assert [r.id for r in list_runs(root=root)] == [run.id]
    back = load_run(run.id, root=root)
    assert back.config["method"] == "mansu" and back.config["model"] == "facts-tiny"
    assert back.config["mansu"]["params_per_round"] == 16 and back.config["quant"]["type"] == "nf4"
    assert back.config["model_fingerprint"] == facts_tiny.fingerprint
    assert back.history == json.loads(json.dumps(result.history))
    saved = Circuit.load(back.circuit_path, model=facts_tiny)
    assert saved.selected == circuit.selected
    update = back.update()
    assert update.names == result.update.names
    for n in update.names:
        assert update.deltas[n].numpy().tobytes() == result.update.deltas[n].numpy().tobytes()


def test_baseline_run(facts_tiny, split, circuit, tmp_path):
    before = facts_tiny.weights_hash()
    result, _metrics, run = run_unlearning(
        facts_tiny, split, method="graddiff", circuit=circuit, optim=OptimConfig(lr=3e-3),
        stop=StopRule(max_steps=3), save=True, runs_root=str(tmp_path),
    )
    assert facts_tiny.weights_hash() == before
    assert result.steps <= 3
    m = json.loads((run.path / "metrics.json").read_text())
    assert m["method"] == "graddiff" and m["model"] == "facts-tiny"
    assert m["ptq_gap"] == pytest.approx(m["forget"]["after_q"] - m["forget"]["after_fp"], abs=1e-12)
    for p in m["properties"].values():
        _check_prop(p)
    assert run.config["stop"]["max_steps"] == 3 and run.config["mansu"] is None
    assert m["params_changed"] > m["codes_changed"] > 0  # dense update: most moves stay inside their bin
    assert [r.id for r in list_runs(root=tmp_path)] == [run.id]


def test_circuit_of_another_model_and_cancellation_save_nothing(facts_tiny, split, circuit, tmp_path):
    other = circuit.copy()
    other.model_fingerprint = "0" * 16
    with pytest.raises(WorkbenchError, match="another model"):
        run_unlearning(facts_tiny, split, circuit=other, method_config=SMALL, runs_root=str(tmp_path))
    with pytest.raises(WorkbenchError, match="cancelled"):
        run_unlearning(facts_tiny, split, circuit=circuit, method_config=SMALL, runs_root=str(tmp_path),
                       should_stop=lambda: True)
    assert list_runs(root=tmp_path) == []


# --- CLI ------------------------------------------------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_error(code: int, err: str, needle: str) -> None:
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: "), err
    assert needle in err


def test_cli_unlearn_runs_list_and_report(capsys, facts_tiny, tmp_path):
    out_dir = tmp_path / "cli-runs"
    code, out, err = _cli(capsys, "unlearn", "--model", "facts-tiny", "--method", "mansu", "--max-rounds", "2",
                          "--params-per-round", "8", "--runs-root", str(out_dir), "--no-oracle")
    assert code == 0, err
    for needle in ("mansu on facts-tiny", "PTQ gap", "forgetting", "retain preserved", "PTQ gap ≤ threshold",
                   "structural erasure", "run saved:"):
        assert needle in out, needle
    (run,) = list_runs(root=out_dir)
    assert str(run.path) in out
    assert run.config["mansu"]["params_per_round"] == 8 and run.config["mansu"]["max_rounds"] == 2
    assert run.metrics.steps <= 2 and run.metrics.params_changed <= 16
    assert run.circuit_path is not None  # no --circuit: the forget set was attributed

    code, out, _ = _cli(capsys, "runs", "list", "--runs-root", str(out_dir))
    assert code == 0 and run.id in out

    code, out, _ = _cli(capsys, "report", run.id, "--runs-root", str(out_dir), "--json")
    assert code == 0
    assert json.loads(out) == json.loads((run.path / "metrics.json").read_text())

    code, out, _ = _cli(capsys, "report", run.id, "--runs-root", str(out_dir))
    assert code == 0 and f"run {run.id}: mansu on facts-tiny" in out and "structural" in out


def test_cli_runs_list_empty(capsys, tmp_path):
    code, out, _ = _cli(capsys, "runs", "list", "--runs-root", str(tmp_path))
    assert code == 0 and "no runs yet" in out


def test_cli_bad_inputs_exit_1(capsys, facts_tiny, tmp_path):
    code, _, err = _cli(capsys, "report", "no-such-run", "--runs-root", str(tmp_path))
    _assert_error(code, err, "no run 'no-such-run'")
    # not an id: read as a directory, which does not exist
    code, _, err = _cli(capsys, "report", "../escape", "--runs-root", str(tmp_path))
    _assert_error(code, err, "no run '../escape'")
    assert "no run directory at" in err
    missing = tmp_path / "missing-circuit.json"
    code, _, err = _cli(capsys, "unlearn", "--model", "facts-tiny", "--circuit", str(missing),
                        "--runs-root", str(tmp_path), "--no-oracle")
    _assert_error(code, err, "no such circuit file")
    code, _, err = _cli(capsys, "unlearn", "--model", "facts-tiny", "--quant", "none", "--runs-root", str(tmp_path),
                        "--no-oracle")
    _assert_error(code, err, "needs a quantizer")
    assert list_runs(root=tmp_path) == []


def test_the_retrain_oracle_is_used_only_for_the_forget_set_it_never_saw(facts_tiny):
    """facts-tiny-oracle was retrained without the default forget domain only: it is the oracle of
    that split (and of any part of it), not of another domain's, whose facts it learned."""
    default = builtin_split(facts_tiny)
    other_domain = next(d.name for d in facts_preset_world(facts_tiny).domains if not default.name.startswith(d.name))
    other = builtin_split(facts_tiny, forget_domain=other_domain)
    assert oracle_fits(facts_tiny, default) and not oracle_fits(facts_tiny, other)
    assert oracle_fits(facts_tiny, FactSplit("part", forget=default.forget[:3], retain=default.retain))
    mixed = FactSplit("mixed", forget=default.forget[:3] + other.forget[:1], retain=other.forget[1:])
    assert not oracle_fits(facts_tiny, mixed)
    assert oracle_for(facts_tiny, other) is None
    oracle = oracle_for(facts_tiny, default)
    assert oracle is not None and oracle.name == "facts-tiny-oracle"
    # every face says why a built-in gets no oracle (and says nothing when it gets one)
    assert no_oracle_reason(facts_tiny, default) is None
    reason = no_oracle_reason(facts_tiny, other)
    assert reason is not None and "facts-tiny-oracle" in reason and other.name in reason


def facts_preset_world(model):
    """The fact world the built-in ``model`` was trained on."""
    preset = facts_preset(model)
    return fact_world(seed=preset.seed, size=preset.world_size)
