"""Crash-safe writes (workbench.core.files): complete under the name, or not there at all."""

from __future__ import annotations

import math

import pytest

from workbench.core.files import atomic_directory, atomic_write, atomic_write_json


def test_atomic_write_text_bytes_and_writer(tmp_path):
    assert atomic_write(tmp_path / "a.txt", "é\n").read_text(encoding="utf-8") == "é\n"
    assert atomic_write(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write(tmp_path / "sub" / "c", lambda p: p.write_text("by a writer")).read_text() == "by a writer"
    assert atomic_write_json(tmp_path / "d.json", {"x": [1, 2]}).read_text() == '{\n  "x": [\n    1,\n    2\n  ]\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "d.json", "sub"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write(tmp_path / "f.txt", "old")

    def boom(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    with atomic_directory(tmp_path / "run") as tmp:
        (tmp / "x").write_text("1")
        assert not (tmp_path / "run").exists()  # not visible while being filled
    assert (tmp_path / "run" / "x").read_text() == "1"
    with pytest.raises(KeyError), atomic_directory(tmp_path / "other") as tmp:
        (tmp / "x").write_text("1")
        raise KeyError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with pytest.raises(FileExistsError), atomic_directory(tmp_path / "run") as tmp:
        (tmp / "y").write_text("2")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_parse_json_refuses_what_would_crash_or_stall_the_parser():
    from workbench.core.errors import WorkbenchError
    from workbench.core.files import parse_json

    assert parse_json('{"a": [1, 2.5, null, "x"]}', source="f") == {"a": [1, 2.5, None, "x"]}
    cases = {
        "[" * 5000 + "]" * 5000: "nested deeper than 32",
        "[" * 40 + "]" * 40: "nested deeper than 32",
        '{"n": ' + "9" * 5000 + "}": "integer of 5000 digits",
        '{"x": NaN}': "NaN is not a JSON number",
        '{"x": -Infinity}': "-Infinity is not a JSON number",
        '{"x": 1,}': r"not valid JSON \(line 1, column 9",
    }
    for text, message in cases.items():
        with pytest.raises(WorkbenchError, match=rf"^some\.json: .*{message}"):
            parse_json(text, source="some.json")
    # the workbench's own files say "not measured" with NaN: admitted only when asked for
    assert math.isnan(parse_json('{"x": NaN}', source="f", allow_nan=True)["x"])
    with pytest.raises(WorkbenchError, match="integer of 5000 digits"):
        parse_json('{"n": ' + "9" * 5000 + "}", source="f", allow_nan=True)


def test_fact_and_circuit_files_refuse_hostile_json_with_a_message(tmp_path):
    from workbench.core.errors import WorkbenchError
    from workbench.data.files import load_fact_file
    from workbench.interpretability.circuit import Circuit

    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": "a", "answer": ' + "[" * 3000 + "]" * 3000 + "}\n")
    with pytest.raises(WorkbenchError, match=r"deep\.jsonl, line 1: JSON nested deeper"):
        load_fact_file(deep)
    big = tmp_path / "big.jsonl"
    big.write_text('{"question": "q", "choices": ["a", "b"], "answer": ' + "1" * 5000 + "}\n")
    with pytest.raises(WorkbenchError, match=r"big\.jsonl, line 1: an integer of 5000 digits"):
        load_fact_file(big)
    circuit = tmp_path / "c.json"
    circuit.write_text('{"nodes": ' + "[" * 3000 + "]" * 3000 + "}")
    with pytest.raises(WorkbenchError, match=r"c\.json: JSON nested deeper"):
        Circuit.load(circuit)
