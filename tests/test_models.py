import json

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.models import load_model, toy_model


@pytest.mark.parametrize("arch,kv", [("gpt2", None), ("gpt_neox", None), ("llama", 2)])
def test_bridge_matches_hf_and_leaves_hf_names(arch, kv):
    model = toy_model(arch, n_kv_heads=kv)
    names_before = [n for n, _ in model.hf.named_parameters()]
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        diff = (model.bridge()(ids) - model.hf(ids).logits).abs().max()
    assert float(diff) < 1e-4
    # Booting rewrites the wrapped module tree; ours must keep HF names.
    assert [n for n, _ in model.hf.named_parameters()] == names_before
    assert not any("_original_component" in n for n in names_before)


def test_fingerprint_tells_same_shaped_models_apart():
    a, b = toy_model("gpt2", seed=0), toy_model("gpt2", seed=1)
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == toy_model("gpt2", seed=0).fingerprint


def test_local_directory_round_trip(tmp_path):
    model = toy_model("llama", n_kv_heads=2)
    model.hf.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.architecture == "llama" and loaded.n_kv_heads == 2
    assert loaded.fingerprint == model.fingerprint


def test_bad_model_paths_get_clear_errors(tmp_path):
    with pytest.raises(WorkbenchError, match="neither a built-in"):
        load_model(str(tmp_path / "does-not-exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkbenchError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(WorkbenchError, match="could not load"):
        load_model(str(broken))


def test_facts_tiny_is_built_deterministically_and_learns(facts_tiny):
    from workbench.models import build_info

    info = build_info("facts-tiny")
    assert info["train_top1"] >= 0.98
    assert facts_tiny.architecture == "gpt2"
