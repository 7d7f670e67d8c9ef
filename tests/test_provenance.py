"""Every run records what produced it; comparisons warn when runs come from different versions."""

from __future__ import annotations

import json
from importlib import metadata

from workbench.experiments.flow import run_unlearning
from workbench.experiments.provenance import LIBRARIES, library_versions, provenance, source_commit, version_differences
from workbench.models.builtin_splits import builtin_split
from workbench.unlearning.task import OptimConfig, StopRule


def test_provenance_names_versions_commit_device_and_dtype(facts_tiny):
    p = provenance(facts_tiny)
    assert set(LIBRARIES) <= set(p.versions) and "mansu-workbench" in p.versions
    assert p.versions["torch"] == metadata.version("torch") and p.versions["bitsandbytes"] == metadata.version(
        "bitsandbytes")
    assert p.device == "cpu" and p.dtype == "float32"
    commit = source_commit()
    assert commit is None or (len(commit.removesuffix("+dirty")) == 40 and all(
        c in "0123456789abcdef" for c in commit.removesuffix("+dirty")))


def test_a_run_records_its_provenance_and_compare_warns_on_different_versions(facts_tiny, tmp_path, capsys):
    from workbench.faces.cli import main

    split = builtin_split(facts_tiny)
    runs = [run_unlearning(facts_tiny, split, method="ga", optim=OptimConfig(lr=3e-3), stop=StopRule(max_steps=1),
                           measure_cad=False, runs_root=str(tmp_path))[2] for _ in range(2)]
    config = json.loads((runs[0].path / "config.json").read_text())
    recorded = config["provenance"]["versions"]
    assert {k: recorded[k] for k in LIBRARIES} == library_versions() and config["provenance"]["dtype"] == "float32"
    assert version_differences([r.config for r in runs], ["a", "b"]) == []
    # the second run as if made with another bitsandbytes
    other = json.loads((runs[1].path / "config.json").read_text())
    other["provenance"]["versions"]["bitsandbytes"] = "0.0.1"
    (runs[1].path / "config.json").write_text(json.dumps(other))
    assert main(["compare", str(runs[0].path), str(runs[1].path)]) == 0
    err = capsys.readouterr().err
    assert "warning: the runs were made with different versions of bitsandbytes: " in err
    assert "0.0.1" in err and library_versions()["bitsandbytes"] in err
    assert version_differences([{}, config], ["old", "new"])[0].startswith("torch: unknown (old)")


def test_the_commit_is_read_when_the_code_is_imported_not_when_a_run_is_saved():
    """A run saved long after its process started records the commit its code came from."""
    import subprocess
    import sys

    probe = "import workbench.experiments.provenance as p; print(p.source_commit.cache_info().currsize)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
