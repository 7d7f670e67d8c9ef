"""Every notebook in notebooks/ runs top to bottom (quick mode) and is stored without outputs.

The kernel is the venv's own ``python3`` kernelspec (jupyter_client runs it with this
interpreter); ``PYTHONPATH`` puts this checkout first, so the notebooks exercise the code
under test, not whatever copy is installed. Notebooks execute from an in-memory copy in a
temporary directory: nothing is written back.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT = 600  # per cell; quick mode needs well under a minute per notebook

CHECK_CELL = """
import sys, workbench
print("KERNEL", sys.executable)
print("PACKAGE", workbench.__file__)
"""


def test_every_notebook_of_the_issue_exists():
    names = {p.stem[:2] for p in NOTEBOOKS}
    assert {"01", "02", "03", "04"} <= names, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    # nbformat >= 4.5 needs cell ids; reading only warns and patches them in memory, so check the file
    raw = json.loads(path.read_text())
    assert all(cell.get("id") for cell in raw["cells"]), f"{path.name}: a cell has no id"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {i} has stored output"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # the kernel inherits this environment: quick mode, this checkout first, runs in tmp
    monkeypatch.setenv("WORKBENCH_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL))
    client = NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    seconds = time.perf_counter() - start
    print(f"{path.name}: {seconds:.1f} s")
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream")
    lines = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    assert Path(lines["KERNEL"]).resolve() == Path(sys.executable).resolve(), "the kernel is not this venv's python"
    assert Path(lines["PACKAGE"]).resolve().is_relative_to(ROOT), f"kernel imported workbench from {lines['PACKAGE']}"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    assert nbformat.read(path, as_version=4).cells[0].get("outputs", []) == []
