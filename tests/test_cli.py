"""The command-line face, driven in-process through ``workbench.faces.cli.main`` on facts-tiny
(and as ``python -m workbench`` for the version and the app)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workbench.data.files import save_fact_file
from workbench.faces.cli import main
from workbench.measurement.evaluation import evaluate_facts, evaluate_split
from workbench.measurement.results import SCHEMA_VERSION
from workbench.models.builtin_splits import builtin_split
from workbench.models.builtins import BUILTINS
from workbench.models.update import Update
from workbench.quant import QuantConfig, quantizable_parameters

SETS = ("forget", "retain", "forget_paraphrase", "retain_paraphrase")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> list[list[str]]:
    """Rows of the first text table in ``out``: the lines after its ``----`` rule that are
    as wide as the rule (text_table pads every line to the same width)."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    rows = []
    for line in lines[rule + 1 :]:
        if len(line) != len(lines[rule]):
            break
        rows.append(line.split())
    return rows


def floats(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", text)]


def assert_error(code: int, err: str, *needles: str) -> None:
    assert code == 1  # a refused input; 2 is argparse's malformed command line
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for needle in needles:
        assert needle in last, (needle, last)


@pytest.fixture(scope="module")
def split(facts_tiny):
    return builtin_split(facts_tiny)


# --- models / build ---------------------------------------------------------------------


def test_models_lists_the_builtins(capsys, facts_tiny):
    code, out, _ = run(capsys, "models")
    assert code == 0
    rows = {r[0]: r for r in table_rows(out)}
    assert set(rows) == set(BUILTINS)
    assert rows["facts-tiny"][1] == "yes"  # cached by the fixture
    assert "model" in out.splitlines()[0] and "cached" in out.splitlines()[0]


def test_build_of_a_cached_model_reports_its_path(capsys, facts_tiny):
    code, out, _ = run(capsys, "build", "facts-tiny")
    assert code == 0
    assert out.startswith("facts-tiny: ") and "facts-tiny-v" in out and "built in" in out
    assert str(facts_tiny.path) in out


# --- eval -------------------------------------------------------------------------------


def test_eval_table_has_every_set_in_fp32_and_nf4(capsys, facts_tiny):
    code, out, _ = run(capsys, "eval", "--model", "facts-tiny", "--quant", "nf4")
    assert code == 0
    assert out.startswith("model facts-tiny · split pathogens-seed0-tiny")
    rows = table_rows(out)
    assert {(r[0], r[1]) for r in rows} == {(s, p) for s in SETS for p in ("fp32", "nf4/b64")}
    assert len(rows) == 8
    for r in rows:
        assert r[2].isdigit() and int(r[2]) > 0
        # top1, exact, logprob, mc, p(answer): logprob is a log-probability, the rest fractions
        for j, cell in enumerate(r[3:], start=3):
            assert float(cell) <= 0.0 if j == 5 else 0.0 <= float(cell) <= 1.0


def test_eval_json_equals_evaluate_split(capsys, facts_tiny, split):
    code, out, _ = run(capsys, "eval", "--model", "facts-tiny", "--quant", "nf4", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["model"] == "facts-tiny" and data["split"] == split.name
    expected = {"fp32": evaluate_split(facts_tiny, split), "nf4/b64": evaluate_split(facts_tiny, split,
                                                                                      quant=QuantConfig("nf4"))}
    assert len(data["rows"]) == 8
    for row in data["rows"]:
        s = expected[row["precision"]][row["set"]]
        assert row["n"] == s.n
        assert row["top1"] == s.top1
        assert row["mc"] == pytest.approx(s.mc, abs=1e-12)
        assert row["p(answer)"] == pytest.approx(s.mean_prob, rel=1e-9)
        assert 0.0 <= row["top1"] <= 1.0 and 0.0 <= row["p(answer)"] <= 1.0


def test_eval_quant_none_is_full_precision_only(capsys, facts_tiny):
    code, out, _ = run(capsys, "eval", "--model", "facts-tiny", "--quant", "none", "--json")
    assert code == 0
    assert {r["precision"] for r in json.loads(out)["rows"]} == {"fp32"}


def test_eval_user_data_file(capsys, facts_tiny, split, tmp_path):
    path = save_fact_file(split.forget, tmp_path / "mine.jsonl")
    code, out, _ = run(capsys, "eval", "--model", "facts-tiny", "--data", str(path), "--quant", "int8", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["split"] == str(path)
    assert [(r["set"], r["precision"]) for r in data["rows"]] == [("data", "fp32"), ("data", "int8/b64")]
    fp = evaluate_facts(facts_tiny, split.forget)
    assert data["rows"][0]["n"] == len(split.forget) == fp.n
    assert data["rows"][0]["top1"] == fp.top1
    assert data["rows"][0]["p(answer)"] == pytest.approx(fp.mean_prob, rel=1e-9)
    code, out, _ = run(capsys, "eval", "--model", "facts-tiny", "--data", str(path), "--quant", "nf4")
    assert code == 0
    assert [r[:2] for r in table_rows(out)] == [["data", "fp32"], ["data", "nf4/b64"]]


def test_eval_json_is_strict_json_for_cloze_only_data(capsys, facts_tiny, split, tmp_path):
    # no choices -> no multiple-choice score: null in the JSON, not the non-standard NaN
    path = tmp_path / "cloze.jsonl"
    path.write_text("".join(json.dumps({"prompt": f.prompt, "answer": f.answer}) + "\n" for f in split.forget[:5]))
    code, out, _ = run(capsys, "eval", "--model", "facts-tiny", "--data", str(path), "--quant", "nf4", "--json")
    assert code == 0

    def reject(constant):
        raise AssertionError(f"{constant} is not JSON")

    rows = json.loads(out, parse_constant=reject)["rows"]
    assert [r["mc"] for r in rows] == [None, None]
    assert all(r["n"] == 5 and 0.0 <= r["top1"] <= 1.0 for r in rows)
    code, out, _ = run(capsys, "eval", "--model", "facts-tiny", "--data", str(path), "--quant", "none")
    assert code == 0 and table_rows(out)[0][6] == "–"  # set, precision, n, top1, exact, logprob, mc


def test_eval_forget_and_retain_files(capsys, facts_tiny, split, tmp_path):
    forget = save_fact_file(split.forget[:6], tmp_path / "f.jsonl")
    retain = save_fact_file(split.retain[:9], tmp_path / "r.jsonl")
    code, out, _ = run(capsys, "eval", "--model", "facts-tiny", "--forget", str(forget), "--retain", str(retain),
                       "--quant", "none", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["split"] == "user"
    assert {r["set"]: r["n"] for r in data["rows"]} == {"forget": 6, "retain": 9}


# --- quant-report -----------------------------------------------------------------------


def test_quant_report_text(capsys, facts_tiny):
    code, out, _ = run(capsys, "quant-report", "--model", "facts-tiny")
    assert code == 0
    n = len(quantizable_parameters(facts_tiny.hf, QuantConfig("nf4")))
    assert f"nf4/b64 · {n} modules" in out
    m = re.search(r"relative weight error .* overall: (\d+\.\d+)", out)
    assert m and 0.0 < float(m.group(1)) < 1.0
    bars = [line for line in out.splitlines() if line.startswith("code ")]
    assert len(bars) == 16 and all(line.endswith("%") for line in bars)


def test_quant_report_json(capsys, facts_tiny):
    code, out, _ = run(capsys, "quant-report", "--model", "facts-tiny", "--json")
    assert code == 0
    report = json.loads(out)
    names = quantizable_parameters(facts_tiny.hf, QuantConfig("nf4"))
    assert report["n_modules"] == len(names) == 4 * facts_tiny.n_layers  # c_attn, c_proj, c_fc, mlp.c_proj
    assert report["n_weights"] == sum(facts_tiny.state()[n].numel() for n in names)
    assert 0.0 < report["relative_error"]["overall"] < 1.0
    assert set(names) <= set(report["relative_error"])
    occupancy = report["bin_occupancy_overall"]
    assert len(occupancy) == 16 and all(isinstance(c, int) and c >= 0 for c in occupancy)
    assert sum(occupancy) == report["n_weights"]
    assert report["quant"]["type"] == "nf4" and report["quant"]["blocksize"] == 64
    # int8 has 256 codes
    code, out, _ = run(capsys, "quant-report", "--model", "facts-tiny", "--json", "--quant", "int8")
    int8 = json.loads(out)
    assert len(int8["bin_occupancy_overall"]) == 256 and sum(int8["bin_occupancy_overall"]) == report["n_weights"]
    assert int8["relative_error"]["overall"] < report["relative_error"]["overall"]


def _saved_update(model, tmp_path, n: int = 100, size: float = 0.05):
    name = quantizable_parameters(model.hf, QuantConfig("nf4"))[0]
    delta = torch.zeros_like(model.state()[name])
    flat = delta.view(-1)
    flat[torch.arange(n) * 7] = size
    return name, Update({name: delta}).save(tmp_path / "update.safetensors")


def test_quant_report_with_an_update(capsys, facts_tiny, tmp_path):
    name, path = _saved_update(facts_tiny, tmp_path)
    code, out, _ = run(capsys, "quant-report", "--model", "facts-tiny", "--update", str(path), "--json")
    assert code == 0
    comparison = json.loads(out)["comparison"]
    overall = comparison["overall"]
    assert overall["n_changed"] == 100
    assert 0 < overall["changed_flips"] <= overall["code_flips"]
    assert overall["changed_flips"] <= 100
    assert [m["name"] for m in comparison["modules"] if m["n_changed"]] == [name]
    code, out, _ = run(capsys, "quant-report", "--model", "facts-tiny", "--update", str(path))
    assert code == 0
    assert "code_flips" in out and "n_changed" in out


# --- attribute / circuit ----------------------------------------------------------------


def test_attribute_then_circuit_show_and_faithfulness(capsys, facts_tiny, split, tmp_path):
    out_file = tmp_path / "c.json"
    code, out, _ = run(capsys, "attribute", "--model", "facts-tiny", "--out", str(out_file), "--top-k", "5")
    assert code == 0
    assert out_file.exists()
    head = rf"{len(split.forget)} prompt pairs · clean metric -?\d+\.\d+ · corrupt -?\d+\.\d+ \(logit_diff\)"
    assert re.match(head, out), out
    assert f"circuit with 5 components saved to {out_file}" in out
    marked = [r for r in table_rows(out) if r[-1] == "yes"]
    assert len(marked) == 5

    code, out, _ = run(capsys, "circuit", "show", str(out_file), "--rows", "7")
    assert code == 0
    assert f"model_fingerprint={facts_tiny.fingerprint}" in out and "method=atp" in out
    assert len(table_rows(out)) == 7
    m = re.search(r"(\d+) of (\d+) components selected", out)
    assert m and int(m.group(1)) == 5
    assert int(m.group(2)) == 1 + facts_tiny.n_layers * (facts_tiny.n_heads + 1)  # embed, heads, MLPs

    code, out, _ = run(capsys, "circuit", "faithfulness", str(out_file), "--model", "facts-tiny")
    assert code == 0
    assert "circuit of 5 components, corrupt ablation:" in out
    recovered = floats(next(line for line in out.splitlines() if "recovered" in line))
    drop = floats(next(line for line in out.splitlines() if "drop" in line))
    assert len(recovered) == 1 and len(drop) == 1
    assert -1.0 < recovered[0] < 2.0 and -1.0 < drop[0] < 2.0


def test_circuit_faithfulness_against_another_model_is_an_error(capsys, facts_tiny, tmp_path):
    from workbench.experiments.flow import attribute_forget_set
    from workbench.interpretability.circuit import Circuit

    # a circuit whose recorded fingerprint is not facts-tiny's
    circuit = Circuit.from_attribution(attribute_forget_set(facts_tiny, builtin_split(facts_tiny)))
    circuit.model_fingerprint = "0123456789abcdef"
    path = circuit.select_top_k(3).save(tmp_path / "wrong.json")
    code, _, err = run(capsys, "circuit", "faithfulness", str(path), "--model", "facts-tiny")
    assert_error(code, err, "different model", "0123456789abcdef")


# --- demo -------------------------------------------------------------------------------


def test_demo_on_facts_tiny(capsys, facts_tiny):
    code, out, _ = run(capsys, "demo", "--model", "facts-tiny")
    assert code == 0
    assert "== loading facts-tiny" in out
    assert "== accuracy, full precision vs NF4 of the base" in out
    rows = table_rows(out.split("== accuracy", 1)[1])
    assert {(r[0], r[1]) for r in rows} == {(s, p) for s in SETS for p in ("fp32", "nf4/b64")}
    m = re.search(r"NF4 of (\d+) weight matrices: relative error (\d+\.\d+)", out)
    assert m and int(m.group(1)) == 8 and 0 < float(m.group(2)) < 1
    bars = [line for line in out.splitlines() if line.startswith("code ")]
    assert len(bars) == 16 and any("█" in line for line in bars)
    assert re.search(r"== done in \d+\.\d s", out)


# --- bad inputs: exit code 1 and "error: ..." on stderr ---------------------------------


def test_unknown_model(capsys, tmp_path):
    missing = tmp_path / "nope"
    code, out, err = run(capsys, "eval", "--model", str(missing))
    assert_error(code, err, "neither a built-in", str(missing))
    assert out == ""
    code, _, err = run(capsys, "build", "gpt-17")
    assert_error(code, err, "unknown built-in model 'gpt-17'")


def test_missing_data_file(capsys, facts_tiny, tmp_path):
    code, _, err = run(capsys, "eval", "--model", "facts-tiny", "--data", str(tmp_path / "absent.jsonl"))
    assert_error(code, err, "absent.jsonl", "no such file")


def test_malformed_jsonl_names_file_and_line(capsys, facts_tiny, split, tmp_path):
    path = tmp_path / "broken.jsonl"
    good = json.dumps(split.forget[0].to_dict())
    path.write_text(good + "\n" + '{"prompt": "Trupliolu is carried by the", "answer": \n')
    code, _, err = run(capsys, "eval", "--model", "facts-tiny", "--data", str(path))
    assert_error(code, err, str(path), "line 2")
    # a well-formed row that lacks its answer names the line too
    path.write_text(good + "\n\n" + '{"prompt": "Styfae is carried by the"}\n')
    code, _, err = run(capsys, "eval", "--model", "facts-tiny", "--forget", str(path), "--retain", str(path))
    assert_error(code, err, str(path), "line 3")


def test_forget_without_retain(capsys, facts_tiny, split, tmp_path):
    path = save_fact_file(split.forget, tmp_path / "f.jsonl")
    code, _, err = run(capsys, "eval", "--model", "facts-tiny", "--forget", str(path))
    assert_error(code, err, "--forget and --retain")
    code, _, err = run(capsys, "attribute", "--model", "facts-tiny", "--retain", str(path),
                       "--out", str(tmp_path / "c.json"))
    assert_error(code, err, "attribute reads only the forget set", "--forget")
    assert not (tmp_path / "c.json").exists()


def test_quant_report_needs_a_quantizer(capsys, facts_tiny):
    code, out, err = run(capsys, "quant-report", "--model", "facts-tiny", "--quant", "none")
    assert_error(code, err, "quant-report needs a quantizer")
    assert out == ""


def test_bad_update_files(capsys, facts_tiny, tmp_path):
    code, _, err = run(capsys, "quant-report", "--model", "facts-tiny", "--update", str(tmp_path / "no.safetensors"))
    assert_error(code, err, "no update file")
    path = Update({"not.a.parameter": torch.ones(3)}).save(tmp_path / "alien.safetensors")
    code, _, err = run(capsys, "quant-report", "--model", "facts-tiny", "--update", str(path))
    assert_error(code, err, "not.a.parameter")


def test_local_directory_without_fact_files(capsys, tmp_path):
    from workbench.models.toy import toy_model

    toy = toy_model("gpt2", n_layers=1, d_model=32, n_heads=2)
    toy.hf.save_pretrained(tmp_path / "mine")
    toy.tokenizer.save_pretrained(tmp_path / "mine")
    code, _, err = run(capsys, "eval", "--model", str(tmp_path / "mine"))
    assert_error(code, err, "no built-in fact split")


def test_unknown_forget_domain(capsys, facts_tiny):
    code, _, err = run(capsys, "eval", "--model", "facts-tiny", "--forget-domain", "volcanoes")
    assert_error(code, err, "volcanoes")


# --- conventions: run references, one runs-root flag, --json, exit codes, version, app ------------


def _saved_run(model, root, run_id, tmp_path):
    """A run saved under ``root`` (a real run's metrics, an update that fits ``model``)."""
    from workbench.experiments.store import save_run
    from workbench.measurement.results import RunMetrics

    metrics = RunMetrics.from_json(json.loads((DATA / "metrics_v1.json").read_text()), source="metrics_v1.json")
    _, update_file = _saved_update(model, tmp_path)
    return save_run(config={"method": metrics.method, "model": model.name}, metrics=metrics,
                    update=Update.load(update_file), run_id=run_id, root=root)


def test_report_and_compare_take_run_directories_from_different_roots(capsys, facts_tiny, tmp_path):
    a = _saved_run(facts_tiny, tmp_path / "root-a", "run-a", tmp_path)
    b = _saved_run(facts_tiny, tmp_path / "root-b", "run-b", tmp_path)
    code, out, err = run(capsys, "report", str(a.path), "--json")
    assert code == 0, err
    assert json.loads(out) == json.loads((a.path / "metrics.json").read_text())
    code, out, err = run(capsys, "report", str(b.path))
    assert code == 0 and out.startswith("run run-b: mansu on facts-tiny"), err
    # ids and directories mixed, from two roots, in the order given
    code, out, err = run(capsys, "compare", str(b.path), "run-a", "--runs-root", str(tmp_path / "root-a"), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [r["run"] for r in data["rows"]] == ["run-b", "run-a"]
    assert [r["path"] for r in data["runs"]] == [str(b.path), str(a.path)]
    code, _, err = run(capsys, "compare", "run-b", "--runs-root", str(tmp_path / "root-a"))
    assert_error(code, err, "no run 'run-b' in", "no run directory at")


def test_quant_report_takes_a_run_for_its_update(capsys, facts_tiny, tmp_path):
    saved = _saved_run(facts_tiny, tmp_path / "runs", "with-update", tmp_path)
    from_file = run(capsys, "quant-report", "--model", "facts-tiny", "--update",
                    str(saved.path / "update.safetensors"), "--json")
    from_dir = run(capsys, "quant-report", "--model", "facts-tiny", "--update", str(saved.path), "--json")
    from_id = run(capsys, "quant-report", "--model", "facts-tiny", "--update", "with-update",
                  "--runs-root", str(tmp_path / "runs"), "--json")
    assert from_file[0] == from_dir[0] == from_id[0] == 0
    assert json.loads(from_dir[1])["comparison"] == json.loads(from_file[1])["comparison"] == json.loads(from_id[1])[
        "comparison"]
    assert json.loads(from_dir[1])["comparison"]["overall"]["n_changed"] == 100


RUNS_ROOT_COMMANDS = [
    ["runs", "list"], ["report", "r1"], ["probe", "r1"], ["compare", "r1"], ["quant-report", "--model", "m"],
    ["unlearn", "--model", "m"], ["paper-table", "--model", "m"], ["ablate", "--model", "m"], ["sweep", "s.toml"],
]


@pytest.mark.parametrize("argv", RUNS_ROOT_COMMANDS, ids=[" ".join(a[:2]) for a in RUNS_ROOT_COMMANDS])
def test_one_runs_root_flag_everywhere(argv):
    from workbench.faces.cli import build_parser

    assert build_parser().parse_args([*argv, "--runs-root", "R"]).runs_root == "R"


def test_old_runs_root_spellings_still_work_with_a_warning(capsys, facts_tiny, tmp_path):
    from workbench.faces.cli import build_parser

    saved = _saved_run(facts_tiny, tmp_path / "runs", "old-flag", tmp_path)
    code, out, err = run(capsys, "runs", "list", "--root", str(tmp_path / "runs"))
    assert code == 0 and "old-flag" in out
    assert "warning: --root is deprecated" in err and "use --runs-root" in err
    code, out, err = run(capsys, "report", saved.id, "--root", str(tmp_path / "runs"), "--json")
    assert code == 0 and json.loads(out)["run_id"] == "old-flag"  # the warning stays off stdout
    assert "--root is deprecated" in err
    capsys.readouterr()
    args = build_parser().parse_args(["unlearn", "--model", "m", "--out", "R"])
    assert args.runs_root == "R" and "--out is deprecated" in capsys.readouterr().err


def _json_stdout(capsys, *argv):
    """Run with --json; stdout must be one strict JSON document (no NaN) and nothing else."""
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err

    def reject(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(out, parse_constant=reject)


def _nan_as_null(data):
    if isinstance(data, float) and data != data:
        return None
    if isinstance(data, dict):
        return {k: _nan_as_null(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_nan_as_null(v) for v in data]
    return data


def test_every_command_that_prints_results_has_json():
    from workbench.faces.cli import build_parser

    def commands(parser, prefix=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, (*prefix, name))
                return
        yield prefix, parser

    found = {" ".join(name): {o for a in p._actions for o in a.option_strings} for name, p in commands(build_parser())}
    assert set(found) >= {"models", "build", "demo", "eval", "quant-report", "bench", "attribute", "circuit show",
                          "circuit faithfulness", "unlearn", "runs list", "report", "probe", "compare",
                          "paper-table", "ablate", "sweep", "app"}
    assert [name for name, options in found.items() if "--json" not in options] == ["app"]


def test_json_output_of_models_build_and_runs_list(capsys, facts_tiny, tmp_path):
    models = {m["model"]: m for m in _json_stdout(capsys, "models")}
    assert set(models) == set(BUILTINS) and models["facts-tiny"]["cached"] is True
    built = _json_stdout(capsys, "build", "facts-tiny")
    assert built["model"] == "facts-tiny" and built["path"] == str(facts_tiny.path)
    assert _json_stdout(capsys, "runs", "list", "--runs-root", str(tmp_path / "none")) == []
    saved = _saved_run(facts_tiny, tmp_path / "runs", "listed", tmp_path)
    (row,) = _json_stdout(capsys, "runs", "list", "--runs-root", str(tmp_path / "runs"))
    assert row["run"] == "listed" and row["path"] == str(saved.path)
    assert row["ptq gap"] == saved.metrics.ptq_gap and row["passes"] == saved.metrics.properties.passes()


def test_json_output_of_attribute_and_circuit(capsys, facts_tiny, split, tmp_path):
    path = tmp_path / "c.json"
    data = _json_stdout(capsys, "attribute", "--model", "facts-tiny", "--out", str(path), "--top-k", "4")
    assert data["saved"] == str(path) and len(data["circuit"]) == 4 and data["n_pairs"] == len(split.forget)
    assert sum(r["in circuit"] for r in data["top"]) == 4
    shown = _json_stdout(capsys, "circuit", "show", str(path), "--rows", "5")
    assert len(shown["components"]) == 5 and shown["n_selected"] == 4
    assert shown["metadata"]["model_fingerprint"] == facts_tiny.fingerprint
    f = _json_stdout(capsys, "circuit", "faithfulness", str(path), "--model", "facts-tiny")
    assert f["n_components"] == 4 and f["ablation"] == "corrupt" and isinstance(f["recovered"], float)


def test_json_output_of_unlearn_and_demo(capsys, facts_tiny, tmp_path):
    data = _json_stdout(capsys, "unlearn", "--model", "facts-tiny", "--method", "ga", "--max-steps", "1",
                        "--runs-root", str(tmp_path), "--no-oracle")
    # the saved file's numbers; a baseline's CAD circuit share is NaN there (no circuit), null here
    assert data["metrics"] == _nan_as_null(json.loads((tmp_path / data["run_id"] / "metrics.json").read_text()))
    assert data["path"] == str(tmp_path / data["run_id"]) and data["metrics"]["schema_version"] == SCHEMA_VERSION
    demo = _json_stdout(capsys, "demo", "--model", "facts-tiny")
    assert demo["model"] == "facts-tiny" and demo["n_modules"] == 8 and len(demo["bin_occupancy"]) == 16
    assert {(r["set"], r["precision"]) for r in demo["rows"]} == {(s, p) for s in SETS for p in ("fp32", "nf4/b64")}
    assert all(r["mc"] is None for r in demo["rows"])  # top-1 only: no multiple choice, null not NaN


def test_json_keeps_stdout_for_the_document_alone(capsys):
    """bench prints its tables as it measures; under --json they go to stderr."""
    code, out, err = run(capsys, "bench", "quantization", "--quick", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["quick"] is True and report["quantization"][0]["model"] == "facts-tiny"
    assert "== quantization analysis" in err and "== quantization" not in out


def test_attribute_needs_only_the_forget_set(capsys, facts_tiny, split, tmp_path):
    forget = save_fact_file(split.forget[:8], tmp_path / "forget.jsonl")
    data = _json_stdout(capsys, "attribute", "--model", "facts-tiny", "--forget", str(forget), "--top-k", "3",
                        "--out", str(tmp_path / "c.json"))
    assert data["split"] == "user" and data["n_pairs"] == 8 and len(data["circuit"]) == 3
    f = _json_stdout(capsys, "circuit", "faithfulness", str(tmp_path / "c.json"), "--model", "facts-tiny",
                     "--forget", str(forget))
    assert f["n_components"] == 3


def test_attribute_passes_are_sized_by_batch_size_or_pass_mb(capsys, facts_tiny, split, tmp_path, monkeypatch):
    from workbench.interpretability import attribution as attribution_module

    sizes: list[int] = []
    sweep_chunk = attribution_module._sweep_chunk
    monkeypatch.setattr(attribution_module, "_sweep_chunk", lambda bridge, lay, chunk, *a, **k: (
        sizes.append(chunk.n), sweep_chunk(bridge, lay, chunk, *a, **k))[1])
    scores = {}
    for flags in ([], ["--batch-size", "3"], ["--pass-mb", "1"]):
        sizes.clear()
        data = _json_stdout(capsys, "attribute", "--model", "facts-tiny", "--edges", "--out", str(tmp_path / "c.json"),
                            *flags)
        scores[tuple(flags)] = {r["component"]: r["score"] for r in data["top"]}
        if not flags:  # facts-tiny is far below 128 MiB: its groups run whole, up to 32 pairs
            assert max(sizes) == min(32, len(split.forget)) and sum(sizes) == len(split.forget)
        elif flags[0] == "--batch-size":
            assert max(sizes) == 3 and sum(sizes) == len(split.forget)
        else:  # 1 MiB holds fewer pairs of facts-tiny's edge pass than its whole set (5 here)
            assert 1 <= max(sizes) < len(split.forget) <= 32 and sum(sizes) == len(split.forget)
    for other in list(scores)[1:]:
        assert scores[other].keys() == scores[()].keys()
        assert all(abs(scores[other][c] - scores[()][c]) < 1e-5 for c in scores[()])
    for flag, said in (("--pass-mb", "--pass-mb must be at least 1"), ("--batch-size", "batch_size must be")):
        # refused before any model loads: the name of a model that does not exist is never reached
        code, out, err = run(capsys, "attribute", "--model", "no-such-model", "--out", str(tmp_path / "c.json"),
                             flag, "0")
        assert code == 1 and said in err and out == ""


def test_exit_codes_user_error_1_usage_error_2(capsys, tmp_path):
    code, out, err = run(capsys, "report", "nope", "--runs-root", str(tmp_path))
    assert code == 1 and out == "" and err.startswith("error: no run 'nope'")
    with pytest.raises(SystemExit) as usage:
        main(["eval"])  # --model is required
    assert usage.value.code == 2 and "the following arguments are required: --model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["runs", "list", "--no-such-flag"])
    assert usage.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit) as shown:
        main(["--help"])
    help_text = capsys.readouterr().out
    assert shown.value.code == 0
    epilog = help_text.split("exit codes:", 1)[1]
    assert re.search(r"^\s+1\s+the input was refused", epilog, re.M)
    assert re.search(r"^\s+2\s+the command line is malformed", epilog, re.M)


def test_version(capsys):
    import workbench

    with pytest.raises(SystemExit) as shown:
        main(["--version"])
    assert shown.value.code == 0 and capsys.readouterr().out == f"workbench {workbench.__version__}\n"
    done = subprocess.run([sys.executable, "-m", "workbench", "--version"], capture_output=True, text=True,
                          timeout=120, env=_env())
    assert done.returncode == 0 and done.stdout == f"workbench {workbench.__version__}\n", done.stderr


def test_the_installed_script_is_this_main():
    """``[project.scripts] workbench`` names an importable function: the main the tests drive."""
    import importlib
    import tomllib

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["workbench"]
    module, _, name = target.partition(":")
    assert getattr(importlib.import_module(module), name) is main


def _env():
    """This checkout first on the path of a child Python (``python -m workbench``)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "GRADIO_ANALYTICS_ENABLED": "False"}


def test_app_help_lists_the_apps_own_flags():
    done = subprocess.run([sys.executable, "-m", "workbench", "app", "--help"], capture_output=True, text=True,
                          timeout=180, env=_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: workbench app")
    for flag in ("--model", "--host", "--port", "--heavy-jobs", "--no-preload", "--models-dir", "--max-models",
                 "--job-timeout", "--queue-size", "--runs-quota-mb"):
        assert flag in done.stdout


def test_app_starts_from_the_package(tmp_path, facts_tiny):
    """``workbench app`` outside the checkout (no app.py beside it) serves the page."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "app.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "workbench", "app", "--model", "facts-tiny", "--port",
                                 str(port), "--no-preload"], cwd=tmp_path, env=_env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"workbench app exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no page within 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone if both exited
            os.killpg(proc.pid, signal.SIGTERM)  # the CLI and the app process it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_attribute_baselines_per_fact_and_faithfulness_curve(capsys, facts_tiny, split, tmp_path):
    out_file, per_fact = tmp_path / "c.json", tmp_path / "facts.json"
    code, out, _ = run(capsys, "attribute", "--model", "facts-tiny", "--out", str(out_file), "--top-k", "4",
                       "--baseline", "mean", "--fact", "2", "--per-fact", str(per_fact))
    assert code == 0
    n = len(split.forget)
    assert f"mean baseline: {n} facts: {n} against the dataset-mean baseline · 0 dropped" in out
    assert f"fact 2: {split.forget[2].prompt!r} (mean baseline)" in out
    data = json.loads(per_fact.read_text())
    assert len(data["facts"]) == n and data["baseline"] == "mean"
    assert data["facts"][2]["prompt"] == split.forget[2].prompt
    mean_of_facts = sum(f["scores"]["L0.MLP"] for f in data["facts"]) / n
    saved = {node["name"]: node["score"] for node in json.loads(out_file.read_text())["nodes"]}
    assert mean_of_facts == pytest.approx(saved["L0.MLP"], abs=1e-6) and saved["L0.MLP"] != 0
    code, _, err = run(capsys, "attribute", "--model", "facts-tiny", "--out", str(out_file), "--fact", str(n))
    assert code != 0 and f"--fact {n}" in err

    f = _json_stdout(capsys, "circuit", "faithfulness", str(out_file), "--model", "facts-tiny", "--curve", "3",
                     "--metric", "kl", "--baseline", "mean")
    assert f["metric"] == "kl" and f["clean_metric"] == 0.0 and f["floor_metric"] < 0
    assert [r["k"] for r in f["curve"]] == [1, 2, 3]
    assert len({round(r["recovered"], 6) for r in f["curve"]}) > 1


def test_output_into_a_closed_pipe_ends_quietly():
    """`workbench models | head -1`: the reader leaves early; no traceback, exit code 0."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "workbench", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the interpreter has imported the workbench and printed
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0
    assert b"Traceback" not in err and b"BrokenPipe" not in err
