"""Device choice: one rule, explicit overrides, clear errors. CUDA's presence is simulated
(this machine has none), so these tests check the selection, not a CUDA run."""

from __future__ import annotations

import pytest
import torch

from workbench.core.device import ENV, choose_device, module_device
from workbench.core.errors import WorkbenchError


def test_auto_picks_cuda_only_when_torch_sees_one(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert choose_device() == torch.device("cuda")
    assert choose_device("cuda:1") == torch.device("cuda:1")
    assert choose_device("cpu") == torch.device("cpu")  # an explicit CPU wins over a present GPU
    monkeypatch.setenv(ENV, "cpu")
    assert choose_device() == torch.device("cpu")


def test_bad_device_requests_get_clear_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(WorkbenchError, match="torch sees no CUDA device"):
        choose_device("cuda")
    monkeypatch.setenv(ENV, "tpu")
    with pytest.raises(WorkbenchError, match="unknown device 'tpu'"):
        choose_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(WorkbenchError, match="only 1 CUDA device"):
        choose_device("cuda:3")
    with pytest.raises(WorkbenchError, match="must be a number"):
        choose_device("cuda:x")


def test_load_model_refuses_an_unavailable_device(monkeypatch):
    from workbench.models.loading import load_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(WorkbenchError, match="no CUDA device"):
        load_model("facts-tiny", device="cuda")
    with pytest.raises(WorkbenchError, match="not both"):
        load_model("facts-tiny", device="cpu", device_map={"": "cpu"})
    # device= must win over $WORKBENCH_DEVICE: were it ignored, the unavailable "cuda" would be refused.
    monkeypatch.setenv(ENV, "cuda")
    assert module_device(load_model("facts-tiny", device="cpu").hf) == torch.device("cpu")


def test_update_deltas_live_on_the_cpu_and_follow_the_model_when_applied(facts_tiny):
    from workbench.models.update import Update

    name = "transformer.h.0.mlp.c_fc.weight"
    update = Update({name: torch.ones_like(facts_tiny.state()[name])})
    assert update.deltas[name].device.type == "cpu"
    after = update.after_state(facts_tiny.state())
    assert after[name].device == facts_tiny.state()[name].device
    # On a CPU-only machine that is cpu == cpu: place the base on another device ("meta", which
    # needs no GPU) to see the sum follow the base, not the update.
    on_meta = {name: facts_tiny.state()[name].to("meta")}
    assert update.after_state(on_meta)[name].device == torch.device("meta")
