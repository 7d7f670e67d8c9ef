import pytest
import torch
from safetensors import safe_open

from workbench.core.errors import WorkbenchError
from workbench.models.update import SparseDelta, Update


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
    sparse = _sparse_update(toy_gpt2)
    name0 = sparse.names[0]
    update = Update({**sparse.deltas, name0: torch.randn_like(sparse.deltas[name0])}, sparse.meta)  # a dense entry
    path = update.save(tmp_path / "u.safetensors")
    loaded = Update.load(path)
    assert loaded.names == update.names
    for name in update.names:
        assert torch.equal(loaded.deltas[name], update.deltas[name])
    # what was written sparse is held sparse
    assert isinstance(loaded.held(update.names[1]), SparseDelta) and isinstance(loaded.held(name0), torch.Tensor)
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


def _as_sparse(update: Update) -> Update:
    """The same update with each delta held as its nonzero weights."""
    held = {}
    for name, d in update.deltas.items():
        index = torch.nonzero(d.reshape(-1)).reshape(-1)
        held[name] = SparseDelta(d.shape, index, d.reshape(-1)[index])
    return Update(held, update.meta)


def test_a_sparse_update_reads_and_acts_as_its_dense_one(tmp_path, toy_gpt2):
    dense = _sparse_update(toy_gpt2, n=7, seed=3)
    sparse = _as_sparse(dense)
    assert list(sparse.deltas) == list(dense.deltas) and sparse.names == dense.names
    for name in dense.names:
        assert torch.equal(sparse.deltas[name], dense.deltas[name])
    assert sparse.nnz() == dense.nnz() == 21 and sparse.nnz_by_param() == dense.nnz_by_param()
    assert sparse.norm() == pytest.approx(dense.norm(), rel=1e-12)
    base = toy_gpt2.state()
    for name, tensor in dense.after_state(base).items():
        assert torch.equal(sparse.after_state(base)[name], tensor)
    assert toy_gpt2.state().keys() == base.keys()
    assert sparse.apply(toy_gpt2).weights_hash() == dense.apply(toy_gpt2).weights_hash()
    assert torch.equal(sparse.scaled(2.0).deltas[dense.names[0]], 2.0 * dense.deltas[dense.names[0]])
    # the same file either way (its metadata's order aside: safetensors keeps it in a hash map)
    paths = [u.save(tmp_path / f"{i}.safetensors") for i, u in enumerate((sparse, dense))]
    files = [safe_open(str(p), framework="pt") for p in paths]
    keys = files[0].keys()
    assert files[0].metadata() == files[1].metadata() and keys == files[1].keys()
    assert all(torch.equal(files[0].get_tensor(k), files[1].get_tensor(k)) for k in keys)
    # a sub-update shares its entries and answers membership without making a dense delta
    only = sparse.only(dense.names[:1])
    assert only.names == dense.names[:1] and only.held(dense.names[0]) is sparse.held(dense.names[0])
    assert dense.names[1] in sparse.deltas and "nope" not in sparse.deltas


def test_bad_sparse_entries_are_refused(tmp_path, toy_gpt2):
    with pytest.raises(WorkbenchError, match="out of range"):
        Update({"x": SparseDelta(torch.Size([2, 2]), torch.tensor([4]), torch.tensor([1.0]))})
    with pytest.raises(WorkbenchError, match="twice"):
        Update({"x": SparseDelta(torch.Size([4]), torch.tensor([1, 1]), torch.tensor([1.0, 2.0]))})
    with pytest.raises(WorkbenchError, match="NaN"):
        Update({"x": SparseDelta(torch.Size([4]), torch.tensor([1]), torch.tensor([float("nan")]))})
    with pytest.raises(WorkbenchError, match="floating-point"):
        Update({"x": SparseDelta(torch.Size([4]), torch.tensor([1]), torch.tensor([1]))})
    with pytest.raises(WorkbenchError, match="floating-point"):
        Update({"x": [1.0]})  # type: ignore[dict-item]
