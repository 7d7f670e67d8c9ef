"""Shared fixtures. Every test runs offline on CPU; built models go to a per-session cache
unless WORKBENCH_CACHE is set (CI reuses the user's cache so smollm2 converts once)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path, monkeypatch):
    """Runs saved by a test land in its own temporary directory, never in ./runs."""
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))


@pytest.fixture(scope="session")
def toy_gpt2():
    from workbench.models import toy_model

    return toy_model("gpt2")


@pytest.fixture(scope="session")
def toy_llama_gqa():
    from workbench.models import toy_model

    return toy_model("llama", n_kv_heads=2)


@pytest.fixture(scope="session")
def facts_tiny():
    """The trained facts-tiny model (built once per cache, < 30 s)."""
    from workbench.models import load_model

    return load_model("facts-tiny")
