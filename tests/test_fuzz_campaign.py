"""A fuzz campaign over every loader a remote user or a damaged disk can feed (issue 18).

Fact files, circuit files, run directories and method settings (the JSON text the app takes and
the values its configs are built from) get generated hostile input: random JSON of the right
and wrong shapes, NaN/Infinity tokens, integers of thousands of digits, nesting thousands deep,
truncated and binary files. Every input must load or fail with a :class:`WorkbenchError` — no
other exception (what the app would show as "something went wrong", a traceback in its log) —
and no loader may write: the directory holding the input is byte-identical afterwards, with no
temporary or half-written file left.

``WORKBENCH_FUZZ_EXAMPLES`` sets the examples per target (default 150); the last test prints the
campaign's totals (``pytest -s``) and writes them to ``$WORKBENCH_FUZZ_REPORT`` when set.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.core.errors import WorkbenchError

EXAMPLES = int(os.environ.get("WORKBENCH_FUZZ_EXAMPLES") or 150)
CAMPAIGN = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TRIED: Counter[str] = Counter()
"""Inputs tried per target, and how they ended (``<target>:loaded`` / ``<target>:refused``)."""

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=16))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=16)
hostile_text = st.one_of(
    json_values.map(lambda v: json.dumps(v, allow_nan=True)),
    st.integers(1, 6000).map(lambda n: "[" * n + "]" * n),                # nesting past any stack
    st.integers(31, 6000).map(lambda n: '{"x": ' + "9" * n + "}"),        # integers of n digits
    st.sampled_from(["NaN", "Infinity", "-Infinity", '{"a": NaN}', "[1e999]", "", "{", "\ufeff{}", "null"]),
    st.text(max_size=64),
)
hostile_bytes = st.one_of(hostile_text.map(str.encode), st.binary(max_size=128),
                          hostile_text.map(lambda t: t.encode()[: max(0, len(t.encode()) // 2)]))  # truncated


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _try(target: str, directory: Path, load) -> None:
    """Run ``load``; only a WorkbenchError may escape it, and ``directory`` must be untouched."""
    before = _snapshot(directory)
    TRIED[target] += 1
    try:
        load()
        TRIED[f"{target}:loaded"] += 1
    except WorkbenchError:
        TRIED[f"{target}:refused"] += 1
    except Exception:
        TRIED[f"{target}:traceback"] += 1
        raise
    if _snapshot(directory) != before:
        TRIED[f"{target}:wrote"] += 1
    assert _snapshot(directory) == before, f"{target}: the loader changed or left files in {directory}"


# --- fact files ----------------------------------------------------------------------------------

fact_rows = st.one_of(
    st.dictionaries(st.sampled_from(["prompt", "answer", "choices", "question", "domain", "relation",
                                     "corrupt_prompt", "template", "x"]), json_values, max_size=6),
    # near-valid rows: a cloze fact or a multiple-choice one, with random extra or damaged fields
    st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20), "answer": st.text(min_size=1, max_size=6)},
                          optional={"domain": scalars, "choices": json_values, "x": json_values}),
    st.fixed_dictionaries({"question": st.text(min_size=1, max_size=20),
                           "choices": st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4),
                           "answer": st.integers(-2, 5) | scalars}),
)


@CAMPAIGN
@given(body=st.one_of(st.lists(fact_rows.map(lambda r: json.dumps(r, allow_nan=True)), min_size=1, max_size=5)
                      .map(lambda rows: "\n".join(rows).encode()), hostile_bytes),
       suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_fact_files(tmp_path_factory, body, suffix):
    from workbench.data.files import load_fact_file

    directory = tmp_path_factory.mktemp("facts")
    path = directory / f"fuzzed{suffix}"
    path.write_bytes(body)
    _try("fact file", directory, lambda: load_fact_file(path))


# --- circuit files -------------------------------------------------------------------------------

circuit_docs = st.fixed_dictionaries(
    {"schema_version": st.sampled_from([1, 2, 3, 99]) | scalars, "nodes": json_values, "edges": json_values},
    optional={"metric": scalars, "method": scalars, "model_fingerprint": scalars, "selected": json_values,
              "scores": json_values, "n_layers": scalars, "n_heads": scalars, "history": json_values},
)


def _real_circuit() -> dict:
    """A valid circuit document (a 2-layer, 2-head model's), for mutation."""
    from workbench.core.components import head, mlp
    from workbench.interpretability.attribution import Attribution
    from workbench.interpretability.circuit import Circuit

    scores = {head(0, 0): 2.0, head(0, 1): -1.5, mlp(0): 0.25, head(1, 0): 1.0, mlp(1): -3.0}
    attribution = Attribution(scores=scores, method="atp", metric="logit_diff", n_pairs=8, prompts_hash="f00d",
                              model_fingerprint="abc123", clean_metric=3.5, corrupt_metric=-0.5, n_layers=2,
                              n_heads=2)
    return Circuit.from_attribution(attribution).select_top_k(2).to_dict()


REAL_CIRCUIT = _real_circuit()


def _mutated(doc: dict, key: str, value: object, drop: bool) -> dict:
    out = dict(doc)
    if drop:
        out.pop(key, None)
    else:
        out[key] = value
    return out


mutated_circuits = st.builds(_mutated, st.just(REAL_CIRCUIT), st.sampled_from(sorted(REAL_CIRCUIT)),
                             json_values, st.booleans())


@CAMPAIGN
@given(body=st.one_of(circuit_docs.map(lambda d: json.dumps(d, allow_nan=True).encode()),
                      mutated_circuits.map(lambda d: json.dumps(d, allow_nan=True).encode()),
                      st.just(json.dumps(REAL_CIRCUIT).encode()), hostile_bytes))
def test_circuit_files(tmp_path_factory, body):
    from workbench.interpretability.circuit import Circuit

    directory = tmp_path_factory.mktemp("circuit")
    path = directory / "fuzzed.json"
    path.write_bytes(body)
    _try("circuit file", directory, lambda: Circuit.load(path))


# --- run directories -----------------------------------------------------------------------------


def _real_update() -> bytes:
    """A valid ``update.safetensors`` (one small delta), as the run store writes it."""
    import tempfile

    import torch

    from workbench.models.update import Update

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "update.safetensors"
        Update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(4, 4)}).save(path)
        return path.read_bytes()


REAL_METRICS = json.loads((Path(__file__).parent / "data" / "metrics_v1.json").read_text())
mutated_metrics = st.builds(_mutated, st.just(REAL_METRICS), st.sampled_from(sorted(REAL_METRICS)), json_values,
                            st.booleans())


@CAMPAIGN
@given(config=st.one_of(st.just(b'{"method": "mansu", "model": "facts-tiny"}'), hostile_bytes),  # valid first:
       metrics=st.one_of(st.just(json.dumps(REAL_METRICS).encode()),                          # hypothesis draws
                         mutated_metrics.map(lambda d: json.dumps(d, allow_nan=True).encode()),  # early branches
                         hostile_bytes),                                                        # more often
       history=st.one_of(st.just(b"[]"), hostile_bytes),
       update=st.one_of(st.builds(lambda: _real_update()), st.binary(max_size=128)))
def test_run_directories(tmp_path_factory, config, metrics, history, update):
    from workbench.experiments.store import list_runs, load_run

    root = tmp_path_factory.mktemp("runs")
    run = root / "fuzzed-run"
    run.mkdir()
    for name, data in (("config.json", config), ("metrics.json", metrics), ("history.json", history),
                       ("update.safetensors", update)):
        (run / name).write_bytes(data)

    def load() -> None:
        load_run("fuzzed-run", root=root).update()

    _try("run directory", root, load)
    _try("run listing", root, lambda: list_runs(root=root))  # a damaged run is skipped, never raised


# --- method settings -----------------------------------------------------------------------------

setting_values = st.one_of(scalars, st.integers(-(10**40), 10**40), st.lists(scalars, max_size=3))


def _methods() -> list[str]:
    from workbench.unlearning.registry import METHODS

    return list(METHODS)


@CAMPAIGN
@given(method=st.sampled_from(_methods()), text=hostile_text,
       fields=st.dictionaries(st.sampled_from(["rank", "alpha", "beta", "gamma", "lr_scale", "row_fraction",
                                               "steering_scale", "layer", "seed", "hinge_weight", "margin_scale",
                                               "bogus"]), setting_values, max_size=4),
       mansu=st.dictionaries(st.sampled_from(["max_rounds", "fisher_budget", "params_per_round", "code_steps",
                                              "retain_guard", "forget_target", "round_fraction", "use_floor",
                                              "bogus"]), setting_values, max_size=4),
       optim=st.dictionaries(st.sampled_from(["lr", "seed", "forget_batch"]), setting_values, max_size=2),
       stop=st.dictionaries(st.sampled_from(["max_steps", "forget_target", "eval_every"]), setting_values,
                            max_size=2),
       as_text=st.booleans())
def test_method_settings(tmp_path_factory, method, text, fields, mansu, optim, stop, as_text):
    from workbench.faces.session import run_configs

    directory = tmp_path_factory.mktemp("settings")
    settings_in = text if as_text else fields
    _try("settings", directory, lambda: run_configs(method, mansu=mansu, optim=optim, stop=stop,
                                                    settings=settings_in))


def test_zz_campaign_report():
    """The totals (this test runs last in the module); every target was exercised."""
    targets = ["fact file", "circuit file", "run directory", "run listing", "settings"]
    if any(TRIED[t] == 0 for t in targets):
        pytest.skip("run the whole module for the campaign's totals")
    report = {t: {"tried": TRIED[t], "loaded": TRIED[f"{t}:loaded"], "refused": TRIED[f"{t}:refused"]}
              for t in targets}
    report["total"] = {"tried": sum(TRIED[t] for t in targets),
                       "tracebacks": sum(TRIED[f"{t}:traceback"] for t in targets),
                       "changed_or_half_written_files": sum(TRIED[f"{t}:wrote"] for t in targets)}
    print("\nfuzz campaign:", json.dumps(report, indent=1))
    if os.environ.get("WORKBENCH_FUZZ_REPORT"):
        Path(os.environ["WORKBENCH_FUZZ_REPORT"]).write_text(json.dumps(report, indent=1))
    assert report["total"]["tracebacks"] == 0 and report["total"]["changed_or_half_written_files"] == 0
    assert all(TRIED[t] >= EXAMPLES for t in targets)
