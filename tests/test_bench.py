"""The attribution benchmark's table structure (no timing assertions)."""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import pytest
import torch

from workbench.core.allocator import jemalloc_library
from workbench.core.errors import WorkbenchError
from workbench.faces.bench import COLUMNS, bench_attribution, format_table, toy_pairs


class SharedRuns:
    """The bench's expensive calls, each run once per distinct set of arguments in this module.

    ``workbench bench --quick`` runs the same child flows (the memory section's on facts-tiny, the
    scale section's at the reduced size), the same libraries rows and the same quantization and
    unlearning sections that the tests below check one by one: each test asserts its own things
    on the one real run instead of running it again (a child flow is tens of seconds). Whichever
    test comes first runs it; every caller gets its own deep copy, so no test sees another's edits.
    """

    def __init__(self) -> None:
        self._done: dict[tuple, Any] = {}

    def _once(self, key: tuple, run) -> Any:
        if key not in self._done:
            self._done[key] = run()
        return copy.deepcopy(self._done[key])

    def run_flow(self, flow: str, model_name: str, *, rounds: int = 3, state_precision: str = "auto") -> dict:
        from workbench.faces.bench_memory import run_flow

        return self._once(("flow", flow, model_name, rounds, state_precision),
                          lambda: run_flow(flow, model_name, rounds=rounds, state_precision=state_precision))

    def run_libraries(self, report: dict) -> dict:
        from workbench.faces.bench_memory import run_libraries

        names = report.get("libraries")
        key = ("libraries", report.get("flow"), report.get("model_bytes"), None if names is None else tuple(names))
        return self._once(key, lambda: run_libraries(report))

    def bench_quantization(self, model, *, density: float = 0.01, seed: int = 0) -> dict:
        from workbench.faces.bench import bench_quantization

        return self._once(("quantization", model.name, density, seed),
                          lambda: _on_one_thread(lambda: bench_quantization(model, density=density, seed=seed)))

    def bench_unlearning(self, model, *, steps: int = 5) -> dict:
        from workbench.faces.bench import bench_unlearning

        return self._once(("unlearning", model.name, steps),
                          lambda: _on_one_thread(lambda: bench_unlearning(model, steps=steps)))


def _on_one_thread(run):
    """``run()`` on one torch thread, as ``workbench bench`` runs these sections (so a row is the
    CLI's whichever test computes it; two threads beside other processes are also far slower)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def shared():
    return SharedRuns()


def test_bench_quick_table_structure():
    from workbench.models.toy import toy_model

    tiny = toy_model("gpt2", n_layers=2, d_model=32, n_heads=4)
    gqa = toy_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2)
    rows = bench_attribution(
        quick=True, models=[(tiny, toy_pairs(tiny, 8, 6)), (gqa, toy_pairs(gqa, 8, 6, seed=1))]
    )
    assert [r["model"] for r in rows] == [tiny.name, gqa.name]
    for row in rows:
        for key, _title, _fmt in COLUMNS:
            assert key in row, key
        for key in ("ours_s", "exact_over_ours", "tl_over_ours", "ig_over_plain"):
            assert row[key] > 0 and math.isfinite(row[key])
        assert row["max_abs_diff_tl"] < 1e-4  # equal scores
        assert -1.0 <= row["spearman_top20"] <= 1.0
        assert row["pairs"] == 8 and row["seq"] == 6
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "exact/ours" in lines[0] and "max|ours-tl|" in lines[0]
    assert set(lines[1]) <= {"-", " "}
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_bench_quantization_and_unlearning_rows(facts_tiny, shared):
    """The quantization and unlearning sections measure what their columns say (no timing asserts).
    Called as ``workbench bench --quick`` calls them (its default density, 3 steps): one run each
    for this test and the CLI's."""
    from workbench.faces.bench import QUANT_COLUMNS, UNLEARN_COLUMNS, format_rows

    q = shared.bench_quantization(facts_tiny)
    assert q["analysis_s"] > 0 and q["bnb_pass_s"] > 0 and math.isfinite(q["analysis_over_bnb"])
    assert q["weights"] > 0 and 0 < q["codes_changed"] < q["weights"]
    u = shared.bench_unlearning(facts_tiny, steps=3)
    assert u["mansu_steps"] == 3 and u["graddiff_steps"] == 3
    assert sum(u["mansu_seconds_by_phase"].values()) <= u["mansu_s"]
    assert u["mansu_round_over_graddiff_step"] < u["mansu_over_graddiff"]  # setup excluded
    # the to-target runs are the methods' defaults, stopped by the shared rule (or their budgets)
    assert u["mansu_to_target_stopped"] in {"target", "retain guard", "budget", "fisher budget"}
    assert u["graddiff_to_target_stopped"] in {"target", "budget"}
    assert u["to_target_mansu_over_graddiff"] == pytest.approx(u["mansu_to_target_s"] / u["graddiff_to_target_s"])
    # MANSU is sparse: its saved update is far smaller than GradDiff's dense one
    assert 0 < u["mansu_update_over_model"] < u["graddiff_update_over_model"]
    assert 0 < u["mansu_params_changed"] < u["graddiff_params_changed"]
    # the readings run took its one reading (at its last step); the plain runs took none
    assert u["graddiff_readings"] == 1 and math.isfinite(u["graddiff_readings_over_plain"])
    for row, cols in ((q, QUANT_COLUMNS), (u, UNLEARN_COLUMNS)):
        lines = format_rows([row], cols).splitlines()
        assert len(lines) == 3 and len({len(line) for line in lines}) == 1


def test_peak_memory_sees_an_allocation():
    import torch

    from workbench.faces.bench import PeakMemory

    with PeakMemory() as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x += 1
        del x
    assert mem.peak_mb > 32


def test_peak_memory_catches_a_peak_shorter_than_its_sampling_interval():
    """A one-module dequantized copy lives ~1 ms: the kernel's high-water mark sees it, a
    sampler with a 10 s interval cannot (so the reading comes from VmHWM, not sampling)."""
    import torch

    from workbench.faces.bench import PeakMemory

    with PeakMemory(interval=10.0) as mem:
        x = torch.ones(48 * 2**20 // 4)  # 48 MiB, touched, freed at once
        x += 1
        del x
    if not mem.exact:
        pytest.skip("no /proc/self/clear_refs here (not Linux): only the sampling fallback exists")
    assert mem.peak_mb > 32


def test_cli_bench_quick_writes_every_section(tmp_path, capsys, monkeypatch, shared):
    """``workbench bench --quick``, the fast version of the full bench, end to end. Its child flows,
    libraries rows, quantization and unlearning sections are the runs the tests of this module
    check one by one (:class:`SharedRuns`): run once, by whichever test comes first."""
    import json

    from workbench.faces import bench
    from workbench.faces.cli import main

    for name in ("run_flow", "run_libraries", "bench_quantization", "bench_unlearning"):
        monkeypatch.setattr(bench, name, getattr(shared, name))
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["seconds"] > 0
    assert {"attribution", "quantization", "unlearning"} <= set(report)
    assert report["attribution"][0]["max_abs_diff_tl"] < 1e-4  # ours agrees with TransformerLens
    assert report["unlearning"][0]["mansu_update_over_model"] < 0.05  # the MANSU update-size target
    for title in ("tl/ours", "ours/bnb", "MANSU/GD to target", "s in all", "its libraries alone",
                  "imported alone in a fresh process", "memory allocator in the flows' processes: "):
        assert title in printed
    for section in ("memory", "scale"):  # the floor's row stands right under its flow's phases
        phases = [row["phase"] for row in report[section]]
        assert phases[phases.index("its libraries alone") - 1] in ("mansu", "measurement")
    assert main(["bench", "speed"]) == 1  # unknown section: a clear error, exit code 1
    assert main(["bench", "flow", "--threads", "0"]) == 1  # checked before any section runs
    assert "--threads must be a positive integer, got 0" in capsys.readouterr().err


def test_bench_flow_times_every_step_and_both_paths_measure_the_same(monkeypatch):
    """`workbench bench flow --quick`: the app's flow twice (reference and fast path) on facts-tiny;
    the MANSU runs' metrics are equal and a difference would be named."""
    from dataclasses import replace

    from workbench.faces import bench_flow as bench_flow_module
    from workbench.faces.bench_flow import FLOW_STEPS, bench_flow, same_measurements

    ran_on: list[int] = []  # the torch threads each path ran on
    real_run_flow = bench_flow_module.run_flow

    def run_flow(*args, **kwargs):
        ran_on.append(torch.get_num_threads())
        return real_run_flow(*args, **kwargs)

    monkeypatch.setattr(bench_flow_module, "run_flow", run_flow)
    threads = torch.get_num_threads()
    # Both paths on one thread, a count other than the suite's two on two cores (the restore is then seen):
    # two threads beside the other processes of a shared 2-core machine made this test 5-9x slower.
    flow = bench_flow("facts-tiny", max_rounds=2, threads=1)
    assert ran_on == [1, 1]  # both paths ran on the count asked
    assert torch.get_num_threads() == threads  # the caller's thread count is restored
    assert flow.differing == []
    rows = flow.rows()
    assert [r["step"] for r in rows] == [*FLOW_STEPS, "total"]
    assert all(r["fast_s"] >= 0 and r["reference_s"] >= 0 for r in rows)
    assert flow.reference.seconds["readout"] == 0.0 < flow.fast.seconds["readout"]  # inside the reference edit
    assert flow.fast.metrics.steps <= 2 and flow.fast.metrics.run_id != flow.reference.metrics.run_id
    assert same_measurements(flow.fast.metrics, replace(flow.fast.metrics, seconds=1e9, run_id="x")) == []
    moved = replace(flow.fast.metrics, ptq_gap=flow.fast.metrics.ptq_gap + 0.01, params_changed=0)
    assert same_measurements(flow.fast.metrics, moved) == ["params_changed", "ptq_gap"]


@pytest.mark.parametrize(("state", "held"), [("auto", "storage"), ("float32", "float32")])
def test_scale_bench_reduced_runs_every_phase_in_a_child_process(state, held, shared):
    """``workbench bench scale`` at its reduced size: a random bf16 Llama built in a child process,
    attributed, unlearned (MANSU, 3 rounds, top-10 circuit, its state in ``state``: the default,
    "auto", holds it in the model's bf16) and measured; peak RSS per phase."""
    from workbench.faces.bench import format_rows
    from workbench.faces.bench_memory import MEMORY_COLUMNS, circuit_note, memory_rows

    report = shared.run_flow("scale", "reduced", state_precision=state)  # "auto": the CLI's run
    assert [p["phase"] for p in report["phases"]] == ["load", "attribution", "mansu", "measurement"]
    # a 2-layer d128 Llama with a 2000-word vocabulary, in bfloat16 (2 bytes per parameter)
    n_params = 2 * 2000 * 128 + 2 * (2 * 128 * 128 + 2 * 128 * 32 + 3 * 128 * 352 + 2 * 128) + 128
    assert report["model_bytes"] == 2 * n_params
    for p in report["phases"]:
        assert p["seconds"] > 0 and p["peak_rss_bytes"] >= report["imports_rss_bytes"]
        assert p["peak_over_model"] == p["peak_rss_bytes"] / report["model_bytes"]
    assert report["max_rss_bytes"] == max(p["peak_rss_bytes"] for p in report["phases"])
    assert "peak/model" in format_rows(memory_rows(report), MEMORY_COLUMNS)
    mansu = report["phases"][2]  # says what its circuit held: MANSU's state is per candidate weight
    assert len(mansu["circuit"].split()) == 10 and 0 < mansu["candidate_weights"] < mansu["model_weights"] == n_params
    note = circuit_note(memory_rows(report))
    assert note is not None and f"{mansu['candidate_weights']:,} candidate weights" in note
    assert mansu["state_precision"] == held  # as the run decided it
    _check_start_held(report, mapped=False)  # built in the child: no checkpoint file mapped
    if state == "auto":
        _check_libraries_alone(report, shared)
    assert f"MANSU holds {'bfloat16' if held == 'storage' else 'float32'} state" in note


def test_scale_edges_bench_reduced_attributes_with_edges_in_sized_then_whole_passes(shared):
    """``workbench bench scale``'s second flow at its reduced size: the app's default attribution
    (edges) on the scale model, in sized passes then in one pass of 32 pairs, each a phase that
    says the passes it ran (the reduced model is far under 128 MiB, so both run 32 at once)."""
    from workbench.faces.bench_memory import memory_rows, passes_note

    report = shared.run_flow("scale-edges", "reduced")  # the CLI's run
    phases = report["phases"]
    assert [p["phase"] for p in phases] == ["load", "attribution (edges, sized passes)",
                                             "attribution (edges, 32 pairs per pass)"]
    assert phases[1]["pairs_per_pass"] == phases[2]["pairs_per_pass"] == [32]
    assert all(p["seconds"] > 0 and p["peak_rss_bytes"] >= report["imports_rss_bytes"] for p in phases)
    assert passes_note(memory_rows(report)) == ("attribution (edges, sized passes): 1 pass of 32 pairs; "
                                                "attribution (edges, 32 pairs per pass): 1 pass of 32 pairs")
    several = [{"phase": "p", "pairs_per_pass": [11, 11, 10]}, {"phase": "q", "pairs_per_pass": None}]
    assert passes_note(several) == "p: 3 passes of 11 + 11 + 10 pairs"


def test_gradient_bench_runs_each_gradient_both_ways_mansus_choice_first(shared):
    """The memory section's third flow on facts-tiny: MANSU's retain gradient over short facts and
    over long ones, each as MANSU decides (a tiny model keeps its blocks), then the other way;
    the child raises if the two gradients of a set differ in any bit. Then the retain Fisher on
    the same facts, a whole chunk per pass (a tiny model's facts fit the budget)."""
    report = shared.run_flow("gradient", "facts-tiny")  # the CLI's run
    phases = report["phases"]
    assert [p["phase"] for p in phases] == [
        "load", "gradient, 32 facts, blocks kept (MANSU's choice)", "gradient, 32 facts, blocks recomputed",
        "fisher, 32 facts, 16 facts per pass (MANSU's choice)",
        "gradient, 32 long facts, blocks kept (MANSU's choice)", "gradient, 32 long facts, blocks recomputed",
        "fisher, 32 long facts, 16 facts per pass (MANSU's choice)"]
    assert [p.get("recomputed") for p in phases] == [None, False, True, None, False, True, None]
    assert [p.get("facts_per_pass") for p in phases] == [None, None, None, 16, None, None, 16]
    # the context fills what facts-tiny's positions allow, far past its own short prompts
    assert phases[4]["tokens_per_fact"] > 2 * phases[1]["tokens_per_fact"]
    assert phases[3]["tokens_per_fact"] == phases[1]["tokens_per_fact"]
    assert phases[3]["per_fact_bytes"] < phases[6]["per_fact_bytes"] and phases[3]["budget_bytes"] >= 2**27
    assert all(p["seconds"] > 0 and p["peak_rss_bytes"] >= report["imports_rss_bytes"] for p in phases)
    _check_start_held(report, mapped=True)  # facts-tiny is read from its safetensors file


def test_graddiff_bench_runs_the_shared_loop_for_the_steps_asked(shared):
    """The memory section's GradDiff flow on facts-tiny: the load, then exactly the steps asked of
    the gradient baselines' loop (no forget target to stop it earlier), in a child process. Three
    steps, as the CLI's memory section asks (its default rounds): one run for both tests."""
    report = shared.run_flow("graddiff", "facts-tiny", rounds=3)
    assert [p["phase"] for p in report["phases"]] == ["load", "graddiff"]
    graddiff = report["phases"][1]
    assert (graddiff["steps"], graddiff["stopped"]) == (3, "budget") and graddiff["seconds"] > 0
    # the child ran under the app's allocator: jemalloc where it is installed
    chosen = os.environ.get("WORKBENCH_MALLOC", "").strip().lower()
    assert report["allocator"] == ("system" if chosen == "system" or not jemalloc_library() else "jemalloc")
    _check_start_held(report, mapped=True)
    _check_libraries_alone(report, shared)


def _check_libraries_alone(report, shared):
    """A flow's report lists the modules it imported that are not the workbench's, and those
    imported alone in a fresh process make a row of the memory tables: a resident size above a
    bare interpreter's (torch alone is ~200 MiB) and below the flow's peak (by its last phase the
    flow has imported them all, and holds the workbench, the model and its data besides; an earlier
    phase can peak below them, before the libraries it has not yet needed)."""
    from workbench.faces.bench_memory import LIBRARIES_PHASE, libraries_note

    names = report["libraries"]
    assert {"torch", "transformers", "transformer_lens", "bitsandbytes"} <= set(names)
    assert not [n for n in names if n == "workbench" or n.startswith("workbench.") or n == "__main__"]
    row = shared.run_libraries(report)
    assert (row["flow"], row["phase"], row["modules"]) == (report["flow"], LIBRARIES_PHASE, len(names))
    bare = shared.run_libraries({**report, "libraries": []})["peak_rss_bytes"]
    assert bare + 150 * 2**20 < row["peak_rss_bytes"] < report["max_rss_bytes"]
    assert row["peak_over_model"] == row["peak_rss_bytes"] / report["model_bytes"]
    assert row["failed"] <= len(names) // 100  # a few modules need another's set-up first; not the stack
    assert f"hold {row['peak_rss_mib']:,.0f} MiB, {row['peak_over_model']:.2f}x the model" in libraries_note(row)


def test_the_libraries_row_counts_a_module_that_fails_to_import_and_refuses_a_report_without_a_list():
    from workbench.faces.bench_memory import libraries_note, run_libraries

    row = run_libraries({"flow": "f", "model_bytes": 2**30, "libraries": ["json", "no_such_module_for_the_bench"]})
    assert (row["modules"], row["failed"]) == (2, 1)
    assert "(1 of them failed to import alone)" in libraries_note(row)
    with pytest.raises(WorkbenchError, match="the 'f' report lists no libraries"):
        run_libraries({"flow": "f", "model_bytes": 2**30})


def _check_start_held(report, *, mapped):
    """Each phase of a memory report says what the process held when it started, in parts that add
    up to it (read moments apart), and the peak above it; after the load, a model read from a
    checkpoint holds that file's pages (transformers maps it), one built in memory none."""
    from workbench.faces.bench_memory import held_notes, memory_rows

    for i, p in enumerate(report["phases"]):
        assert 0 < p["start_rss_bytes"] <= p["peak_rss_bytes"]
        assert abs(sum(p["start_held"].values()) - p["start_rss_bytes"]) < 16 * 2**20
        assert p["above_start_over_model"] == (p["peak_rss_bytes"] - p["start_rss_bytes"]) / report["model_bytes"]
        if i > 0:
            files = p["start_held"]["weight_files"]
            assert files >= 0.9 * report["model_bytes"] if mapped else files == 0
    last = report["phases"][-1]
    note = held_notes(memory_rows(report))
    assert len(note) == 1 and note[0].startswith(f'{report["flow"]}: when "{last["phase"]}" started')
    assert f"{last['start_rss_bytes'] / report['model_bytes']:.2f}x the model" in note[0]


def test_held_by_kind_sorts_resident_pages_by_what_is_mapped():
    """``/proc/self/smaps`` lines: each mapping's ``Rss`` goes to checkpoint files, other files or
    anonymous memory by its header's path (none, ``[heap]``, a library, a ``.safetensors``)."""
    from workbench.faces.bench_memory import held_by_kind

    smaps = """\
55d0c0000000-55d0c1000000 rw-p 00000000 00:00 0                          [heap]
Size:              16384 kB
Rss:                8000 kB
Pss:                8000 kB
7f0000000000-7f0010000000 r--p 00000000 08:01 1234                       /cache/model.safetensors
Size:             262144 kB
Rss:              262000 kB
7f0020000000-7f0020800000 r-xp 00000000 08:01 99                         /usr/lib/libtorch_cpu.so
Rss:               4000 kB
Swap:                 0 kB
7f0030000000-7f0031000000 rw-p 00000000 00:00 0
Rss:               1000 kB
7f0040000000-7f0041000000 r--p 00000000 08:01 7                          /data/pytorch_model.bin
Rss:                 24 kB
""".splitlines()
    assert held_by_kind(smaps) == {"weight_files": (262000 + 24) * 1024, "other_files": 4000 * 1024,
                                   "anonymous": (8000 + 1000) * 1024}
    assert held_by_kind([]) == {"weight_files": 0, "other_files": 0, "anonymous": 0}


def test_gradient_bench_runs_a_fisher_over_the_budget_both_ways(toy_llama_gqa, monkeypatch):
    """The Fisher phases with a budget of three facts: MANSU's choice (3 per pass), then a whole
    chunk; the phase checks the two agree (and raises on a Fisher that does not)."""
    from workbench.core.sharing import sharing_copy
    from workbench.data.facts import Fact
    from workbench.faces import bench_memory
    from workbench.models.loaded import LoadedModel
    from workbench.models.scoring import FactBatch
    from workbench.unlearning.mansu import state as mansu_state
    from workbench.unlearning.mansu.fisher import per_example_bytes

    model = toy_llama_gqa
    work = sharing_copy(model.hf).eval()
    names = [n for n, p in work.named_parameters() if p.dim() == 2 and ".layers.0.mlp." in n]
    batch = FactBatch.from_facts(model.tokenizer, [Fact(" ".join(f"w{i}" for i in range(20 + k)), "w1", ())
                                                   for k in range(16)])
    per_fact = mansu_state.gradient_memory(model, work, names, (batch,), per_example_bytes(work, names)).per_fact
    monkeypatch.setattr(LoadedModel, "working_budget_bytes", lambda self: 3 * per_fact)
    rows: list[dict] = []
    bench_memory._fisher_phases(rows, model, work, names, batch, "16 facts")
    assert [r["phase"] for r in rows] == ["fisher, 16 facts, 3 facts per pass (MANSU's choice)",
                                         "fisher, 16 facts, 16 facts per pass"]
    assert [r["facts_per_pass"] for r in rows] == [3, 16] and rows[0]["per_fact_bytes"] == per_fact
    real = bench_memory.mansu_fisher.diagonal_fisher

    def off_when_chunked(*args, chunk, **kwargs):
        fisher = real(*args, chunk=chunk, **kwargs)
        return {n: f * (1.001 if chunk < 16 else 1.0) for n, f in fisher.items()}

    monkeypatch.setattr(bench_memory.mansu_fisher, "diagonal_fisher", off_when_chunked)
    with pytest.raises(SystemExit, match="differs from a whole chunk"):
        bench_memory._fisher_phases([], model, work, names, batch, "16 facts")


def test_memory_bench_refuses_unknown_flows():
    from workbench.core.errors import WorkbenchError
    from workbench.faces.bench_memory import run_flow

    with pytest.raises(WorkbenchError, match="unknown memory flow"):
        run_flow("everything", "facts-tiny")
    with pytest.raises(WorkbenchError, match="state precision must be one of auto, float32, storage, got 'int8'"):
        run_flow("scale", "reduced", state_precision="int8")
    from typing import get_args

    from workbench.faces.bench_memory import STATE_PRECISIONS
    from workbench.unlearning.mansu.config import StatePrecision

    assert get_args(StatePrecision) == STATE_PRECISIONS


def test_the_memory_bench_says_which_working_budget_its_children_inherit(monkeypatch):
    from workbench.faces.bench_memory import budget_note

    monkeypatch.delenv("WORKBENCH_WORKING_MB", raising=False)
    assert budget_note() == "working budget: the default (a quarter of each model's bytes, at least 128 MiB)"
    monkeypatch.setenv("WORKBENCH_WORKING_MB", "128")
    assert budget_note() == "working budget: 128 MiB ($WORKBENCH_WORKING_MB)"
    monkeypatch.setenv("WORKBENCH_WORKING_MB", "0")
    with pytest.raises(WorkbenchError, match="at least 1"):
        budget_note()
