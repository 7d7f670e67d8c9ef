"""Storage dtype (issue 17, item 1): models load in float32, bfloat16 or float16; the
quantization analysis reads the weights as stored; updates accumulate in float32 and the
after-model is w+Δ rounded once to the storage dtype, whose effect is the PTQ-gap
decomposition's ``storage`` term."""

from __future__ import annotations

import copy

import bitsandbytes.functional as bnbf
import pytest
import torch
from conftest import bf16_copy, large_circuit_paths, own_top1_split

from workbench.core.components import all_components
from workbench.core.device import DTYPE_ENV, choose_dtype
from workbench.core.errors import WorkbenchError
from workbench.faces.cli import main
from workbench.measurement.metrics import measure_update, quantized_base, variant_model
from workbench.models.adapter import SUPPORTED_FAMILIES
from workbench.models.loading import load_model
from workbench.models.toy import toy_model
from workbench.models.update import Update, stored_sum
from workbench.quant import QuantConfig
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.registry import unlearn

pytestmark = pytest.mark.usefixtures("one_thread")
NF4 = QuantConfig("nf4")
SILENT = lambda fraction, message: None  # noqa: E731


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    toy = toy_model("llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2)
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    toy.hf.save_pretrained(path)
    toy.tokenizer.save_pretrained(path)
    return path


def test_choose_dtype_defaults_to_float32_and_refuses_others(monkeypatch):
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    assert choose_dtype() == torch.float32
    assert choose_dtype("bfloat16") == torch.bfloat16
    monkeypatch.setenv(DTYPE_ENV, "float16")
    assert choose_dtype() == torch.float16
    with pytest.raises(WorkbenchError, match="unknown dtype 'float64'"):
        choose_dtype("float64")
    with pytest.raises(WorkbenchError, match="not supported"):
        choose_dtype(torch.int8)


def test_load_model_in_bfloat16_is_its_own_cached_model(llama_dir, monkeypatch):
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    fp32 = load_model(llama_dir)
    bf16 = load_model(llama_dir, dtype="bfloat16")
    assert {p.dtype for p in fp32.hf.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.hf.parameters()} == {torch.bfloat16}
    assert bf16 is not fp32 and load_model(llama_dir, dtype=torch.bfloat16) is bf16
    assert bf16.fingerprint != fp32.fingerprint


def test_cli_dtype_reaches_load_model_and_is_restored(llama_dir, monkeypatch, capsys):
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    seen = []
    import workbench.faces.cli.measure as measure_cli

    real = measure_cli.load_model
    monkeypatch.setattr(measure_cli, "load_model", lambda name, **kw: seen.append(choose_dtype()) or real(name, **kw))
    main(["--dtype", "bfloat16", "quant-report", "--model", str(llama_dir)])
    assert seen == [torch.bfloat16]
    assert DTYPE_ENV not in __import__("os").environ


def test_cli_working_mb_reaches_the_budget_and_is_restored(llama_dir, monkeypatch, capsys):
    """``workbench --working-mb MB``: the budget every step of the command is sized to, then the
    environment as it was; a budget that is not a whole number of MiB ≥ 1 is a usage error."""
    from workbench.core.device import WORKING_MB_ENV
    from workbench.models.loaded import LoadedModel

    monkeypatch.setenv(WORKING_MB_ENV, "7")
    seen = []
    import workbench.faces.cli.measure as measure_cli

    real = measure_cli.load_model
    monkeypatch.setattr(measure_cli, "load_model",
                        lambda name, **kw: (m := real(name, **kw), seen.append(LoadedModel.working_budget_bytes(m)))[0])
    main(["--working-mb", "64", "quant-report", "--model", str(llama_dir)])
    assert seen == [64 * 2**20]
    assert __import__("os").environ[WORKING_MB_ENV] == "7"
    for bad in ("0", "x"):
        with pytest.raises(SystemExit) as stop:
            main(["--working-mb", bad, "quant-report", "--model", str(llama_dir)])
        assert stop.value.code == 2
    assert "--working-mb: the budget must be at least 1 (MiB), got 0" in capsys.readouterr().err
    # a command that fails restores the environment too; a malformed setting fails at the start
    assert main(["--working-mb", "64", "quant-report", "--model", str(llama_dir / "missing")]) == 1
    assert __import__("os").environ[WORKING_MB_ENV] == "7"
    monkeypatch.setenv(WORKING_MB_ENV, "lots")
    seen.clear()
    assert main(["quant-report", "--model", str(llama_dir)]) == 1
    assert not seen and "WORKBENCH_WORKING_MB must be a whole number of MiB, got 'lots'" in capsys.readouterr().err


def test_stored_sum_adds_in_float32_and_rounds_once():
    base = torch.tensor([256.0, 1.0], dtype=torch.bfloat16)
    delta = torch.tensor([1.00390625, 0.5])  # 1 + 2^-8: half a bf16 ulp above 1
    out = stored_sum(base, delta)
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [258.0, 1.5]  # 257.0039 rounds up to 258 (bf16 ulp at 256 is 2)
    # rounding Δ to bf16 first, then adding in bf16, rounds twice: 1.0039 -> 1.0, 257 -> 256 (ties to even)
    assert (base + delta.to(torch.bfloat16)).tolist() == [256.0, 1.5]
    f32 = torch.tensor([1.0, 2.0])
    assert torch.equal(stored_sum(f32, torch.tensor([1e-8, 0.5])), f32 + torch.tensor([1e-8, 0.5]))



def test_quantization_reads_the_bf16_weights_as_stored(toy_llama_gqa):
    model = bf16_copy(toy_llama_gqa)
    name = "model.layers.0.mlp.up_proj.weight"
    w = model.hf.get_parameter(name).detach()
    q = quantized_base(model, NF4)[name]
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert q.dtype == torch.bfloat16
    assert torch.equal(q, bnbf.dequantize_4bit(packed, state))


def test_mansu_in_bf16_accumulates_in_float32_and_the_after_model_is_rounded_once(toy_llama_gqa):
    model = bf16_copy(toy_llama_gqa)
    split = own_top1_split(model)
    circuit = all_components(model.n_layers, model.n_heads, include_embed=False)
    result = unlearn(model, split, method="mansu", quant=NF4, circuit=circuit, progress=SILENT,
                     method_config=MansuConfig(max_rounds=2, params_per_round=16))
    deltas = result.update.deltas
    assert deltas and all(d.dtype == torch.float32 for d in deltas.values())
    after = variant_model(model, result.update, NF4, "after_fp", {})
    for name, d in deltas.items():
        stored = after.hf.get_parameter(name).detach()
        assert stored.dtype == torch.bfloat16
        assert torch.equal(stored, (model.hf.get_parameter(name).float() + d).to(torch.bfloat16))
    m = measure_update(model, split, result.update, quant=NF4, cad=False)
    from workbench.measurement.evaluation import evaluate_facts

    def wide_top1(rounded: bool) -> float:
        wide = copy.deepcopy(model.hf).float()
        with torch.no_grad():
            for name, d in deltas.items():
                w = model.hf.get_parameter(name).float() + d
                wide.get_parameter(name).copy_(w.to(torch.bfloat16).float() if rounded else w)
        return evaluate_facts(wide, split.forget, tokenizer=model.tokenizer, multiple_choice=False).top1

    d = m.ptq_gap_decomposition
    assert d.storage == wide_top1(rounded=True) - wide_top1(rounded=False)
    assert d.base_shift + d.rounding == pytest.approx(m.ptq_gap)


def test_float32_models_have_no_storage_term(facts_tiny, split):
    name = "transformer.h.1.mlp.c_fc.weight"
    delta = torch.zeros_like(facts_tiny.state()[name])
    delta[:4, :4] = 0.3
    m = measure_update(facts_tiny, split, Update({name: delta}), quant=NF4, cad=False)
    assert m.ptq_gap_decomposition.storage == 0.0
    assert m.to_json()["ptq_gap_decomposition"]["storage"] == 0.0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_widened_copy_computes_as_a_float32_copy_holding_one_module_at_a_time(family):
    """The storage term's float32 forward: the same logits, bit for bit, as a copy of the whole
    model cast to float32 (with one weight replaced), while the 16-bit model stays as it was."""
    from workbench.core.sharing import sharing_copy, widened_copy

    model = bf16_copy(toy_model(family))
    name = next(n for n in model.adapter.quantizable(NF4))
    replacement = torch.randn(model.hf.get_parameter(name).shape, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    full = sharing_copy(model.hf)
    for n, p in full.named_parameters():
        p.data = replacement if n == name else p.data.float()
    before = {n: p.detach().clone() for n, p in model.hf.named_parameters()}
    wide = widened_copy(model.hf, {name: replacement})
    with torch.no_grad():
        expected, got = full(ids).logits, wide(ids).logits
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert all(p.dtype == torch.bfloat16 for p in wide.parameters())  # put back after the forward
    assert all(torch.equal(p.detach(), before[n]) and p.dtype == torch.bfloat16 for n, p in model.hf.named_parameters())


def _widened_gradients(monkeypatch) -> None:
    """MANSU's gradients as they were held before: widened to float32 as soon as computed."""
    import workbench.unlearning.mansu.candidates as candidates

    computed = candidates.answer_logprob_gradient
    monkeypatch.setattr(candidates, "answer_logprob_gradient",
                        lambda *a, **k: {n: g.float() for n, g in computed(*a, **k).items()})


@pytest.mark.parametrize(("direction", "large"), [("average", False), ("full_precision", False),
                                                   ("quantized", False), ("average", True)])
def test_mansu_in_bf16_holds_its_gradients_in_bf16_and_moves_as_with_float32_ones(toy_llama_gqa, direction, large,
                                                                                   monkeypatch):
    """A 16-bit model's gradients are held in its dtype until scored (half their float32 bytes):
    widening is exact, so the run is the one with float32 gradients, bit for bit; the average of
    the two forget directions is taken in float32, where it was. ``large``: the paths a large
    circuit takes (grids rebuilt, Q(w+Δ) as codes, w+Δ summed at forward, scoring in two passes)."""
    from workbench.unlearning.batches import Batches
    from workbench.unlearning.mansu.candidates import round_gradients
    from workbench.unlearning.mansu.state import setup_state
    from workbench.unlearning.task import UnlearningTask

    if large:
        large_circuit_paths(monkeypatch)

    model = bf16_copy(toy_llama_gqa)
    split = own_top1_split(model)
    circuit = all_components(model.n_layers, model.n_heads, include_embed=False)
    # float32 state (not the "auto" default's bf16 for this model): the average stays float32
    config = MansuConfig(max_rounds=3, params_per_round=16, forget_direction=direction, state_precision="float32")

    task = UnlearningTask(model=model, batches=Batches.build(model, split), quant=NF4, circuit=tuple(circuit))
    state = setup_state(model, task.batches, task.circuit, NF4, config, report=SILENT)
    gradients = round_gradients(state, task.batches, config)
    assert gradients.retain is not None and {g.dtype for g in gradients.retain.values()} == {torch.bfloat16}
    held = torch.float32 if direction == "average" else torch.bfloat16
    assert {g.dtype for g in gradients.forget.values()} == {held}
    if direction == "average":  # ½(a + b) of the two widened directions, to the bit
        from workbench.unlearning.mansu.candidates import forget_direction

        a = forget_direction(state.work, state.names, task.batches.forget, state.still)
        b = forget_direction(state.qwork, state.names, task.batches.forget, state.q_still)
        for n in state.names:
            assert torch.equal(gradients.forget[n], (a[n].float() + b[n].float()) * 0.5), n

    def run():
        return unlearn(model, split, method="mansu", quant=NF4, circuit=circuit, progress=SILENT,
                       method_config=config)

    held_run = run()
    _widened_gradients(monkeypatch)
    widened_run = run()
    assert held_run.history == widened_run.history and held_run.history
    assert sorted(held_run.update.deltas) == sorted(widened_run.update.deltas)
    assert sum(int((d != 0).sum()) for d in held_run.update.deltas.values()) > 0
    for name, delta in held_run.update.deltas.items():
        assert torch.equal(widened_run.update.deltas[name], delta), name


@pytest.mark.parametrize("large", [False, True])
def test_mansu_state_in_the_storage_dtype_holds_half_the_bytes(toy_llama_gqa, large, monkeypatch):
    """``state_precision="storage"`` on a bf16 model: the retain Fisher and the averaged forget
    direction are the float32 ones rounded once to bf16 (2 bytes per candidate weight each, not
    4); the run moves weights, accumulates its deltas in float32 and says so in its label.
    ``large``: the paths a large circuit takes (scoring in two passes, the streamed damping)."""
    from workbench.unlearning.batches import Batches
    from workbench.unlearning.mansu.candidates import forget_direction, round_gradients
    from workbench.unlearning.mansu.state import setup_state

    if large:
        large_circuit_paths(monkeypatch)
    model = bf16_copy(toy_llama_gqa)
    split = own_top1_split(model)
    circuit = tuple(all_components(model.n_layers, model.n_heads, include_embed=False))
    batches = Batches.build(model, split)
    wide = MansuConfig(max_rounds=2, params_per_round=16, state_precision="float32")
    narrow = MansuConfig(max_rounds=2, params_per_round=16, state_precision="storage")
    # float32 first: a Fisher kept from it (the setup memo) must not stand in for the rounded one
    wide_state = setup_state(model, batches, circuit, NF4, wide, report=SILENT)
    state = setup_state(model, batches, circuit, NF4, narrow, report=SILENT)
    assert state.names == wide_state.names and state.names
    for n in state.names:
        assert wide_state.fisher[n].dtype == torch.float32 and state.fisher[n].dtype == torch.bfloat16
        assert torch.equal(state.fisher[n], wide_state.fisher[n].to(torch.bfloat16)), n
        held_p, wide_p = state.projectors[n], wide_state.projectors[n]
        assert wide_p.stored.dtype == torch.float32 and held_p.stored.dtype == torch.bfloat16
        assert torch.equal(held_p.stored, wide_p.stored.to(torch.bfloat16)), n
        assert held_p.matrix().dtype == torch.float32  # widened where used
        assert torch.equal(held_p.matrix(), wide_p.matrix().to(torch.bfloat16).float()), n
    # weights reading one input (q/k/v, gate/up) still share one projector
    assert len({id(p) for p in state.projectors.values()}) == len({id(p) for p in wide_state.projectors.values()})
    gradients = round_gradients(state, batches, narrow)
    a = forget_direction(state.work, state.names, batches.forget, state.still)
    b = forget_direction(state.qwork, state.names, batches.forget, state.q_still)
    for n in state.names:
        assert gradients.forget[n].dtype == torch.bfloat16
        assert torch.equal(gradients.forget[n], ((a[n].float() + b[n].float()) * 0.5).to(torch.bfloat16)), n
    held = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    wide_gradients = round_gradients(wide_state, batches, wide)
    assert 2 * held(state.fisher.values()) == held(wide_state.fisher.values())
    distinct = lambda projectors: {id(p): p.stored for p in projectors.values()}.values()  # noqa: E731
    assert 2 * held(distinct(state.projectors)) == held(distinct(wide_state.projectors))
    assert 2 * held(gradients.forget.values()) == held(wide_gradients.forget.values())

    result = unlearn(model, split, method="mansu", quant=NF4, circuit=list(circuit), progress=SILENT,
                     method_config=narrow)
    assert result.method == "mansu-state_storage" and result.history
    assert result.update.nnz() > 0 and all(d.dtype == torch.float32 for d in result.update.deltas.values())
    assert result.diagnostics["fisher_bound"] is not None and result.diagnostics["fisher_bound"] > 0


def test_mansu_state_in_the_storage_dtype_of_a_float32_model_is_float32(facts_tiny, split):
    """Nothing to round on a float32 model: the same Fisher and directions as the default."""
    from workbench.unlearning.batches import Batches
    from workbench.unlearning.mansu.candidates import round_gradients
    from workbench.unlearning.mansu.state import setup_state

    circuit = tuple(all_components(facts_tiny.n_layers, facts_tiny.n_heads, include_embed=False))
    batches = Batches.build(facts_tiny, split)
    configs = [MansuConfig(state_precision="float32"), MansuConfig(state_precision="storage")]
    states = [setup_state(facts_tiny, batches, circuit, NF4, c, report=SILENT) for c in configs]
    grads = [round_gradients(s, batches, c) for s, c in zip(states, configs)]
    for n in states[0].names:
        assert states[1].fisher[n].dtype == torch.float32 and torch.equal(states[1].fisher[n], states[0].fisher[n])
        assert torch.equal(states[1].projectors[n].stored, states[0].projectors[n].stored)
        assert grads[1].forget[n].dtype == torch.float32 and torch.equal(grads[1].forget[n], grads[0].forget[n])


def test_cli_mansu_state_reaches_the_run_and_its_label(capsys, tmp_path, monkeypatch):
    """``workbench --dtype bfloat16 unlearn --mansu-state storage``: the run's config and method say so."""
    from workbench.experiments.store import list_runs

    monkeypatch.delenv(DTYPE_ENV, raising=False)
    code = main(["--dtype", "bfloat16", "unlearn", "--model", "facts-tiny", "--method", "mansu", "--mansu-state",
                 "storage", "--max-rounds", "1", "--params-per-round", "8", "--runs-root", str(tmp_path),
                 "--no-oracle"])
    out = capsys.readouterr().out
    assert code == 0 and "mansu-state_storage on facts-tiny" in out
    (run,) = list_runs(root=tmp_path)
    assert run.config["mansu"]["state_precision"] == "storage" and run.metrics.method == "mansu-state_storage"
    assert run.metrics.params_changed > 0
    with pytest.raises(SystemExit):
        main(["unlearn", "--model", "facts-tiny", "--method", "mansu", "--mansu-state", "float16"])
    assert "invalid choice: 'float16'" in capsys.readouterr().err


def test_auto_state_precision_is_the_storage_dtype_of_a_16bit_model_and_float32_otherwise():
    """MANSU's default state precision, decided per model (docs/results/smollm2_bf16.md's held-out
    check): 16-bit weights hold 16-bit state, anything else float32; an explicit choice stays."""
    auto = MansuConfig()
    assert auto.state_precision == "auto"
    assert auto.for_storage({torch.bfloat16}).state_precision == "storage"
    assert auto.for_storage({torch.float16}).state_precision == "storage"
    assert auto.for_storage({torch.float32}).state_precision == "float32"
    assert auto.for_storage({torch.bfloat16, torch.float32}).state_precision == "float32"  # mixed: the wider
    assert auto.for_storage(set()).state_precision == "float32"
    for explicit in ("float32", "storage"):
        config = MansuConfig(state_precision=explicit)
        assert config.for_storage({torch.bfloat16}) is config and config.for_storage({torch.float32}) is config
    with pytest.raises(WorkbenchError, match="decide it with config.for_storage"):
        _ = auto.state_in_storage_dtype  # no step of the method guesses it
    assert auto.label == "mansu"


@pytest.mark.parametrize("sixteen_bit", [True, False])
def test_default_mansu_state_is_the_explicit_one_the_model_calls_for(toy_llama_gqa, sixteen_bit):
    """A default MANSU run on a bf16 model is the ``state_precision="storage"`` run (history and
    deltas to the bit, its label and diagnostics saying so); on a float32 model it is the float32
    run, exactly as before the default was "auto"."""
    from workbench.unlearning.batches import Batches
    from workbench.unlearning.mansu.state import setup_state

    model = bf16_copy(toy_llama_gqa) if sixteen_bit else toy_llama_gqa
    split = own_top1_split(model)
    circuit = list(all_components(model.n_layers, model.n_heads, include_embed=False))
    explicit = "storage" if sixteen_bit else "float32"
    runs = [unlearn(model, split, method="mansu", quant=NF4, circuit=circuit, progress=SILENT,
                    method_config=MansuConfig(max_rounds=2, params_per_round=16, state_precision=precision))
            for precision in ("auto", explicit)]
    assert runs[0].history == runs[1].history and runs[0].update.nnz() > 0
    assert sorted(runs[0].update.deltas) == sorted(runs[1].update.deltas)
    for name, delta in runs[0].update.deltas.items():
        assert torch.equal(delta, runs[1].update.deltas[name]), name
    assert runs[0].method == ("mansu-state_storage" if sixteen_bit else "mansu")
    assert runs[0].diagnostics["config"]["state_precision"] == explicit
    # setup_state decides "auto" too (a step called without mansu() holds what the model calls for)
    state = setup_state(model, Batches.build(model, split), tuple(circuit), NF4, MansuConfig(), report=SILENT)
    assert state.storage_state is sixteen_bit
    assert {f.dtype for f in state.fisher.values()} == {torch.bfloat16 if sixteen_bit else torch.float32}


@pytest.mark.parametrize(("family", "kv_heads"), [("gpt2", None), ("llama", 2)])
def test_edge_attribution_runs_on_a_16bit_model_and_agrees_with_its_float32_copy(family, kv_heads):
    """The app's default attribution (edges on) on a bf16 model: the 16-bit hook gradients are
    widened where the float32 write rows meet them, and the per-query-head K/V split is checked
    to bf16's rounding, not float32's. Scores agree with the float32 model holding the same
    (bf16-rounded) weights to within bf16 arithmetic, nodes and edges alike."""
    from workbench.faces.bench import toy_pairs
    from workbench.interpretability.attribution import AttributionConfig, attribute

    extra = {"n_kv_heads": kv_heads} if kv_heads else {}
    model = toy_model(family, n_layers=2, d_model=64, n_heads=4, dtype=torch.bfloat16, **extra)
    wide = copy.deepcopy(model.hf).float()  # the same weights, computed in float32
    wide_model = type(model)(name=model.name + "-f32", hf=wide, tokenizer=model.tokenizer, path=None)
    pairs = toy_pairs(model, 6, 6)
    config = AttributionConfig(edges=True)
    narrow, full = attribute(model, pairs, config), attribute(wide_model, pairs, config)
    assert narrow.edge_scores and set(narrow.edge_scores) == set(full.edge_scores)

    def close(a: dict, b: dict) -> None:
        keys = sorted(b, key=str)
        x = torch.tensor([a[k] for k in keys], dtype=torch.float64)
        y = torch.tensor([b[k] for k in keys], dtype=torch.float64)
        assert float((x - y).norm()) <= 0.05 * float(y.norm()) + 1e-9, (x, y)  # measured 0.6–2.1%

    close(narrow.scores, full.scores)
    close(narrow.edge_scores, full.edge_scores)


@pytest.mark.parametrize("family", sorted(SUPPORTED_FAMILIES))
def test_every_family_in_bf16_runs_through_the_bridge_as_through_transformers(family):
    """Each supported family stored in bf16: the attribution bridge's logits are the model's own,
    bit for bit (OLMo-2's float32 rotary tables made the bridge mix float32 queries with bf16
    values and fail: the rotated queries and keys now get their dtype back, as transformers
    gives it them), and the app's default attribution (edges on) gives finite scores."""
    from workbench.faces.bench import toy_pairs
    from workbench.interpretability.attribution import AttributionConfig, attribute

    model = toy_model(family, n_layers=2, d_model=32, n_heads=4, dtype=torch.bfloat16)
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own, bridged = model.hf(ids).logits, model.bridge()(ids)
    assert bridged.dtype == torch.bfloat16 and torch.equal(bridged, own)
    result = attribute(model, toy_pairs(model, 4, 6), AttributionConfig(edges=True))
    assert result.edge_scores and all(torch.isfinite(torch.tensor(v)) for v in result.edge_scores.values())


def test_the_app_session_names_a_16bit_run_as_it_ran(tmp_path, monkeypatch):
    """The app's "Run MANSU" on a bf16 model: the run on screen is labelled as it ran (its state
    in bf16 by default), the label a reopened run shows."""
    from workbench.faces.session import Session, run_summary

    monkeypatch.setenv(DTYPE_ENV, "bfloat16")
    s = Session(runs_root=tmp_path)
    s.setup("facts-tiny")
    s.attribute()
    s.unlearn("mansu", mansu={"max_rounds": 1, "params_per_round": 8}, use_oracle=False, measure_cad=False)
    assert s.current is not None and s.current.label.startswith("mansu-state_storage · ")
    assert run_summary(s.current).startswith("**mansu-state_storage · ")
    assert s.open_run(s.current.run_id).label == s.current.label


def test_a_16bit_run_is_exported_and_probed_on_its_own_dtype(tmp_path, monkeypatch, capsys):
    """``workbench export RUN`` and ``workbench probe RUN`` load the run's base model in the dtype
    the run recorded (without ``--dtype`` they loaded float32, another fingerprint, and refused),
    and the relearning attack on a float16 run trains a float32 copy (Adam on float16 weights
    went to NaN) whose result is stored back in float16."""
    import json

    from workbench.experiments.store import list_runs
    from workbench.measurement.probes import relearning_attack

    monkeypatch.delenv(DTYPE_ENV, raising=False)
    assert main(["--dtype", "float16", "unlearn", "--model", "facts-tiny", "--method", "mansu", "--max-rounds", "1",
                 "--params-per-round", "8", "--runs-root", str(tmp_path), "--no-oracle"]) == 0
    (run,) = list_runs(root=tmp_path)
    assert run.config["provenance"]["dtype"] == "float16"
    capsys.readouterr()
    assert main(["export", str(run.path), "--out", str(tmp_path / "out")]) == 0  # no --dtype: the run's
    info = json.loads((tmp_path / "out" / "workbench_export.json").read_text())
    assert info["dtype"] == "float16" and info["base_fingerprint"] == run.metrics.model_fingerprint

    from workbench.experiments.flow import model_and_split_for_run

    model, split = model_and_split_for_run(run)
    assert model.fingerprint == run.metrics.model_fingerprint and next(model.hf.parameters()).dtype == torch.float16
    result = relearning_attack(model, split, run.update(), quant=NF4, steps=3)
    for side in ("fp", "quantized"):
        assert all(0.0 <= result[side][k] <= 1.0 for k in ("base", "unlearned", "relearned")), result
