"""Failure is safe: fuzzed files get a WorkbenchError (never a crash or a half-written file),
a killed run leaves nothing that looks complete, and no public operation modifies the base."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.core.errors import WorkbenchError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# JSON-ish values, including the shapes the loaders expect with wrong types inside
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=12,
)
fact_rows = st.dictionaries(
    st.sampled_from(["prompt", "answer", "choices", "question", "domain", "template", "corrupt_prompt", "x"]),
    json_values, max_size=5,
)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@FUZZ
@given(rows=st.lists(fact_rows | json_values, min_size=1, max_size=4), junk=st.binary(max_size=40),
       suffix=st.sampled_from([".jsonl", ".csv", ".json"]))
def test_fuzzed_fact_files_load_or_fail_clearly(tmp_path, rows, junk, suffix):
    from workbench.data.files import load_fact_file

    path = tmp_path / f"fuzzed-7f3a{suffix}"  # a name no message would contain by accident
    if suffix == ".csv":
        body = "prompt,answer\n" + "\n".join(",".join(str(v) for v in (r.values() if isinstance(r, dict) else [r]))
                                            for r in rows)
        data = body.encode("utf-8", "surrogatepass") + junk
    else:
        data = "\n".join(json.dumps(r) for r in rows).encode() + junk
    path.write_bytes(data)
    try:
        facts = load_fact_file(path)
    except WorkbenchError as exc:
        assert str(path.name) in str(exc)  # the message names the file
    else:
        assert all(f.prompt and f.answer for f in facts)
    assert path.read_bytes() == data  # loading never writes


@FUZZ
@given(data=json_values | st.fixed_dictionaries({"schema": st.just(1), "nodes": json_values, "edges": json_values,
                                                  "metadata": json_values}))
def test_fuzzed_circuit_json_fails_clearly(tmp_path, data):
    from workbench.interpretability.circuit import Circuit

    # A name without "circuit" in it: the message must name this file, not merely say "circuit".
    path = tmp_path / "fuzzed-7f3a.json"
    path.write_text(json.dumps(data))
    try:
        Circuit.load(path)
    except WorkbenchError as exc:
        assert path.name in str(exc), f"the message does not name the file: {exc}"
    # the loader never rewrites the file (compared as text: the fuzzed data may hold NaN, and NaN != NaN)
    assert path.read_text() == json.dumps(data)


@FUZZ
@given(config=st.binary(max_size=30) | json_values.map(lambda v: json.dumps(v).encode()),
       metrics=st.binary(max_size=30) | json_values.map(lambda v: json.dumps(v).encode()),
       update=st.binary(max_size=64))
def test_fuzzed_run_directories_fail_clearly(tmp_path, config, metrics, update):
    from workbench.experiments.store import list_runs, load_run

    root = tmp_path / "runs"
    run = root / "fuzzed-run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_bytes(config)
    (run / "metrics.json").write_bytes(metrics)
    (run / "update.safetensors").write_bytes(update)
    before = _snapshot(root)
    try:
        loaded = load_run("fuzzed-run", root=root)
        loaded.update()
    except WorkbenchError:
        pass
    list_runs(root=root)  # never raises on a damaged run: it is skipped
    assert _snapshot(root) == before


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "/etc", "x\n", ".hidden", "a" * 200, ""])
def test_run_and_circuit_ids_cannot_escape(tmp_path, bad):
    from workbench.experiments.store import load_run

    with pytest.raises(WorkbenchError):
        load_run(bad, root=tmp_path)


def test_a_killed_run_leaves_nothing_that_looks_complete(tmp_path):
    """SIGKILL a real unlearning run while it writes its run directory."""
    root = tmp_path / "runs"
    script = textwrap.dedent(f"""
        import os, time, torch
        torch.set_num_threads(1)
        import workbench.experiments.store as runs
        real = runs._write_json
        def slow(path, data):  # hold the write open so the parent can kill us mid-save
            real(path, data)
            print("WRITING", flush=True)
            time.sleep(60)
        runs._write_json = slow
        from workbench.models.loading import load_model
        from workbench.models.builtin_splits import builtin_split
        from workbench.experiments.flow import run_unlearning
        from workbench.unlearning.task import OptimConfig, StopRule
        m = load_model("facts-tiny")
        run_unlearning(m, builtin_split(m), method="ga", optim=OptimConfig(lr=1e-3),
                       stop=StopRule(max_steps=1, forget_target=None), measure_cad=False, runs_root={str(root)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        deadline = time.time() + 300
        line = b""
        while b"WRITING" not in line and time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert b"WRITING" in line, "the run never reached its save"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    from workbench.experiments.store import list_runs

    assert list_runs(root=root) == []
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []


def test_public_operations_never_modify_the_base(facts_tiny, tmp_path):
    """Weights hash before == after for attribute, edit, unlearn (MANSU and a baseline), quantize,
    compare and evaluate."""
    from workbench.experiments.flow import attribute_forget_set, default_circuit, run_unlearning
    from workbench.interpretability.faithfulness import faithfulness
    from workbench.measurement.evaluation import evaluate_split
    from workbench.measurement.metrics import build_variants
    from workbench.models.builtin_splits import builtin_split
    from workbench.quant import QuantConfig, compare_quantization, fake_quantize_model, quantizable_parameters
    from workbench.unlearning.mansu import MansuConfig
    from workbench.unlearning.task import OptimConfig, StopRule

    split = builtin_split(facts_tiny)
    before = facts_tiny.weights_hash()
    nf4 = QuantConfig("nf4")
    attribution = attribute_forget_set(facts_tiny, split)
    circuit = default_circuit(attribution, top_k=4)
    circuit.exclude(sorted(circuit.selected)[0])
    faithfulness(circuit, facts_tiny, list(split.forget[:8]))
    result, _, _ = run_unlearning(facts_tiny, split, method="mansu", circuit=circuit, measure_cad=False,
                                  method_config=MansuConfig(max_rounds=2, params_per_round=8), runs_root=str(tmp_path))
    run_unlearning(facts_tiny, split, method="graddiff", optim=OptimConfig(lr=1e-3), measure_cad=False,
                   stop=StopRule(max_steps=1, forget_target=None), runs_root=str(tmp_path))
    fake_quantize_model(facts_tiny.hf, nf4, progress=lambda *_: None)
    build_variants(facts_tiny, result.update, nf4)
    names = quantizable_parameters(facts_tiny.hf, nf4)
    compare_quantization(facts_tiny.state(), result.update.deltas, names, nf4, progress=lambda *_: None)
    evaluate_split(facts_tiny, split, quant=nf4)
    assert facts_tiny.weights_hash() == before
