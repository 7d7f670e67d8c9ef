"""Device choice: one rule, explicit overrides, clear errors. CUDA's presence is simulated
(this machine has none), so these tests check the selection, not a CUDA run."""

from __future__ import annotations

import dataclasses

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


def _meta_llama():
    """A tiny Llama whose weights live on the ``meta`` device (no storage): where a copy of it
    lands shows whether the code moved it."""
    from workbench.models.loaded import LoadedModel
    from workbench.models.toy import toy_model

    toy = toy_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2)
    return LoadedModel(name="meta-llama", hf=toy.hf.to("meta"), tokenizer=toy.tokenizer), toy


def test_bridge_variants_and_updates_stay_on_the_models_device():
    """The bridge runs over the model's own parameters on its device (no CPU copy), a variant
    holds its new tensors on the model's device, and an update's after-state lands there too."""
    from workbench.models.update import Update

    model, toy = _meta_llama()
    bridge = model.bridge()
    hf_params = {id(p) for p in model.hf.parameters()}
    assert all(p.device.type == "meta" for p in bridge.parameters())
    assert sum(id(p) in hf_params for p in bridge.parameters()) == len(list(bridge.parameters()))
    name = "model.layers.0.mlp.up_proj.weight"
    cpu_value = torch.zeros(toy.hf.get_parameter(name).shape)
    variant = model.with_state({name: cpu_value}, "v")
    assert variant.hf.get_parameter(name).device.type == "meta"
    assert all(p.device.type == "meta" for p in variant.hf.parameters())
    after = Update({name: cpu_value}).after_state(model.state())
    assert after[name].device.type == "meta"


def test_cpu_bridge_shares_the_models_storage(toy_llama_gqa):
    bridge = toy_llama_gqa.bridge()
    ptrs = {p.data_ptr() for p in toy_llama_gqa.hf.parameters()}
    assert all(p.device.type == "cpu" and p.data_ptr() in ptrs for p in bridge.parameters())


def test_the_fisher_bound_reads_a_cpu_update_against_a_fisher_on_the_models_device():
    """An :class:`Update` keeps its deltas on the CPU while MANSU's Fisher lives on the model's
    device (a GPU run ended in a device mismatch here). On ``meta`` the bound gets as far as
    reading its number, which a meta tensor cannot give; on the CPU a bf16 Fisher is widened."""
    from workbench.models.update import Update
    from workbench.unlearning.mansu.fisher import fisher_bound

    name = "model.layers.0.mlp.up_proj.weight"
    delta = torch.zeros(8, 4)
    delta[0, :2] = torch.tensor([0.5, -0.25])
    fisher = torch.full((8, 4), 3.0, dtype=torch.bfloat16)
    assert fisher_bound({name: fisher}, Update({name: delta})) == 0.5 * 3.0 * (0.25 + 0.0625)
    with pytest.raises(RuntimeError, match="meta tensors"):  # not "Tensor on device cpu is not on ... meta"
        fisher_bound({name: fisher.to("meta")}, Update({name: delta}))


def test_the_tradeoff_reads_a_cpu_update_against_the_base_on_its_device():
    """The survival curve's predicted code-change fraction divides each CPU delta by its bin width
    computed from the base on the model's device: on ``meta`` it gets as far as reading the number."""
    from workbench.measurement.tradeoff import _predicted_fraction
    from workbench.models.update import Update
    from workbench.quant import QuantConfig, bin_geometry

    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    delta = torch.zeros(4, 64)
    delta[0, :3] = 0.01
    update = Update({"w": delta})
    on_cpu = _predicted_fraction(update, {"w": bin_geometry(w, QuantConfig("nf4"))})
    assert 0 < on_cpu <= 1
    geometry = bin_geometry(w, QuantConfig("nf4"))  # (bnb's quantizer reads numbers: built on the CPU)
    on_meta = dataclasses.replace(geometry, **{f.name: getattr(geometry, f.name).to("meta")
                                               for f in dataclasses.fields(geometry)
                                               if isinstance(getattr(geometry, f.name), torch.Tensor)})
    # meta stops at the first step that reads values (selecting the moved weights), not at the
    # mix of devices ("Tensor on device cpu is not on the expected device meta")
    with pytest.raises(NotImplementedError, match=r"torch\.nonzero"):
        _predicted_fraction(update, {"w": on_meta})
