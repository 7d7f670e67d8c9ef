"""Which model directories load, and how many stay loaded (issue 18).

The app passes :class:`ModelRoots`: only built-ins and directories under the operator's roots
load, every spelling of one directory is one model, a name outside the roots gets the same
message whether or not it exists, pickled ``.bin`` weights are never read, and at most
``max_loaded()`` models stay cached.
"""

from __future__ import annotations

import os

import pytest
import torch

from workbench.core.errors import WorkbenchError
from workbench.models import loading
from workbench.models.loading import ModelRoots, load_model, model_key, set_max_loaded
from workbench.models.toy import toy_model


@pytest.fixture
def model_dirs(tmp_path, monkeypatch):
    """``allowed/m`` (a tiny GPT-2 directory), the same model outside the root, and an empty cache."""
    monkeypatch.setattr(loading, "_LOADED", {})
    model = toy_model("gpt2")
    for where in ("allowed/m", "outside/m"):
        model.hf.save_pretrained(tmp_path / where)
        model.tokenizer.save_pretrained(tmp_path / where)
    return tmp_path


def test_every_spelling_of_a_directory_is_one_model(model_dirs):
    roots = ModelRoots.of([str(model_dirs / "allowed")])
    os.symlink(model_dirs / "allowed" / "m", model_dirs / "allowed" / "link")
    m = str(model_dirs / "allowed" / "m")
    first = load_model(m, roots=roots)
    for spelling in (m + "/", m + "/.", str(model_dirs / "allowed" / "link"), m + "/../m"):
        assert load_model(spelling, roots=roots) is first, spelling
    assert len(loading._LOADED) == 1


def test_outside_the_roots_one_message_whether_or_not_it_exists(model_dirs):
    roots = ModelRoots.of([str(model_dirs / "allowed")])
    outside = model_dirs / "outside" / "m"
    os.symlink(outside, model_dirs / "allowed" / "escape")  # a symlink inside that leads out
    names = [str(outside), str(model_dirs / "outside" / "nope"), str(model_dirs / "allowed" / "escape"),
             str(model_dirs / "allowed" / ".." / "outside" / "m"), "/etc", "/etc/passwd", "bad\x00name", "x" * 5000,
             str(model_dirs / "allowed" / "nope")]
    messages = set()
    for name in names:
        with pytest.raises(WorkbenchError) as info:
            load_model(name, roots=roots)
        messages.add(str(info.value).replace(repr(name if len(name) <= 200 else name[:200] + "…"), "NAME"))
    assert len(messages) == 1, f"the message tells names apart: {messages}"
    assert "not allowed or not found" in str(info.value)
    assert not loading._LOADED
    load_model(str(outside))  # the CLI (no roots) still loads any directory


def test_pickled_weights_are_never_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_LOADED", {})
    model = toy_model("gpt2")
    model.hf.save_pretrained(tmp_path / "bin")
    model.tokenizer.save_pretrained(tmp_path / "bin")
    # The same weights as a pickle only (what transformers would otherwise fall back to).
    torch.save(model.hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for f in (tmp_path / "bin").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(WorkbenchError, match="no .safetensors weights.*pytorch_model.bin is never loaded"):
        load_model(str(tmp_path / "bin"))


def test_loaded_models_are_an_lru(model_dirs, monkeypatch):
    monkeypatch.setattr(loading, "_MAX_LOADED", [2])
    dirs = []
    for i in range(3):
        toy = toy_model("gpt2", seed=i)
        toy.hf.save_pretrained(model_dirs / f"lru{i}")
        toy.tokenizer.save_pretrained(model_dirs / f"lru{i}")
        dirs.append(str(model_dirs / f"lru{i}"))
    a = load_model(dirs[0])
    load_model(dirs[1])
    assert load_model(dirs[0]) is a  # a used again: b is now the oldest
    load_model(dirs[2])
    assert list(loading._LOADED) == [model_key(dirs[0]), model_key(dirs[2])]
    set_max_loaded(1)
    assert list(loading._LOADED) == [model_key(dirs[2])]
    with pytest.raises(WorkbenchError, match=">= 1"):
        set_max_loaded(0)


def test_roots_must_exist(tmp_path):
    with pytest.raises(WorkbenchError, match="not a directory"):
        ModelRoots.of([str(tmp_path / "missing")])
