"""The comparison view: rows from saved runs, every output format, the figures' traces, the
other-quantizer columns, the paper table, and the ``compare`` / ``paper-table`` CLI commands."""

from __future__ import annotations

import csv
import io
import json

import pytest

from workbench.core.errors import WorkbenchError
from workbench.experiments.flow import run_unlearning
from workbench.experiments.store import list_runs
from workbench.faces.cli import main
from workbench.faces.compare import (
    BIN_CROSSING_RATIO,
    ablation_findings,
    ablation_table,
    bucket_overlap_figure,
    compare_row,
    compare_table,
    comparison_csv,
    comparison_figures,
    comparison_markdown,
    forget_fp_vs_quantized_figure,
    output_format,
    paper_table,
    ptq_decomposition_figure,
    quantizer_accuracies,
    update_ratio_figure,
    write_comparison,
)
from workbench.unlearning.task import OptimConfig, StopRule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(facts_tiny, split, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-runs")
    out = []
    for method in ("graddiff", "sure", "graddiff"):  # a repeated method gets distinct labels
        _, _, run = run_unlearning(facts_tiny, split, method=method, optim=OptimConfig(lr=3e-3),
                                   stop=StopRule(max_steps=2), measure_cad=False, runs_root=str(root))
        out.append(run)
    return out, root


def test_rows_carry_the_metrics_and_the_gap_decomposition(runs):
    runs, _ = runs
    rows = compare_table(runs)
    assert [r["run"] for r in rows] == [r.id for r in runs]
    assert rows[1]["method"] == "sure"
    assert rows[0]["method"] != rows[2]["method"] and rows[0]["method"].startswith("graddiff (")
    for row, run in zip(rows, runs):
        m = run.metrics
        assert row["forget fp"] == m.forget.after_fp and row["forget base"] == m.forget.base_fp
        assert row["forget nf4"] == m.forget.after_q and row["retain nf4"] == m.retain.after_q
        assert row["forget fp4"] is None and row["forget int8"] is None  # not measured by the run
        assert row["PTQ gap"] == pytest.approx(row["gap base shift"] + row["gap rounding"], abs=1e-12)
        assert row["gap rounding"] == m.ptq_gap_decomposition.rounding
        assert row["forget Q(w)+Δ"] == m.forget.after_qbase_delta
        assert row["codes changed"] == m.codes_changed and row["params changed"] == m.params_changed
        assert row["median |Δw|/bin"] == m.update_to_bin_width.median
        assert row["CAD fp"] is None and row["structural"] == "–"  # measured without CAD
        assert row["forgetting"] == m.properties.forgetting.verdict in ("PASS", "fail")
        assert row["seconds"] == m.seconds > 0


def test_every_output_format(runs, tmp_path):
    runs, _ = runs
    rows = compare_table(runs)
    md = comparison_markdown(rows)
    lines = md.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "forget fp4" not in lines[0]  # columns nobody measured are dropped
    assert "median \\|Δw\\|/bin" in lines[0]  # a literal | is escaped in Markdown
    parsed = list(csv.DictReader(io.StringIO(comparison_csv(rows))))
    assert [p["run"] for p in parsed] == [r.id for r in runs]
    assert float(parsed[1]["forget fp"]) == pytest.approx(rows[1]["forget fp"])
    for ext in (".md", ".csv", ".html"):
        path = write_comparison(rows, tmp_path / f"table{ext}", runs)
        text = path.read_text()
        assert runs[0].id in text
    page = (tmp_path / "table.html").read_text()
    assert page.count("<table>") == 1 and page.count("plotly-graph-div") == 5
    assert "while unlearning" in page  # forget/retain over each run's steps
    with pytest.raises(WorkbenchError, match="use .md, .csv or .html"):
        output_format(tmp_path / "table.txt")


def test_figures_have_the_expected_traces(runs):
    runs, _ = runs
    rows = compare_table(runs)
    labels = [r["method"] for r in rows]
    fig = forget_fp_vs_quantized_figure(rows)
    names = [t.name for t in fig.data]
    assert names == ["full precision w+Δ", "Q(w)+Δ", "NF4 Q(w+Δ)"]  # FP4/int8 absent: not measured
    assert list(fig.data[0].x) == labels and list(fig.data[2].y) == [r["forget nf4"] for r in rows]

    steps = comparison_figures(rows, runs)[-1]
    first = next(t for t in steps.data if t.name == f"{labels[0]}, full precision" and t.xaxis == "x")
    assert list(first.y) == [h["forget_top1"] for h in runs[0].history if "forget_top1" in h]
    doubled = comparison_figures(rows + rows[:1], [*runs, runs[0]])[-1]  # a method twice: told apart by run id
    assert {t.name for t in doubled.data} >= {f"{labels[0]} · {runs[0].id}, full precision"}

    fig = update_ratio_figure(runs, labels)
    assert [t.name for t in fig.data] == labels
    assert fig.layout.xaxis.type == "log"
    edges = runs[0].metrics.quantization["ratio_edges"]
    assert len(fig.data[0].x) == len(edges) - 1
    total = sum(runs[0].metrics.quantization["overall"]["ratio_counts"])
    assert sum(fig.data[0].y) == pytest.approx(total / runs[0].metrics.params_changed, rel=1e-6)
    vlines = [s for s in fig.layout.shapes if s.x0 == s.x1]
    assert [s.x0 for s in vlines] == [BIN_CROSSING_RATIO]
    assert any("½ bin" in a.text for a in fig.layout.annotations)

    fig = bucket_overlap_figure(rows)
    assert [t.name for t in fig.data] == ["bucket overlap", "code overlap"]
    assert list(fig.data[1].y) == [r["code overlap"] for r in rows]

    fig = ptq_decomposition_figure(rows)
    assert fig.layout.barmode == "relative"
    shift, rounding, total = fig.data
    assert list(shift.y) == [r["gap base shift"] for r in rows]
    assert list(rounding.y) == [r["gap rounding"] for r in rows]
    assert list(total.y) == [r["PTQ gap"] for r in rows]


def test_other_quantizers_match_a_direct_evaluation(facts_tiny, split, runs):
    from workbench.measurement.evaluation import evaluate_facts
    from workbench.quant import QuantConfig

    run = runs[0][1]  # SURE: a large sparse update, so the quantizers can disagree
    accs = quantizer_accuracies(run, model=facts_tiny, split=split)
    assert set(accs) == {"nf4", "fp4", "int8"}
    assert accs["nf4"]["forget"] == run.metrics.forget.after_q  # read, not recomputed
    after = run.update().apply(facts_tiny)
    from workbench.quant import fake_quantize_model

    q = fake_quantize_model(after.hf, QuantConfig("int8"), progress=lambda *_: None)
    assert accs["int8"]["forget"] == evaluate_facts(q, split.forget, tokenizer=facts_tiny.tokenizer,
                                                     multiple_choice=False).top1
    row = compare_row(run, "sure", accs)
    assert row["forget fp4"] == accs["fp4"]["forget"] and row["retain int8"] == accs["int8"]["retain"]
    assert "forget fp4" in comparison_markdown([row]).splitlines()[0]


def test_paper_table_runs_every_method_with_one_rule(facts_tiny, split, tmp_path):
    runs = paper_table(facts_tiny, methods=["ga", "rmu", "quail"], split=split,
                       stop=StopRule(max_steps=2, forget_target=0.2), measure_cad=False, runs_root=str(tmp_path))
    assert [r.metrics.method for r in runs] == ["ga", "rmu", "quail"]
    assert all(r.config["stop"] == {"max_steps": 2, "forget_target": 0.2, "eval_every": 1} for r in runs)
    assert {r.id for r in list_runs(root=tmp_path)} == {r.id for r in runs}
    with pytest.raises(WorkbenchError, match="unknown method"):
        paper_table(facts_tiny, methods=["ga", "retrain"], runs_root=str(tmp_path))


def test_ablation_table_switches_off_one_component_per_run(facts_tiny, split, tmp_path):
    from workbench.unlearning.mansu import MansuConfig

    config = MansuConfig(params_per_round=16, max_rounds=2, fisher_samples=32)
    runs = ablation_table(facts_tiny, ablations=["floor", "fisher"], config=config, split=split,
                          measure_cad=False, runs_root=str(tmp_path))
    assert [r.metrics.method for r in runs] == ["mansu", "mansu-no_floor", "mansu-no_fisher"]
    switches = [{k: r.config["mansu"][f"use_{k}"] for k in ("circuit", "projection", "fisher", "floor")} for r in runs]
    assert switches[0] == dict(circuit=True, projection=True, fisher=True, floor=True)
    assert switches[1] == dict(circuit=True, projection=True, fisher=True, floor=False)
    assert switches[2] == dict(circuit=True, projection=True, fisher=False, floor=True)
    # everything else is shared: budget, split, circuit
    assert {r.config["mansu"]["max_rounds"] for r in runs} == {2}
    assert len({r.metrics.split for r in runs}) == 1 and len({r.metrics.circuit for r in runs}) == 1
    # no floor: sub-bin moves, so (unlike MANSU) not every moved weight changes its code
    assert runs[0].metrics.moved_code_changed_fraction == 1.0
    assert runs[1].metrics.moved_code_changed_fraction < 1.0
    with pytest.raises(WorkbenchError, match="unknown ablation"):
        ablation_table(facts_tiny, ablations=["circuit", "dropout"], runs_root=str(tmp_path))
    with pytest.raises(WorkbenchError, match="no ablation named"):
        ablation_table(facts_tiny, ablations=[" "], runs_root=str(tmp_path))


def test_ablation_findings_name_the_flipped_properties():
    def row(method, forgetting, ptq, forget_q, retain, params):
        return {"method": method, "quantizer": "nf4", "forgetting": forgetting, "retain kept": "PASS",
                "PTQ gap ok": ptq, "structural": "fail", "forget nf4": forget_q, "retain fp": retain,
                "params changed": params}

    rows = [row("mansu", "PASS", "PASS", 0.05, 1.0, 1000), row("mansu-no_floor", "fail", "PASS", 0.85, 1.0, 900),
            row("mansu-no_circuit", "PASS", "PASS", 0.06, 1.0, 1000)]
    lines = ablation_findings(rows)
    assert lines[0] == ("mansu-no_floor: forgetting PASS → fail "
                        "(forget nf4 +0.800, retain fp +0.000, params changed -100)")
    assert lines[1].startswith("mansu-no_circuit: no property flips (forget nf4 +0.010")
    assert ablation_findings(rows[:1]) == []


# --- CLI --------------------------------------------------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_compare_stdout_and_files(capsys, runs, tmp_path):
    runs, root = runs
    ids = [r.id for r in runs]
    code, out, err = _cli(capsys, "compare", *ids, "--runs-root", str(root))
    assert code == 0, err
    assert out.startswith("| method | run |") and all(i in out for i in ids)
    for ext in ("md", "csv", "html"):
        target = tmp_path / f"cmp.{ext}"
        code, out, err = _cli(capsys, "compare", *ids, "--runs-root", str(root), "--out", str(target))
        assert code == 0, err
        assert str(target) in out and target.exists()
    code, _, err = _cli(capsys, "compare", *ids, "--runs-root", str(root), "--out", str(tmp_path / "cmp.xlsx"))
    assert code == 1 and "unsupported output extension '.xlsx'" in err
    code, _, err = _cli(capsys, "compare", "no-such-run", "--runs-root", str(root))
    assert code == 1 and "no run 'no-such-run'" in err


def test_cli_paper_table(capsys, facts_tiny, tmp_path):
    out_file = tmp_path / "paper.csv"
    code, out, err = _cli(capsys, "paper-table", "--model", "facts-tiny", "--methods", "graddiff,lora",
                          "--max-steps", "2", "--no-cad", "--no-oracle", "--runs-root", str(tmp_path / "r"),
                          "--out", str(out_file), "--json")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out_file.read_text())))
    assert [r["method"] for r in rows] == ["graddiff", "lora"]
    assert len(list_runs(root=tmp_path / "r")) == 2
    printed = json.loads(out)  # --json: the table's rows, the runs and the file written, nothing else
    assert [r["method"] for r in printed["rows"]] == ["graddiff", "lora"] and printed["out"] == str(out_file)
    assert {r["id"] for r in printed["runs"]} == {r.id for r in list_runs(root=tmp_path / "r")}
    code, _, err = _cli(capsys, "paper-table", "--model", "facts-tiny", "--methods", "graddiff,bogus",
                        "--runs-root", str(tmp_path / "r2"))
    assert code == 1 and "unknown method(s) bogus" in err
    assert not (tmp_path / "r2").exists() or list_runs(root=tmp_path / "r2") == []


def test_cli_ablate(capsys, facts_tiny, tmp_path):
    out_file = tmp_path / "ablations.md"
    code, out, err = _cli(capsys, "ablate", "--model", "facts-tiny", "--ablations", "projection", "--max-rounds", "1",
                          "--no-cad", "--no-oracle", "--runs-root", str(tmp_path / "r"), "--out", str(out_file))
    assert code == 0, err
    table = out_file.read_text()
    assert "| mansu |" in table and "| mansu-no_projection |" in table
    assert "mansu-no_projection: " in out  # the findings line under the table
    assert len(list_runs(root=tmp_path / "r")) == 2
    code, out, err = _cli(capsys, "ablate", "--model", "facts-tiny", "--ablations", "projection", "--max-rounds", "1",
                          "--no-cad", "--no-oracle", "--runs-root", str(tmp_path / "r"), "--json")
    assert code == 0, err
    printed = json.loads(out)
    assert [r["method"] for r in printed["rows"]] == ["mansu", "mansu-no_projection"] and printed["out"] is None
    assert len(printed["findings"]) == 1 and printed["findings"][0].startswith("mansu-no_projection: ")
    # the same jobs in the same runs root: found finished and skipped (resume), not run again
    assert len(list_runs(root=tmp_path / "r")) == 2
    assert {r["run"] for r in printed["rows"]} == {r.id for r in list_runs(root=tmp_path / "r")}
    code, _, err = _cli(capsys, "ablate", "--model", "facts-tiny", "--ablations", "floor,dropout",
                        "--runs-root", str(tmp_path / "r2"))
    assert code == 1 and "choose from circuit, projection, fisher, floor" in err
    assert not (tmp_path / "r2").exists() or list_runs(root=tmp_path / "r2") == []


def test_cli_unlearn_accepts_the_new_methods(capsys, facts_tiny, tmp_path):
    code, _out, err = _cli(capsys, "unlearn", "--model", "facts-tiny", "--method", "rmu", "--max-steps", "2",
                          "--runs-root", str(tmp_path), "--no-oracle")
    assert code == 0, err
    (run,) = list_runs(root=tmp_path)
    assert run.metrics.method == "rmu" and json.loads((run.path / "metrics.json").read_text())["steps"] <= 2
