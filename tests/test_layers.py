"""The package's import direction: a lower layer never imports a higher one.

Layers, lowest first (docs/ARCHITECTURE.md): core → data → quant → models →
interpretability → unlearning → measurement → experiments → faces. A module may import its
own layer and the layers below it; a workbench import inside a function is allowed only
with a comment on its line or the line above saying which cycle it breaks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import workbench

LAYERS = ("core", "data", "quant", "models", "interpretability", "unlearning", "measurement", "experiments", "faces")
PACKAGE = Path(workbench.__file__).parent


def _layer(module: str) -> int:
    """Layer index of ``workbench.<layer>...``; the package root itself is the bottom."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return -1
    return LAYERS.index(parts[1])


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out.append((name, path))
    return out


def _workbench_imports(tree: ast.Module) -> list[tuple[ast.stmt, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "workbench":
            if node.module == "workbench":  # `from workbench import x`: x is a subpackage or module
                found += [(node, f"workbench.{a.name}") for a in node.names]
            else:
                found.append((node, node.module))
        elif isinstance(node, ast.Import):
            found += [(node, a.name) for a in node.names if a.name.split(".")[0] == "workbench"]
    return found


def test_every_module_sits_in_a_layer():
    stray = [name for name, _ in _modules() if name != "workbench" and _layer(name) < 0
             and name not in ("workbench.__main__",)]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


@pytest.mark.parametrize("name,path", _modules(), ids=[n for n, _ in _modules()])
def test_imports_point_down(name, path):
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    lines = path.read_text().splitlines()
    mine = _layer(name) if name != "workbench.__main__" else len(LAYERS)
    problems = []
    for node, target in _workbench_imports(tree):
        if _layer(target) > mine:
            problems.append(f"line {node.lineno}: {name} ({LAYERS[mine] if mine >= 0 else 'root'}) imports "
                            f"{target} ({LAYERS[_layer(target)]})")
        if id(node) not in top:
            context = " ".join(lines[max(0, node.lineno - 2):node.lineno])
            if "cycle" not in context:
                problems.append(f"line {node.lineno}: function-level import of {target} without a comment "
                                "naming the cycle it breaks")
    assert not problems, "\n".join(problems)
