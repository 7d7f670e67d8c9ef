"""Export: an unlearned model leaves the workbench as a Hugging Face directory, and loaded in real
4-bit bitsandbytes (``Linear4bit`` through transformers' ``BitsAndBytesConfig``) it answers
exactly as the workbench's simulated ``Q(w+Δ)`` said — the check every quantized number rests on.

What differs between the simulation and a deployment, and how each is covered here:
- block size: transformers' loader always quantizes 4-bit weights in blocks of 64
  (``QuantConfig("nf4")``'s default); checked on the loaded ``quant_state``;
- double quantization (``bnb_4bit_use_double_quant``): simulated by ``double_quant=True``;
  checked against a real double-quantized load;
- compute dtype: the simulation dequantizes to float32 and runs in float32; a real model with
  ``bnb_4bit_compute_dtype=torch.float32`` is compared (bfloat16 compute rounds activations and
  is not the simulated model).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact, FactSplit
from workbench.experiments.export import EXPORT_INFO, export_lora_adapter, export_run
from workbench.experiments.flow import run_unlearning
from workbench.measurement.evaluation import fact_top1
from workbench.models.builtin_splits import builtin_split
from workbench.models.scoring import encode_prompts, last_token_logits
from workbench.quant import QuantConfig
from workbench.unlearning.methods.lora import LoraConfig
from workbench.unlearning.task import OptimConfig, StopRule


def _real_4bit(path, *, double_quant: bool = False):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(path), quantization_config=config, device_map="cpu").eval()


def _assert_real_equals_simulated(model, split, metrics, path, *, double_quant: bool = False):
    real = _real_4bit(path, double_quant=double_quant)
    linear4bit = [m for m in real.modules() if type(m).__name__ == "Linear4bit"]
    assert linear4bit, "nothing was loaded in 4 bits"
    for m in linear4bit:
        assert m.weight.quant_state.blocksize == 64 and m.weight.quant_state.quant_type == "nf4"
        assert (m.weight.quant_state.state2 is not None) == double_quant
    got = {"forget": fact_top1(real, split.forget, model.tokenizer),
           "retain": fact_top1(real, split.retain, model.tokenizer)}
    assert got == {"forget": metrics.forget.after_q, "retain": metrics.retain.after_q}
    return real


@pytest.fixture(scope="module")
def facts_run(facts_tiny, tmp_path_factory):
    split = builtin_split(facts_tiny)
    root = str(tmp_path_factory.mktemp("runs"))
    _, metrics, run = run_unlearning(facts_tiny, split, method="graddiff", optim=OptimConfig(lr=3e-3),
                                     stop=StopRule(max_steps=6), measure_cad=False, runs_root=root)
    return split, metrics, run


def test_exported_facts_model_loads_and_real_nf4_equals_the_simulation(facts_tiny, facts_run, tmp_path):
    split, metrics, run = facts_run
    assert metrics.forget.after_q < metrics.forget.base_q, "the run must have changed something"
    before = facts_tiny.weights_hash()
    export = export_run(run, tmp_path / "out", model=facts_tiny)
    assert facts_tiny.weights_hash() == before
    assert export.kind == "model" and export.dtype == "float32"
    info = json.loads((export.path / EXPORT_INFO).read_text())
    assert info["run_id"] == run.id and info["base_fingerprint"] == facts_tiny.fingerprint
    assert info["provenance"] == run.config["provenance"] and info["provenance"]["versions"]["torch"]
    # full precision: the exported weights are exactly w + Δ
    fp = AutoModelForCausalLM.from_pretrained(str(export.path)).eval()
    after = run.update().apply(facts_tiny)
    for name, p in fp.named_parameters():
        assert torch.equal(p, after.hf.get_parameter(name)), name
    _assert_real_equals_simulated(facts_tiny, split, metrics, export.path)


def test_real_double_quantization_equals_the_simulated_one(facts_tiny, tmp_path):
    split = builtin_split(facts_tiny)
    quant = QuantConfig("nf4", double_quant=True)
    _, metrics, run = run_unlearning(facts_tiny, split, method="ga", quant=quant, optim=OptimConfig(lr=3e-3),
                                     stop=StopRule(max_steps=4), measure_cad=False, runs_root=str(tmp_path / "runs"))
    export = export_run(run, tmp_path / "out", model=facts_tiny)
    _assert_real_equals_simulated(facts_tiny, split, metrics, export.path, double_quant=True)


@pytest.fixture(scope="module")
def llama_split(toy_llama_gqa):
    """Facts whose answers are the random Llama's own top-1, so forgetting starts from 1."""
    m = toy_llama_gqa
    prompts = [f"w{i} w{(7 * i) % 97} w{(3 * i) % 97}" for i in range(80)]
    ids, last, _ = encode_prompts(m.tokenizer, prompts)
    top = last_token_logits(m.hf, ids, last).argmax(-1)
    facts = [Fact(p, m.tokenizer.convert_ids_to_tokens(int(t)), ()) for p, t in zip(prompts, top.tolist())
             if m.tokenizer.convert_ids_to_tokens(int(t)).startswith("w")]
    return FactSplit("toy-llama", forget=tuple(facts[:16]), retain=tuple(facts[16:]))


def test_exported_llama_model_real_nf4_equals_the_simulation(toy_llama_gqa, llama_split, tmp_path):
    _, metrics, run = run_unlearning(toy_llama_gqa, llama_split, method="graddiff", optim=OptimConfig(lr=1e-2),
                                     stop=StopRule(max_steps=5), measure_cad=False, runs_root=str(tmp_path / "runs"))
    assert metrics.forget.after_q < 1.0
    export = export_run(run, tmp_path / "out", model=toy_llama_gqa)
    _assert_real_equals_simulated(toy_llama_gqa, llama_split, metrics, export.path)


def test_export_dtype_and_refusals(facts_tiny, facts_run, tmp_path):
    _, _, run = facts_run
    half = export_run(run, tmp_path / "bf16", dtype="bfloat16", model=facts_tiny)
    loaded = AutoModelForCausalLM.from_pretrained(str(half.path), dtype="auto")
    assert half.dtype == "bfloat16" and next(loaded.parameters()).dtype == torch.bfloat16
    with pytest.raises(WorkbenchError, match="already exists"):
        export_run(run, half.path, model=facts_tiny)
    with pytest.raises(WorkbenchError, match="unknown dtype"):
        export_run(run, tmp_path / "x", dtype="float8", model=facts_tiny)
    assert not (tmp_path / "x").exists()
    with pytest.raises(WorkbenchError, match="only LoRA runs"):
        export_lora_adapter(run, tmp_path / "adapter", model=facts_tiny)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"], "a refused export left files behind"


def test_lora_run_exports_as_a_peft_adapter_that_reproduces_the_update(facts_tiny, tmp_path):
    from peft import PeftModel

    split = builtin_split(facts_tiny)
    _, _, run = run_unlearning(facts_tiny, split, method="lora", method_config=LoraConfig(rank=2, alpha=4.0),
                               optim=OptimConfig(lr=3e-3), stop=StopRule(max_steps=2, forget_target=None),
                               measure_cad=False, runs_root=str(tmp_path / "runs"))
    export = export_lora_adapter(run, tmp_path / "adapter", model=facts_tiny)
    assert (export.path / "adapter_config.json").exists() and export.kind == "lora-adapter"
    import copy

    merged = PeftModel.from_pretrained(copy.deepcopy(facts_tiny.hf), str(export.path)).merge_and_unload()
    after = run.update().apply(facts_tiny)
    for name, delta in run.update().deltas.items():
        torch.testing.assert_close(merged.get_parameter(name), after.hf.get_parameter(name), rtol=0, atol=1e-6,
                                   msg=name)
        assert delta.abs().max() > 1e-6  # the adapter carries a real change


def test_cli_export_writes_the_directory_and_says_where(facts_run, tmp_path, capsys):
    import json as _json

    from workbench.faces.cli import main

    _, _, run = facts_run
    assert main(["export", str(run.path), "--out", str(tmp_path / "cli"), "--dtype", "float16", "--json"]) == 0
    printed = _json.loads(capsys.readouterr().out)
    assert printed == {"path": str(tmp_path / "cli"), "kind": "model", "dtype": "float16", "run_id": run.id}
    assert (tmp_path / "cli" / "model.safetensors").exists() and (tmp_path / "cli" / "tokenizer.json").exists()
    assert main(["export", str(run.path), "--out", str(tmp_path / "cli")]) == 1  # exists: refused
    assert "already exists" in capsys.readouterr().err
