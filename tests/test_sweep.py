"""Jobs, resumable tables and sweeps: job keys, skipping finished jobs, an interrupted table
resumed by the same command, worker processes and Ray giving the sequential results, the
sweep file's checks, and tracking to TensorBoard and MLflow (offline, read back)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch

from workbench.core.errors import WorkbenchError
from workbench.experiments import sweep as sweep_module
from workbench.experiments.jobs import job_for, split_digest
from workbench.experiments.store import finished_jobs, list_runs, save_run
from workbench.experiments.sweep import ExecutorConfig, JobGroup, run_jobs
from workbench.experiments.sweep_config import load_sweep_config, plan_sweep, sweep_config
from workbench.faces.cli import main
from workbench.faces.compare import compare_table, paper_table
from workbench.quant import QuantConfig
from workbench.unlearning.task import OptimConfig, StopRule

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sweep.toml"
# columns that differ between two runs of the same job: the run's id and its wall time
VOLATILE = ("run", "seconds")


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _timeless(data):
    """``metrics.json`` without what differs between two runs of one job: the id and wall times."""
    if isinstance(data, dict):
        return {k: _timeless(v) for k, v in data.items() if "seconds" not in k and k != "run_id"}
    if isinstance(data, list):
        return [_timeless(v) for v in data]
    return "nan" if isinstance(data, float) and data != data else data


def _tiny_jobs(model, split, methods=("graddiff", "ga"), seed=0):
    optim = OptimConfig(lr=3e-3, seed=seed)
    return [job_for(model, split, m, QuantConfig("nf4"), optim=optim, stop=StopRule(max_steps=2),
                    measure_cad=False, circuit=None) for m in methods]


# --- job keys ---------------------------------------------------------------------------------------


def test_job_keys_are_stable_and_name_every_setting(facts_tiny, split):
    a, b = _tiny_jobs(facts_tiny, split)
    assert a.key == _tiny_jobs(facts_tiny, split)[0].key  # same job, same key
    assert a.key != b.key
    assert a.key != dataclasses.replace(a, seed=1).key
    assert a.key != dataclasses.replace(a, quant=QuantConfig("int8")).key
    assert a.key != dataclasses.replace(a, stop=StopRule(max_steps=3)).key
    assert a.key != dataclasses.replace(a, model_fingerprint="other").key
    other = dataclasses.replace(split, forget=split.forget[:-1])
    assert split_digest(other) != split_digest(split)  # same name, other facts: another split
    assert json.loads(json.dumps(a.canonical())) == a.canonical()


def test_finished_jobs_ignore_half_written_and_foreign_runs(tmp_path, facts_tiny, split):
    (tmp_path / ".20260101-000000-ga-x-abcd.tmp1").mkdir()  # a run killed mid-write: hidden temp dir
    partial = tmp_path / "20260101-000000-ga-x-abcd"
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps({"job_key": "k1"}))  # no metrics.json: incomplete
    assert finished_jobs(root=tmp_path) == {}


def test_run_jobs_skips_finished_jobs(facts_tiny, split, tmp_path, monkeypatch):
    jobs = _tiny_jobs(facts_tiny, split)
    group = JobGroup(facts_tiny, split)
    first = run_jobs(jobs[:1], [group], runs_root=tmp_path)
    assert (first.ran, first.skipped) == (1, 0)
    assert first.runs[0].config["job_key"] == jobs[0].key
    calls = []
    real = sweep_module.run_unlearning

    def counting(*args, **kwargs):
        calls.append(kwargs["method"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "run_unlearning", counting)
    logged = []
    both = run_jobs(jobs, [group], runs_root=tmp_path, on_run=lambda job, run: logged.append((job.key, run.id)))
    assert calls == ["ga"] and (both.ran, both.skipped) == (1, 1)
    assert logged == [(jobs[1].key, both.runs[1].id)]  # trackers see new runs only
    assert both.runs[0].id == first.runs[0].id
    assert [r.metrics.method for r in both.runs] == ["graddiff", "ga"]
    again = run_jobs(jobs, [group], runs_root=tmp_path)
    assert calls == ["ga"] and again.ran == 0 and [r.id for r in again.runs] == [r.id for r in both.runs]


def test_interrupted_paper_table_resumes_with_the_same_command(capsys, facts_tiny, tmp_path, monkeypatch):
    """Ctrl-C after the first job; the same command again runs only the rest, and the table
    equals the one an uninterrupted command makes."""
    argv = ["paper-table", "--model", "facts-tiny", "--methods", "graddiff,ga,sure", "--max-steps", "2",
            "--no-cad", "--no-oracle", "--json"]
    real = sweep_module.run_unlearning
    calls = []

    def interrupting(*args, **kwargs):
        calls.append(kwargs["method"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "run_unlearning", interrupting)
    root = str(tmp_path / "resumed")
    code, _, err = _cli(capsys, *argv, "--runs-root", root)
    assert code == 130 and "interrupted" in err
    assert [r.metrics.method for r in list_runs(root=root)] == ["graddiff"]

    monkeypatch.setattr(sweep_module, "run_unlearning", real)
    calls.clear()

    def counting(*args, **kwargs):
        calls.append(kwargs["method"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "run_unlearning", counting)
    code, out, err = _cli(capsys, *argv, "--runs-root", root)
    assert code == 0, err
    assert calls == ["ga", "sure"]  # graddiff was finished: not recomputed
    resumed = json.loads(out)
    code, out, err = _cli(capsys, *argv, "--runs-root", str(tmp_path / "straight"))
    assert code == 0, err
    straight = json.loads(out)
    assert _stable(resumed["rows"]) == _stable(straight["rows"])
    assert [r["method"] for r in resumed["rows"]] == ["graddiff", "ga", "sure"]


def test_worker_processes_give_the_sequential_results(facts_tiny, split, tmp_path):
    kwargs = dict(methods=["graddiff", "mansu"], split=split, stop=StopRule(max_steps=2, forget_target=0.2),
                  measure_cad=False)
    sequential = paper_table(facts_tiny, runs_root=str(tmp_path / "seq"), **kwargs)
    parallel = paper_table(facts_tiny, runs_root=str(tmp_path / "par"), executor=ExecutorConfig(jobs=2), **kwargs)
    assert {r.config["job_key"] for r in sequential} == {r.config["job_key"] for r in parallel}
    assert _stable(compare_table(sequential)) == _stable(compare_table(parallel))
    for a, b in zip(sequential, parallel):  # the updates themselves, bit for bit
        da, db = a.update().deltas, b.update().deltas
        assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
        # and every number of metrics.json but the timings (both sides on one thread here: torch's
        # parallel sums add in another order on another thread count, moving the last digit)
        assert _timeless(a.metrics.to_json()) == _timeless(b.metrics.to_json())


def test_a_failing_worker_job_is_reported_and_the_others_are_kept(facts_tiny, split, tmp_path):
    good, bad = _tiny_jobs(facts_tiny, split)
    bad = dataclasses.replace(bad, oracle="no-such-oracle")  # its worker cannot load the oracle
    with pytest.raises(WorkbenchError, match="no-such-oracle"):
        run_jobs([good, bad], [JobGroup(facts_tiny, split)], runs_root=tmp_path, executor=ExecutorConfig(jobs=2))
    assert set(finished_jobs(root=tmp_path)) == {good.key}  # the finished job stays: a rerun resumes


def _start_local_ray(ray, attempts: int = 3) -> None:
    """A one-CPU local cluster, Ray's documented way to test Ray code (``local_mode`` is gone in
    Ray 2.60: ``ray.init(local_mode=True)`` raises). Ray gives its raylet a fixed 30 s to register;
    on a loaded shared machine that can pass, so a failed start is retried before the test fails."""
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
            return
        except Exception as exc:  # Ray raises a bare Exception on a startup timeout
            ray.shutdown()
            if attempt == attempts - 1 or "timed out during startup" not in str(exc):
                raise


def test_ray_runs_a_small_sweep(facts_tiny, split, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'mansu-workbench[ray]'")
    jobs = _tiny_jobs(facts_tiny, split)
    group = JobGroup(facts_tiny, split)
    sequential = run_jobs(jobs, [group], runs_root=tmp_path / "seq")
    _start_local_ray(ray)
    try:
        on_ray = run_jobs(jobs, [group], runs_root=tmp_path / "ray", executor=ExecutorConfig(kind="ray"))
    finally:
        ray.shutdown()
    assert on_ray.ran == 2
    assert [r.config["job_key"] for r in on_ray.runs] == [j.key for j in jobs]
    assert _stable(compare_table(on_ray.runs)) == _stable(compare_table(sequential.runs))


# --- the sweep file ---------------------------------------------------------------------------------


def test_sweep_file_is_checked_before_any_work(tmp_path):
    def refused(text: str, match: str) -> None:
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(WorkbenchError, match=match):
            load_sweep_config(path)

    refused('models = ["facts-tiny"]\nmethod = ["ga"]\n', r"unknown key\(s\) method")
    refused('models = ["facts-tiny"]\nmethods = ["ga", "retrain"]\n', "unknown method 'retrain'")
    refused('models = ["no-such-model"]\n', "unknown model 'no-such-model'")
    refused('models = "facts-tiny"\n', "models must be a list")
    refused('models = ["facts-tiny"]\nquantizers = ["nf3"]\n', "unknown quantizer 'nf3'")
    refused('models = ["facts-tiny"]\n[stop]\nmax_steps = "ten"\n', r"\[stop\]: max_steps = 'ten' has the wrong type")
    refused('models = ["facts-tiny"]\n[stop]\nmax_step = 3\n', r"\[stop\]: unknown key 'max_step'")
    refused('models = ["facts-tiny"]\n[mansu]\nuse_floor = 1\n', "use_floor = 1 has the wrong type")
    refused('models = ["facts-tiny"]\n[mansu]\nvariant = "v9"\n', "unknown variant 'v9'")
    refused('models = ["facts-tiny"]\nablations = ["dropout"]\n', "unknown ablation 'dropout'")
    refused('models = ["facts-tiny"]\n[stop]\nmax_steps = 0\n', r"\[stop\]")  # a range check, named
    refused('models = ["facts-tiny"]\nblocksize = 48\n', "48 is not supported")
    refused('models = [\n', "not valid TOML")
    with pytest.raises(WorkbenchError, match="no sweep file"):
        load_sweep_config(tmp_path / "missing.toml")


def test_example_sweep_file_plans_every_combination(facts_tiny):
    config = load_sweep_config(EXAMPLE)
    small = dataclasses.replace(config, models=("facts-tiny",), forget_domains=("pathogens", "cities"),
                                quantizers=("nf4", "int8"))
    plan = plan_sweep(small)
    per_group = len(small.methods) + (len(small.seeds) - 1) * (len(small.methods) - 1) + len(small.ablations)
    assert len(plan.jobs) == 2 * 2 * per_group and len(plan.groups) == 2
    assert len({j.key for j in plan.jobs}) == len(plan.jobs)
    with pytest.raises(WorkbenchError, match="volcanoes"):
        plan_sweep(dataclasses.replace(small, forget_domains=("volcanoes",)))


def test_cli_sweep_writes_the_table_and_resumes(capsys, facts_tiny, tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text('models = ["facts-tiny"]\nmethods = ["graddiff", "ga"]\nquantizers = ["nf4", "int8"]\n'
                      '[stop]\nmax_steps = 2\n')
    root, out_file = str(tmp_path / "runs"), tmp_path / "table.csv"
    code, out, err = _cli(capsys, "sweep", str(config), "--runs-root", root, "--out", str(out_file), "--json")
    assert code == 0, err
    printed = json.loads(out)
    assert (printed["ran"], printed["skipped"]) == (4, 0)
    rows = list(csv.DictReader(io.StringIO(out_file.read_text())))
    assert [(r["method"], r["quantizer"], r["model"]) for r in rows] == [
        ("graddiff", "nf4", "facts-tiny"), ("ga", "nf4", "facts-tiny"),
        ("graddiff", "int8", "facts-tiny"), ("ga", "int8", "facts-tiny")]
    code, out, err = _cli(capsys, "sweep", str(config), "--runs-root", root)
    assert code == 0, err
    assert "0 run now, 4 finished before and skipped" in out and "| graddiff | facts-tiny |" in out
    assert len(list_runs(root=root)) == 4
    config.write_text('models = ["facts-tiny"]\nmethods = ["graddiff"]\nbogus = 1\n')
    code, _, err = _cli(capsys, "sweep", str(config), "--runs-root", str(tmp_path / "r2"))
    assert code == 1 and "unknown key(s) bogus" in err
    assert not (tmp_path / "r2").exists() or list_runs(root=tmp_path / "r2") == []


def test_sweep_config_defaults():
    config = sweep_config({"models": ["facts-tiny"]})
    assert config.forget_domains == (None,) and config.quantizers == ("nf4",) and config.seeds == (0,)
    assert config.mansu.forget_target == config.stop.forget_target
    assert sweep_config({"models": ["facts-tiny"], "optim": {"lr": 1e-3}}).lr == 1e-3


# --- tracking ---------------------------------------------------------------------------------------


def _one_run(facts_tiny, split, root, method="graddiff"):
    from workbench.experiments.flow import run_unlearning

    _, _, run = run_unlearning(facts_tiny, split, method=method, optim=OptimConfig(lr=3e-3),
                               stop=StopRule(max_steps=2, forget_target=None), measure_cad=False, runs_root=root)
    return run


def test_tensorboard_tracking_reads_back(capsys, facts_tiny, tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is an optional extra: mansu-workbench[tracking]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "tb"
    code, _, err = _cli(capsys, "unlearn", "--model", "facts-tiny", "--method", "graddiff", "--max-steps", "2",
                        "--forget-target", "0", "--no-oracle", "--runs-root", str(tmp_path / "runs"),
                        "--report-to", "tensorboard", "--tracking-dir", str(logs))
    assert code == 0, err
    (run,) = list_runs(root=tmp_path / "runs")
    acc = EventAccumulator(str(logs / run.id))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("forget/fp")] == [1, 2]
    assert [e.value for e in acc.Scalars("forget/fp")] == pytest.approx([h["forget_top1"] for h in run.history])
    # the loop's reading at its last step: retain, and the deployed model's forget (the final metric's)
    assert [(e.step, e.value) for e in acc.Scalars("retain/fp")] == [(2, pytest.approx(run.history[-1]["retain_top1"]))]
    assert [(e.step, e.value) for e in acc.Scalars("forget/nf4")] == [(2, pytest.approx(run.metrics.forget.after_q))]
    assert acc.Scalars("final/forget/nf4")[0].value == pytest.approx(run.metrics.forget.after_q)
    assert acc.Scalars("final/retain/fp")[0].value == pytest.approx(run.metrics.retain.after_fp)
    assert "loss" in scalars and "final/ptq_gap" in scalars
    # the whole-answer metrics and multiple-choice accuracy are logged beside top-1
    assert acc.Scalars("final/exact/forget/nf4")[0].value == pytest.approx(run.metrics.exact.forget.after_q)
    assert acc.Scalars("final/logprob/retain/fp")[0].value == pytest.approx(run.metrics.logprob.retain.after_fp)
    assert acc.Scalars("final/forget_mc/fp")[0].value == pytest.approx(run.metrics.multiple_choice.after_fp)
    (text,) = acc.Tensors("config/text_summary")  # the config, as a text summary
    assert '"method": "graddiff"' in text.tensor_proto.string_val[0].decode()


def test_mlflow_tracking_reads_back(facts_tiny, split, tmp_path):
    pytest.importorskip("mlflow", reason="MLflow is an optional extra: mansu-workbench[tracking]")
    from mlflow.tracking import MlflowClient

    from workbench.experiments.tracking import EXPERIMENT, TrackingConfig, open_tracker

    run = _one_run(facts_tiny, split, str(tmp_path / "runs"), method="mansu")
    store = tmp_path / "mlruns"
    tracker = open_tracker(TrackingConfig.of("mlflow", str(store)))
    tracker.log_run(run)
    client = MlflowClient(tracking_uri=store.as_uri())
    (logged,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert logged.data.tags["workbench.run_id"] == run.id
    assert logged.data.params["method"] == "mansu" and logged.data.params["quant.type"] == "nf4"
    rounds = client.get_metric_history(logged.info.run_id, "forget/nf4")  # MANSU measures each round quantized
    assert [m.value for m in rounds] == pytest.approx([h["forget_top1_q"] for h in run.history])
    retain = client.get_metric_history(logged.info.run_id, "retain/fp")  # the retain guard's reading per round
    assert run.history and [m.value for m in retain] == pytest.approx([h["retain_top1"] for h in run.history])
    assert logged.data.metrics["final/forget/fp"] == pytest.approx(run.metrics.forget.after_fp)
    assert logged.data.metrics["final/retain/nf4"] == pytest.approx(run.metrics.retain.after_q)
    diagnostics = run.metrics.diagnostics
    assert logged.data.metrics["final/diagnostics/fisher_bound"] == pytest.approx(diagnostics["fisher_bound"])
    assert logged.data.metrics["final/diagnostics/seconds_setup"] == pytest.approx(
        diagnostics["seconds_by_phase"]["setup"])


def test_a_missing_tracking_library_is_a_clear_error(capsys, monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow":
            raise ImportError("no mlflow here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    code, _, err = _cli(capsys, "unlearn", "--model", "facts-tiny", "--report-to", "mlflow",
                        "--runs-root", str(tmp_path))
    assert code == 1 and "pip install 'mansu-workbench[tracking]'" in err
    assert list_runs(root=tmp_path) == []


def test_save_run_records_nothing_extra_without_a_job(tmp_path, run_metrics):
    """A run made outside a table has no job key, so no sweep mistakes it for its own."""
    from workbench.models.update import Update

    run = save_run(config={"method": "ga", "model": "m"}, metrics=run_metrics, update=Update({}),
                   root=tmp_path)
    assert "job_key" not in run.config and finished_jobs(root=tmp_path) == {}
