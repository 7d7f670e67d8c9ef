import json

import pytest
import torch

from workbench.core.errors import WorkbenchError
from workbench.models.loading import load_model
from workbench.models.toy import toy_model


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
    with pytest.raises(WorkbenchError, match="no .safetensors weights"):
        load_model(str(broken))
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WorkbenchError, match="could not load"):
        load_model(str(broken))


def test_facts_tiny_is_built_deterministically_and_learns(facts_tiny):
    from workbench.models.builtins import build_info

    info = build_info("facts-tiny")
    assert info["train_top1"] >= 0.98
    assert facts_tiny.architecture == "gpt2"


# --- builds: determinism, the retrain oracle, interrupted builds ---------------------------


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty model cache, and no model remembered from the shared one."""
    import workbench.models.loading as models

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_LOADED", {})
    return tmp_path / "cache"


def test_facts_tiny_build_is_bit_identical_across_builds_and_thread_counts(fresh_cache):
    from workbench.models.builtins import BUILD_THREADS, build_info, build_model, builtin_dir

    saved = torch.get_num_threads()
    hashes, weights = [], []
    try:
        # the ambient thread count must not matter: the build pins its own
        for threads in (1, 2):
            torch.set_num_threads(threads)
            path = build_model("facts-tiny", force=True)
            assert torch.get_num_threads() == threads  # restored after the build
            assert path == builtin_dir("facts-tiny") and str(path).startswith(str(fresh_cache))
            assert (path / "BUILD_COMPLETE").exists()
            hashes.append(_sha256(path / "model.safetensors"))
            model = load_model("facts-tiny")
            weights.append(model.weights_hash())
            import workbench.models.loading as models

            models._LOADED.clear()
    finally:
        torch.set_num_threads(saved)
    assert hashes[0] == hashes[1]
    assert weights[0] == weights[1]
    info = build_info("facts-tiny")
    assert info["torch_threads"] == BUILD_THREADS and info["train_top1"] >= 0.98
    # only the finished directory is left in the cache, no temporary build directory
    assert _entries(fresh_cache / "models") == [builtin_dir("facts-tiny").name]


def test_retrain_oracle_never_saw_the_forget_domain(facts_tiny):
    from workbench.measurement.evaluation import evaluate_facts
    from workbench.models.builtin_splits import builtin_split
    from workbench.models.builtins import build_info

    oracle = load_model("facts-tiny-oracle")
    split = builtin_split(facts_tiny)
    assert builtin_split(oracle) == split  # same world, same split
    forget, retain = evaluate_facts(oracle, split.forget), evaluate_facts(oracle, split.retain)
    print(f"\nfacts-tiny-oracle: forget top-1 {forget.top1:.3f} (mc {forget.mc:.3f}), retain top-1 {retain.top1:.3f}")
    assert forget.top1 <= 0.35
    assert retain.top1 >= 0.98
    assert build_info("facts-tiny-oracle")["n_train_facts"] < build_info("facts-tiny")["n_train_facts"]
    assert oracle.fingerprint != facts_tiny.fingerprint
    # while the base model knows the forget facts
    assert evaluate_facts(facts_tiny, split.forget).top1 >= 0.98


@pytest.mark.parametrize("interrupt", [RuntimeError("out of memory"), KeyboardInterrupt()])
def test_interrupted_build_leaves_no_complete_directory(fresh_cache, monkeypatch, interrupt):
    import workbench.models.builtins as builtins
    from workbench.models.builtins import build_model, builtin_dir, list_models

    def boom(preset, out, progress):
        (out / "model.safetensors").write_bytes(b"half a model")
        raise interrupt

    monkeypatch.setattr(builtins, "build_facts_model", boom)
    saved = torch.get_num_threads()
    with pytest.raises(type(interrupt)):
        build_model("facts-tiny")
    assert torch.get_num_threads() == saved  # the pinned build thread count is undone
    target = builtin_dir("facts-tiny")
    assert not (target / "BUILD_COMPLETE").exists()
    assert not target.exists()
    leftovers = _entries(fresh_cache / "models")
    assert leftovers == [], leftovers  # the temporary directory is gone too
    assert next(m for m in list_models() if m["name"] == "facts-tiny")["cached"] is False


def test_interrupted_forced_rebuild_keeps_the_previous_build(fresh_cache, monkeypatch):
    import workbench.models.builtins as builtins
    from workbench.models.builtins import build_model, builtin_dir

    def fake(preset, out, progress):  # a quick stand-in for training
        (out / "model.safetensors").write_bytes(b"previous weights")
        return {"kind": "facts"}

    monkeypatch.setattr(builtins, "build_facts_model", fake)
    path = build_model("facts-tiny")
    before = _sha256(path / "model.safetensors")

    def boom(preset, out, progress):
        (out / "model.safetensors").write_bytes(b"half of the new weights")
        raise RuntimeError("disk full")

    monkeypatch.setattr(builtins, "build_facts_model", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_model("facts-tiny", force=True)
    assert (builtin_dir("facts-tiny") / "BUILD_COMPLETE").exists()
    assert _sha256(path / "model.safetensors") == before
    assert _entries(fresh_cache / "models") == [path.name]
    # and without force the complete build is reused, not rebuilt (boom is never called)
    assert build_model("facts-tiny") == path


def test_explicit_device_map_loads_a_placed_model_that_computes_the_same(tmp_path):
    """The large-model path: accelerate places each module by an explicit map (all CPU here,
    the map is what matters); logits, attribution and quantization analysis are unchanged."""
    import torch

    from workbench.faces.bench import toy_pairs
    from workbench.interpretability.attribution import attribute
    from workbench.quant import QuantConfig, compare_quantization, quantizable_parameters

    toy = toy_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2)
    toy.hf.save_pretrained(tmp_path / "m")
    toy.tokenizer.save_pretrained(tmp_path / "m")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    plain = load_model(tmp_path / "m")
    placed = load_model(tmp_path / "m", device_map=device_map)
    assert placed is not plain and load_model(tmp_path / "m", device_map=device_map) is placed
    # Over several devices accelerate hooks every module to move its inputs; with one device it
    # does not, so force the hooks to exercise that path on the CPU.
    from accelerate import dispatch_model

    dispatch_model(placed.hf, device_map=device_map, force_hooks=True)
    assert {p.device.type for p in placed.hf.parameters()} == {"cpu"}
    ids = torch.tensor([[3, 5, 7, 9]])
    torch.testing.assert_close(placed.hf(ids).logits, plain.hf(ids).logits)
    pairs = toy_pairs(plain, 4, 5)
    a, b = attribute(plain, pairs, progress=lambda *_: None), attribute(placed, pairs, progress=lambda *_: None)
    assert max(abs(a.scores[c] - b.scores[c]) for c in a.scores) < 1e-5
    # The bridge runs over the placed model's own parameters (no CPU copy), so it keeps the
    # accelerate hooks that move activations between mapped devices; the scores above match.
    bridged = placed.bridge().original_model
    assert any(hasattr(m, "_hf_hook") for m in bridged.modules())
    assert any(hasattr(m, "_hf_hook") for m in placed.hf.modules()) and placed.hf.hf_device_map == device_map
    cfg = QuantConfig("nf4")
    names = quantizable_parameters(placed.hf, cfg)
    assert names == quantizable_parameters(plain.hf, cfg)
    one = compare_quantization(placed.state(), {}, names, cfg, progress=lambda *_: None)
    assert one.overall.n_weights == sum(plain.state()[n].numel() for n in names)
    with pytest.raises(WorkbenchError, match="device_map is for local"):
        load_model("facts-tiny", device_map="auto")
    # offloading to disk leaves weights on "meta": refused with a clear message, not NaNs later
    offload = {**device_map, "model.layers.1": "disk"}
    with pytest.raises(WorkbenchError, match="offloads .* parameters"):
        load_model(tmp_path / "m", device_map=offload)


def _entries(directory) -> list[str]:
    """What a directory holds besides the builders' lock files (which stay, empty, by design)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock"))


def test_concurrent_builds_of_one_model_build_it_once(fresh_cache, monkeypatch):
    """Two builders of one model at once: the second waits for the first's lock, then reuses
    its complete build instead of training again and replacing the directory."""
    import threading
    import time

    import workbench.models.builtins as builtins
    from workbench.models.builtins import build_model

    calls = []

    def slow_fake(preset, out, progress):
        calls.append(threading.current_thread().name)
        time.sleep(0.5)  # long enough for the other thread to reach the lock
        (out / "model.safetensors").write_bytes(b"weights")
        return {"kind": "facts"}

    monkeypatch.setattr(builtins, "build_facts_model", slow_fake)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(build_model("facts-tiny")), name=f"b{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1, f"trained {len(calls)} times"
    assert len(paths) == 2 and paths[0] == paths[1] and (paths[0] / "BUILD_COMPLETE").exists()
    assert _entries(fresh_cache / "models") == [paths[0].name]
