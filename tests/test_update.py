import pytest
import torch

from workbench.core.errors import WorkbenchError
from workbench.models.update import Update


def _sparse_update(model, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, p in list(model.hf.named_parameters())[2:5]:
        d = torch.zeros_like(p)
        flat = d.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[:n]
        flat[idx] = torch.randn(n, generator=g)
        deltas[name] = d
    return Update(deltas, {"method": "test"})


def test_apply_leaves_base_bit_identical_and_adds_delta(toy_gpt2):
    before = toy_gpt2.weights_hash()
    update = _sparse_update(toy_gpt2)
    after = update.apply(toy_gpt2)
    assert toy_gpt2.weights_hash() == before
    base, new = toy_gpt2.state(), after.state()
    for name, delta in update.deltas.items():
        assert torch.equal(new[name], base[name] + delta)
    untouched = set(base) - set(update.deltas)
    assert all(torch.equal(new[n], base[n]) for n in untouched)
    assert Update.between(base, new).nnz() == update.nnz() == 15


def test_save_load_round_trip_sparse_and_dense(tmp_path, toy_gpt2):
    update = _sparse_update(toy_gpt2)
    name0 = update.names[0]
    update.deltas[name0] = torch.randn_like(update.deltas[name0])  # dense entry
    path = update.save(tmp_path / "u.safetensors")
    loaded = Update.load(path)
    assert loaded.names == update.names
    for name in update.names:
        assert torch.equal(loaded.deltas[name], update.deltas[name])
    assert loaded.meta == {"method": "test"}
    assert not list(tmp_path.glob(".u.safetensors.*")), "temporary file left behind"


def test_sparse_save_is_small(tmp_path, toy_gpt2):
    update = _sparse_update(toy_gpt2, n=3)
    path = update.save(tmp_path / "u.safetensors")
    dense_bytes = sum(d.numel() * 4 for d in update.deltas.values())
    assert path.stat().st_size < dense_bytes / 10


def test_bad_updates_are_refused(tmp_path, toy_gpt2):
    with pytest.raises(WorkbenchError, match="NaN"):
        Update({"x": torch.tensor([float("nan")])})
    with pytest.raises(WorkbenchError, match="does not have"):
        Update({"nope.weight": torch.zeros(2)}).apply(toy_gpt2)
    name, p = next(iter(toy_gpt2.hf.named_parameters()))
    with pytest.raises(WorkbenchError, match="shape"):
        Update({name: torch.zeros(p.numel() + 1)}).apply(toy_gpt2)
    with pytest.raises(WorkbenchError, match="no update file"):
        Update.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(WorkbenchError, match="not a readable update"):
        Update.load(junk)
