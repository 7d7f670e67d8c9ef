"""The gradient loop's readings (issue 20, items 2 and 4): every few steps a baseline's history and
progress line carry retain top-1 and the deployed model's Q(w+Δ) forget and retain, as MANSU's
rounds do. Checked against the final measurement's own variant model, bit for bit, and end to
end against the saved run's metrics; a run takes the same steps with readings as without."""

from __future__ import annotations

import copy

import pytest
import torch

from workbench.core.errors import WorkbenchError
from workbench.experiments.flow import run_unlearning
from workbench.measurement.metrics import quantized_base, variant_model
from workbench.models.loaded import LoadedModel
from workbench.models.update import Update
from workbench.quant import QuantConfig
from workbench.unlearning.batches import Batches
from workbench.unlearning.readings import LoopReadings, deployed_quantized
from workbench.unlearning.registry import unlearn
from workbench.unlearning.task import OptimConfig, StopRule

pytestmark = pytest.mark.usefixtures("one_thread")
NF4 = QuantConfig("nf4")


def _logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids).logits


def _trained(model: LoadedModel, *, embeddings: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """After-tensors as a training copy holds them: float32, every quantized weight moved by a
    fraction of its own bin scale (some cross a code), and the embedding too when asked."""
    g = torch.Generator().manual_seed(seed)
    quantized = set(model.adapter.quantizable(NF4))
    after = {}
    for name, p in model.hf.named_parameters():
        if name in quantized or (embeddings and ("wte" in name or "embed_tokens" in name)):
            w = p.detach().float()
            after[name] = w + 0.3 * w.abs().mean() * torch.randn(w.shape, generator=g)
    return after


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deployed_quantized_is_the_measurements_after_q_model(facts_tiny, toy_llama_gqa, dtype):
    # gpt2 (Conv1D, transposed blocks) in float32; llama with GQA in bfloat16, where the stored
    # after-model is rounded to bf16 before it is quantized
    source = facts_tiny if dtype == torch.float32 else toy_llama_gqa
    model = source if dtype == torch.float32 else LoadedModel(
        name=source.name + "-bf16", hf=copy.deepcopy(source.hf).to(dtype), tokenizer=source.tokenizer)
    before = model.weights_hash()
    after = _trained(model, embeddings=True)
    assert any(n not in model.adapter.quantizable(NF4) for n in after)  # a trained tensor the quantizer leaves
    update = Update.between(model.state(), after)
    reference = variant_model(model, update, NF4, "after_q", quantized_base(model, NF4)).hf
    deployed = deployed_quantized(model, after, NF4)
    ids = torch.randint(0, model.hf.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(deployed, ids), _logits(reference, ids))
    assert not torch.equal(_logits(deployed, ids), _logits(model.hf, ids))
    assert model.weights_hash() == before  # the base is not modified


def test_deployed_quantized_shares_the_tensors_a_run_left_unchanged(facts_tiny):
    # LoRA's merged after-state names every tensor; the unchanged ones stay the base's storage
    after = {n: p.detach() for n, p in facts_tiny.hf.named_parameters()}
    moved = facts_tiny.adapter.quantizable(NF4)[0]
    after[moved] = after[moved] + 0.01
    deployed = deployed_quantized(facts_tiny, after, NF4)
    embedding = "transformer.wte.weight"
    assert deployed.get_parameter(embedding).data_ptr() == facts_tiny.hf.get_parameter(embedding).data_ptr()


def test_deployed_quantized_refuses_a_value_of_the_wrong_shape(facts_tiny):
    name = facts_tiny.adapter.quantizable(NF4)[0]
    with pytest.raises(WorkbenchError, match="shape"):
        deployed_quantized(facts_tiny, {name: torch.zeros(3, 3)}, NF4)


def test_readings_are_taken_every_n_steps_and_at_the_last_and_change_no_step(facts_tiny, split):
    def run(every: int):
        lines: list[str] = []
        result = unlearn(facts_tiny, split, method="ga", optim=OptimConfig(lr=3e-3),
                         stop=StopRule(max_steps=5, forget_target=None), readings=LoopReadings(every=every),
                         progress=lambda fraction, message: lines.append(message))
        return result, lines

    read, lines = run(2)
    plain, plain_lines = run(0)
    assert [set(r) for r in read.history] == [
        set(r) | ({"forget_top1_q", "retain_top1", "retain_top1_q"} if r["step"] in (2, 4, 5) else set())
        for r in plain.history]
    for with_reading, without in zip(read.history, plain.history):
        assert {k: with_reading[k] for k in without} == without  # the same losses and forget accuracies
    assert read.update.names == plain.update.names
    assert all(torch.equal(read.update.deltas[n], plain.update.deltas[n]) for n in read.update.names)
    assert "reading_seconds" in read.diagnostics and "reading_seconds" not in plain.diagnostics
    last = read.history[-1]
    assert lines[-1].endswith(f"forget top-1 {last['forget_top1']:.3f} (quantized {last['forget_top1_q']:.3f}), "
                              f"retain top-1 {last['retain_top1']:.3f} (quantized {last['retain_top1_q']:.3f})")
    assert "quantized" not in plain_lines[-1] and "retain" not in plain_lines[-1]


def test_readings_change_no_step_with_dropout_on(facts_tiny, split):
    # dropout draws from the global generator in train mode: a reading that consumed it, or left
    # the model in eval mode, would change the next steps
    hf = copy.deepcopy(facts_tiny.hf)
    for module in hf.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    model = LoadedModel(name=facts_tiny.name + "-dropout", hf=hf, tokenizer=facts_tiny.tokenizer)

    def deltas(every: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        result = unlearn(model, split, method="ga", optim=OptimConfig(lr=3e-3),
                         stop=StopRule(max_steps=3, forget_target=None), readings=LoopReadings(every=every))
        return result.update.deltas

    with_readings, without = deltas(1), deltas(0)
    torch.manual_seed(1)
    other_draws = unlearn(model, split, method="ga", optim=OptimConfig(lr=3e-3),
                          stop=StopRule(max_steps=3, forget_target=None), readings=LoopReadings(every=0)).update.deltas
    assert any(not torch.equal(other_draws[n], without[n]) for n in without)  # dropout is live here
    assert with_readings.keys() == without.keys()
    assert all(torch.equal(with_readings[n], without[n]) for n in without)


def test_a_reading_between_forget_checks_shows_its_quantized_forget(facts_tiny, split):
    lines: list[str] = []
    result = unlearn(facts_tiny, split, method="ga", optim=OptimConfig(lr=3e-3),
                     stop=StopRule(max_steps=4, forget_target=None, eval_every=2), readings=LoopReadings(every=3),
                     progress=lambda fraction, message: lines.append(message))
    third = result.history[2]
    assert "forget_top1" not in third and "forget_top1_q" in third
    assert f"forget top-1 quantized {third['forget_top1_q']:.3f}" in lines[2]


def test_the_readings_sample_is_the_retain_guards(facts_tiny, split):
    batches = Batches.build(facts_tiny, split)
    assert torch.equal(LoopReadings().sample(batches).facts.ids, batches.retain_sample().facts.ids)
    small = LoopReadings(retain_sample=16).sample(batches).facts
    assert len(small) == 16 and torch.equal(small.ids, batches.retain_sample(16).facts.ids)


@pytest.mark.parametrize("method", ["graddiff", "lora"])
def test_the_last_reading_equals_the_saved_runs_metrics(facts_tiny, split, tmp_path, method):
    # facts-tiny's retain set (72 facts) is smaller than the reading's sample: the sample is the set
    assert len(split.retain) < LoopReadings().retain_sample
    result, metrics, _ = run_unlearning(facts_tiny, split, method=method, optim=OptimConfig(lr=3e-3),
                                        stop=StopRule(max_steps=3, forget_target=None), measure_cad=False,
                                        runs_root=tmp_path, readings=LoopReadings(every=2))
    last = result.history[-1]
    assert last["step"] == 3
    assert last["forget_top1_q"] == pytest.approx(metrics.forget.after_q)
    assert last["retain_top1"] == pytest.approx(metrics.retain.after_fp)
    assert last["retain_top1_q"] == pytest.approx(metrics.retain.after_q)
    # the run moved the deployed model's forget accuracy, so a reading of the base would differ
    assert metrics.forget.after_q != pytest.approx(metrics.forget.base_q)


def test_readings_on_a_multiple_choice_forget_set(facts_tiny, split):
    from dataclasses import replace

    from workbench.data.facts import FactSplit

    mc = FactSplit(split.name + "-mc", forget=tuple(replace(f, kind="mc") for f in split.forget), retain=split.retain)
    lines: list[str] = []
    result = unlearn(facts_tiny, mc, method="ga", optim=OptimConfig(lr=3e-3),
                     stop=StopRule(max_steps=2, forget_target=None), readings=LoopReadings(every=1),
                     progress=lambda fraction, message: lines.append(message))
    assert Batches.build(facts_tiny, mc).choices is not None
    for record in result.history:
        assert {"forget_mc", "forget_mc_q", "forget_top1_q", "retain_top1", "retain_top1_q"} <= set(record)
    assert f"forget MC {result.history[-1]['forget_mc']:.3f} (quantized {result.history[-1]['forget_mc_q']:.3f})" \
        in lines[-1]


def test_bad_readings_settings_are_refused():
    with pytest.raises(WorkbenchError, match="every"):
        LoopReadings(every=-1)
    with pytest.raises(WorkbenchError, match="retain_sample"):
        LoopReadings(retain_sample=0)


def test_cli_refuses_a_negative_readings_interval_before_loading_a_model(capsys, monkeypatch):
    from workbench.faces.cli import main, runs

    monkeypatch.setattr(runs, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["unlearn", "--model", "facts-tiny", "--method", "ga", "--readings-every", "-1"])
    assert code != 0 and "every" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ga", "mansu"])
def test_each_record_is_published_as_it_is_made(facts_tiny, split, method):
    from workbench.core.components import all_components
    from workbench.unlearning.mansu import MansuConfig

    published: list[dict[str, float]] = []
    lengths: list[int] = []  # how many records were out at each progress message
    circuit = all_components(facts_tiny.n_layers, facts_tiny.n_heads, include_embed=False)
    result = unlearn(facts_tiny, split, method=method, optim=OptimConfig(lr=3e-3), circuit=circuit,
                     stop=StopRule(max_steps=3, forget_target=None), readings=LoopReadings(every=2),
                     method_config=MansuConfig(max_rounds=3, params_per_round=16) if method == "mansu" else None,
                     on_record=published.append, progress=lambda fraction, message: lengths.append(len(published)))
    assert result.history and published == result.history
    assert published[0] is not result.history[0]  # a copy: the sink may keep or change it
    # during the run, one at a time: each progress line saw the records made before it
    assert lengths == sorted(lengths) and 1 in lengths and lengths[-1] == len(published)


def test_a_tables_readings_reach_its_runs_and_leave_its_job_keys_alone(facts_tiny, split, tmp_path):
    from workbench.experiments.jobs import job_for
    from workbench.faces.compare import paper_table
    from workbench.quant import QuantConfig

    plain = job_for(facts_tiny, split, "graddiff", QuantConfig("nf4"))
    quiet = job_for(facts_tiny, split, "graddiff", QuantConfig("nf4"), readings=LoopReadings(every=0))
    assert quiet.readings.every == 0 and quiet.key == plain.key  # a finished run is found either way

    def table(readings):
        return paper_table(facts_tiny, methods=["graddiff"], split=split, measure_cad=False, runs_root=str(tmp_path),
                           stop=StopRule(max_steps=2, forget_target=None), readings=readings,
                           progress=lambda fraction, message: None)

    (run,) = table(LoopReadings(every=0))
    assert run.history and not any("retain_top1" in r for r in run.history)
    (again,) = table(None)  # the default readings: the same job, so the finished run is reused
    assert again.id == run.id


def test_a_sweep_files_readings_table(tmp_path):
    from workbench.experiments.sweep_config import plan_sweep, sweep_config

    config = sweep_config({"models": ["facts-tiny"], "readings": {"every": 0, "retain_sample": 64}}, source="s.toml")
    assert config.readings == LoopReadings(every=0, retain_sample=64)
    config = sweep_config({"models": ["facts-tiny"], "methods": ["graddiff", "mansu"], "readings": {"every": 3}},
                          source="s.toml")
    assert {job.readings for job in plan_sweep(config).jobs} == {LoopReadings(every=3)}
    with pytest.raises(WorkbenchError, match=r"s\.toml \[readings\]: .*every"):
        sweep_config({"models": ["facts-tiny"], "readings": {"every": -1}}, source="s.toml")
    with pytest.raises(WorkbenchError, match=r"s\.toml \[readings\]: unknown key 'often'"):
        sweep_config({"models": ["facts-tiny"], "readings": {"often": 2}}, source="s.toml")


def test_a_reading_stores_the_after_model_on_the_models_device():
    # no GPU here: the ``meta`` device stands in for one (where a tensor lands shows a silent copy);
    # the quantizer itself reads values (.item()), so only the stored after-model is checked there
    from workbench.models.toy import toy_model
    from workbench.unlearning.readings import StoredAfter

    toy = toy_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2)
    model = LoadedModel(name="meta-llama", hf=toy.hf.to("meta"), tokenizer=toy.tokenizer)
    trained = {n: p.detach().float() for n, p in model.hf.named_parameters() if "mlp" in n}  # as the loop's copy
    stored = StoredAfter(model.state(), trained)
    assert trained and all(stored[n].device.type == "meta" and stored[n].dtype == torch.float32 for n in trained)
