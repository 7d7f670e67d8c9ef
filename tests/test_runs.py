"""The run store: round trip, refused ids, and atomicity (a run killed mid-save is never listed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import workbench.experiments.store as runs
from workbench.core.errors import WorkbenchError
from workbench.experiments.store import check_run_id, list_runs, load_run, new_run_id, save_run
from workbench.measurement.results import RunMetrics
from workbench.models.update import Update


def _update() -> Update:
    gen = torch.Generator().manual_seed(0)
    sparse = torch.zeros(64, 32)
    sparse.view(-1)[torch.randperm(64 * 32, generator=gen)[:7]] = torch.randn(7, generator=gen)
    dense = torch.randn(16, generator=gen)
    tiny = torch.tensor([[1e-30, -0.0, 3.5]])  # extreme values survive bit-exactly
    return Update({"a.weight": sparse, "b.bias": dense, "c.weight": tiny}, {"method": "test"})


CONFIG = {"method": "mansu", "model": "facts-tiny", "quant": {"type": "nf4", "blocksize": 64},
          "mansu": {"params_per_round": 16, "fisher_budget": None}}
METRICS_FILE = Path(__file__).parent / "data" / "metrics_v1.json"
METRICS = RunMetrics.from_json(json.loads(METRICS_FILE.read_text()), source=str(METRICS_FILE))  # a real run's
HISTORY = [{"step": 1, "forget_top1": 0.5}, {"step": 2, "forget_top1": 0.25, "moved": 32.0}]


def _save(root, **kw):
    args = dict(config=CONFIG, metrics=METRICS, update=_update(), history=HISTORY, root=root)
    args.update(kw)
    return save_run(**args)


def test_round_trip(tmp_path):
    run = _save(tmp_path, circuit_json='{"x": 1}', run_id="my-run_1.0")
    assert run.id == "my-run_1.0" and run.path == tmp_path / "my-run_1.0"
    loaded = load_run("my-run_1.0", root=tmp_path)
    assert loaded.config == CONFIG
    assert loaded.metrics == METRICS.saved_as("my-run_1.0")
    assert json.loads((run.path / "metrics.json").read_text()) == {**METRICS.to_json(), "run_id": "my-run_1.0"}
    assert loaded.history == HISTORY
    assert loaded.circuit_path is not None and json.loads(loaded.circuit_path.read_text()) == {"x": 1}
    original, back = _update(), loaded.update()
    assert back.names == original.names and back.meta == original.meta
    for name in original.names:
        a, b = original.deltas[name], back.deltas[name]
        assert a.shape == b.shape and a.dtype == b.dtype
        assert a.numpy().tobytes() == b.numpy().tobytes(), f"{name} is not bit-identical"
    listed = list_runs(root=tmp_path)
    assert [r.id for r in listed] == ["my-run_1.0"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def test_generated_ids_and_newest_first(tmp_path):
    first = _save(tmp_path, run_id="20260101-000000-mansu-a")
    second = _save(tmp_path, run_id="20260102-000000-mansu-b")
    assert [r.id for r in list_runs(root=tmp_path)] == [second.id, first.id]
    generated = new_run_id("npo_klr", "/some/dir/My Model!")
    assert check_run_id(generated) == generated
    assert "npo_klr" in generated and "/" not in generated
    auto = _save(tmp_path)  # id from config method and model
    assert auto.id.split("-")[2] == "mansu"
    with pytest.raises(WorkbenchError, match="already exists"):
        _save(tmp_path, run_id=first.id)


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "/etc", ".hidden", "a\\b", "", "x" * 200, "a..b", "run\n"])
def test_path_traversal_and_bad_ids_are_refused(tmp_path, bad):
    (tmp_path / "runs").mkdir()
    _save(tmp_path / "runs", run_id="victim")
    with pytest.raises(WorkbenchError, match="invalid run id"):
        load_run(bad, root=tmp_path / "runs")
    if bad:  # an empty id asks save_run to generate one
        with pytest.raises(WorkbenchError, match="invalid run id"):
            _save(tmp_path / "runs", run_id=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing written outside the root
    assert [r.id for r in list_runs(root=tmp_path / "runs")] == ["victim"]


def test_load_run_escaping_root_via_sibling_is_refused(tmp_path):
    root = tmp_path / "runs"
    _save(tmp_path / "other", run_id="secret")
    with pytest.raises(WorkbenchError):
        load_run("../other/secret", root=root)
    with pytest.raises(WorkbenchError, match="no run"):
        load_run("secret", root=root)


def _no_visible_dirs(root):
    return [p.name for p in root.iterdir() if not p.name.startswith(".")]


def test_crash_while_writing_the_update_leaves_nothing(tmp_path, monkeypatch):
    def boom(self, path):
        (path.parent / "partial").write_text("half an update")
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(Update, "save", boom)
    with pytest.raises(RuntimeError, match="killed"):
        _save(tmp_path, run_id="crashed")
    assert list_runs(root=tmp_path) == []
    assert _no_visible_dirs(tmp_path) == []
    assert not (tmp_path / "crashed").exists()
    with pytest.raises(WorkbenchError, match="no run"):
        load_run("crashed", root=tmp_path)


def test_crash_at_the_final_rename_leaves_nothing(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace(src, dst):
        if os.path.isdir(src):  # the run directory's rename, not the update file's
            raise OSError("killed at rename")
        return real_replace(src, dst)

    monkeypatch.setattr(runs.os, "replace", replace)
    with pytest.raises(OSError, match="rename"):
        _save(tmp_path, run_id="crashed")
    monkeypatch.undo()
    assert list_runs(root=tmp_path) == []
    assert _no_visible_dirs(tmp_path) == []


def test_leftover_temp_and_incomplete_directories_are_not_listed(tmp_path):
    good = _save(tmp_path, run_id="good")
    # A process killed before the rename leaves a hidden temporary directory with every file.
    hidden = tmp_path / ".killed.abc123"
    hidden.mkdir()
    for f in ("config.json", "metrics.json", "history.json", "update.safetensors"):
        (hidden / f).write_bytes((good.path / f).read_bytes())
    # A hand-made directory without metrics.json is incomplete; one with damaged JSON is skipped.
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    (incomplete / "update.safetensors").write_bytes((good.path / "update.safetensors").read_bytes())
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in ("config.json", "update.safetensors"):
        (damaged / f).write_bytes((good.path / f).read_bytes())
    (damaged / "metrics.json").write_text("{not json")
    (tmp_path / "stray-file").write_text("x")
    assert [r.id for r in list_runs(root=tmp_path)] == ["good"]
    with pytest.raises(WorkbenchError, match="incomplete"):
        load_run("incomplete", root=tmp_path)
    with pytest.raises(WorkbenchError, match="damaged JSON"):
        load_run("damaged", root=tmp_path)
    with pytest.raises(WorkbenchError, match="invalid run id"):
        load_run(hidden.name, root=tmp_path)


def test_default_root_is_workbench_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "elsewhere"))
    run = save_run(config=CONFIG, metrics=METRICS, update=_update(), run_id="r1")
    assert run.path == tmp_path / "elsewhere" / "r1"
    assert [r.id for r in list_runs()] == ["r1"]


def test_resolve_run_takes_an_id_or_a_directory(tmp_path, monkeypatch):
    from workbench.experiments.store import resolve_run

    a = _save(tmp_path / "a", run_id="one")
    b = _save(tmp_path / "b", run_id="two")
    assert resolve_run("one", root=tmp_path / "a").path == a.path
    assert resolve_run(str(b.path), root=tmp_path / "a").path == b.path  # a directory, from another root
    monkeypatch.chdir(tmp_path)
    assert resolve_run(os.path.join("b", "two"), root=tmp_path / "a").id == "two"  # relative to the working directory
    assert resolve_run(b.path / ".." / "two").path == b.path
    with pytest.raises(WorkbenchError, match=r"no run 'two' in .*a, and no run directory at .*two"):
        resolve_run("two", root=tmp_path / "a")
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(WorkbenchError, match="incomplete"):
        resolve_run(str(tmp_path / "not-a-run"), root=tmp_path / "a")
