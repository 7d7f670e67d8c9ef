"""The model fingerprint covers every byte of every weight (issue 18): it used to sample 256
values per tensor, so a sparse edit — what MANSU makes — usually kept its base's fingerprint."""

from __future__ import annotations

import torch

from workbench.models.toy import toy_model


def test_a_one_weight_edit_changes_the_fingerprint():
    base = toy_model("gpt2")
    state = base.state()
    for name in (next(iter(state)), list(state)[-1]):
        flat = state[name].reshape(-1)
        index = flat.numel() // 256 + 1  # between two of the old sampler's strided positions
        edited = state[name].clone()
        edited.reshape(-1)[index] += 1e-6
        assert base.with_state({name: edited}, "edit").fingerprint != base.fingerprint, name
    assert base.with_state({}, "same").fingerprint == base.fingerprint


def test_the_fingerprint_is_computed_once_per_model(monkeypatch):
    model = toy_model("gpt2")
    first = model.fingerprint
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self: (_ for _ in ()).throw(AssertionError("rehashed")))
    assert model.fingerprint == first
