"""Every supported family end to end, on tiny random models built from their config classes.

Per family: the model adapter's circuit → parameter mapping (perturb a component's slices,
only that component's output moves), attribution against TransformerLens, MANSU and GradDiff
through the normal entry, and the quantization coverage against transformers' bnb loader.
Unsupported families (mixture-of-experts, encoder–decoder, state-space) are refused.
"""

from __future__ import annotations

import copy
from typing import get_args

import pytest
import torch
from conftest import own_top1_split

from workbench.core.components import Component, all_components, head, mlp
from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact
from workbench.data.files import save_fact_file
from workbench.experiments.flow import attribute_forget_set, default_circuit, run_unlearning
from workbench.experiments.store import load_run
from workbench.faces.cli import main
from workbench.interpretability.attribution import AttributionConfig, attribute, make_prompt_pairs
from workbench.interpretability.parameters import circuit_parameters
from workbench.measurement.reference import tl_node_scores
from workbench.models.adapter import SUPPORTED_FAMILIES, NormKind
from workbench.models.loaded import Architecture, LoadedModel
from workbench.models.loading import load_model
from workbench.models.toy import toy_model
from workbench.quant import QuantConfig, quantizable_parameters, transposed_parameters
from workbench.unlearning.mansu.config import MansuConfig
from workbench.unlearning.registry import unlearn
from workbench.unlearning.task import OptimConfig, StopRule

FAMILIES = ["gpt2", "gpt_neox", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "olmo2"]
NO_GQA = ("gpt2", "gpt_neox")
SILENT = lambda fraction, message: None  # noqa: E731
LAYER, HEAD = 1, 1

_MODELS: dict[str, LoadedModel] = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: one torch thread, the box is small and shared


def tiny(family: str) -> LoadedModel:
    """2 layers, d_model 32, 4 heads (2 kv heads where the family has GQA), built once."""
    if family not in _MODELS:
        _MODELS[family] = toy_model(family, d_model=32, n_heads=4, n_kv_heads=None if family in NO_GQA else 2)
    return _MODELS[family]


# --- (a) circuit -> parameters: only the component's output moves ----------------------------------


def _o_module(model: LoadedModel, layer: int) -> str:
    return model.adapter.layers[layer].attention.o.module


def _mlp_module(model: LoadedModel, layer: int) -> str:
    return model.adapter.layers[layer].mlp.out.module.rsplit(".", 1)[0]


def _run(model: LoadedModel, ids: torch.Tensor, ablate: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Per layer: every head's ``z`` (the o projection's input, ``[b, s, n_heads, d_head]``), the o
    projection's output, the MLP's hidden activations (the out projection's input) and its output.
    ``ablate=(layer, head)`` zeroes that head's z before the o projection."""
    a = model.adapter
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def pre(key: str, zero: int | None):
        def hook(_m, args):
            x = args[0]
            acts[key] = x.detach().clone()
            if zero is None:
                return None
            x = x.clone().reshape(*x.shape[:2], a.n_heads, a.d_head)
            x[:, :, zero] = 0
            return (x.reshape(*x.shape[:2], -1),)
        return hook

    def post(key: str):
        def hook(_m, _args, out):
            acts[key] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return hook

    for layer in range(a.n_layers):
        o = model.hf.get_submodule(_o_module(model, layer))
        zero = ablate[1] if ablate is not None and ablate[0] == layer else None
        handles += [o.register_forward_pre_hook(pre(f"z{layer}", zero)), o.register_forward_hook(post(f"o{layer}"))]
        out = model.hf.get_submodule(a.layers[layer].mlp.out.module)
        handles.append(out.register_forward_pre_hook(pre(f"hidden{layer}", None)))
        handles.append(model.hf.get_submodule(_mlp_module(model, layer)).register_forward_hook(post(f"mlp{layer}")))
    try:
        with torch.no_grad():
            model.hf(ids)
    finally:
        for h in handles:
            h.remove()
    for layer in range(a.n_layers):
        acts[f"z{layer}"] = acts[f"z{layer}"].reshape(*ids.shape, a.n_heads, a.d_head)
    return acts


def _perturbed(model: LoadedModel, masks: dict[str, torch.Tensor], seed: int = 0) -> LoadedModel:
    gen = torch.Generator().manual_seed(seed)
    state = model.state()
    new = {n: state[n] + 0.5 * torch.randn(state[n].shape, generator=gen) * m for n, m in masks.items()}
    return model.with_state(new, name=f"{model.name}+perturbed")


def _moved(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def _moved_heads(base: dict[str, torch.Tensor], after: dict[str, torch.Tensor], layer: int) -> set[int]:
    z0, z1 = base[f"z{layer}"], after[f"z{layer}"]
    return {h for h in range(z0.shape[2]) if _moved(z0[:, :, h], z1[:, :, h])}


IDS = torch.tensor([[3, 14, 15, 92, 65, 35], [8, 97, 93, 23, 84, 62]])


@pytest.mark.parametrize("family", FAMILIES)
def test_head_slices_move_only_that_head(family):
    model = tiny(family)
    a = model.adapter
    att = a.layers[LAYER].attention
    group = a.n_heads // a.n_kv_heads
    kv_group = {h for h in range(a.n_heads) if h // group == HEAD // group}
    masks = circuit_parameters(model, [head(LAYER, HEAD)])
    o_weight = att.o.weight_name
    qkv = {n: m for n, m in masks.items() if n != o_weight}
    base = _run(model, IDS)
    after = _run(_perturbed(model, qkv), IDS)
    assert _moved_heads(base, after, 0) == set() and not _moved(base["mlp0"], after["mlp0"])
    moved = _moved_heads(base, after, LAYER)
    if att.qk_norm_shared_across_heads:
        # OLMo-2 normalises q (k) over all heads at once: one head's q/k rescales every head's.
        assert moved == set(range(a.n_heads))
        values = {n: m & _value_only(model, n, m) for n, m in qkv.items()}
        moved = _moved_heads(base, _run(_perturbed(model, values), IDS), LAYER)
    assert HEAD in moved and moved <= kv_group, (family, moved)

    # The output projection's slice reads only this head's z.
    o_only = {o_weight: masks[o_weight]}
    after_o = _run(_perturbed(model, o_only), IDS)
    assert _moved_heads(base, after_o, LAYER) == set() and _moved(base[f"o{LAYER}"], after_o[f"o{LAYER}"])
    ablated = _run(model, IDS, ablate=(LAYER, HEAD))
    ablated_after = _run(_perturbed(model, o_only), IDS, ablate=(LAYER, HEAD))
    torch.testing.assert_close(ablated[f"o{LAYER}"], ablated_after[f"o{LAYER}"], atol=1e-6, rtol=1e-5)


def _value_only(model: LoadedModel, name: str, mask: torch.Tensor) -> torch.Tensor:
    """The part of a q/k/v mask that belongs to value features (OLMo-2 has separate projections)."""
    att = model.adapter.layers[LAYER].attention
    keep = name.startswith(att.v.module + ".")
    return torch.full_like(mask, keep)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_slices_move_only_that_mlp(family):
    model = tiny(family)
    base = _run(model, IDS)
    after = _run(_perturbed(model, circuit_parameters(model, [mlp(0)])), IDS)
    assert _moved_heads(base, after, 0) == set()
    assert _moved(base["mlp0"], after["mlp0"])
    # A neuron subset: only those neurons' hidden activations move (gate and up, fused or not).
    neurons = [1, 5]
    masks = circuit_parameters(model, [mlp(LAYER)], neurons={LAYER: neurons})
    out_weight = model.adapter.layers[LAYER].mlp.out.weight_name
    inputs = {n: m for n, m in masks.items() if n != out_weight}
    after = _run(_perturbed(model, inputs), IDS)
    h0, h1 = base[f"hidden{LAYER}"], after[f"hidden{LAYER}"]
    moved = {i for i in range(h0.shape[-1]) if _moved(h0[..., i], h1[..., i])}
    assert moved == set(neurons), (family, moved)
    assert _moved_heads(base, after, LAYER) == set()


def test_architecture_names_are_the_supported_families():
    assert set(get_args(Architecture)) == set(SUPPORTED_FAMILIES)
    assert {tiny(f).architecture for f in FAMILIES} == set(SUPPORTED_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_describes_the_family(family):
    a = tiny(family).adapter
    assert a.n_layers == 2 and a.n_heads == 4 and a.n_kv_heads == (4 if family in NO_GQA else 2)
    assert (a.transposed != frozenset()) == (family == "gpt2")
    norm = {"gpt2": NormKind.LAYER, "gpt_neox": NormKind.LAYER, "gemma2": NormKind.RMS_PLUS_ONE,
            "gemma3": NormKind.RMS_PLUS_ONE}.get(family, NormKind.RMS)
    assert a.norm is norm
    post_norm = family in ("gemma2", "gemma3", "olmo2")
    assert all((layer.attention_out_norm is not None) == post_norm for layer in a.layers)
    params = dict(tiny(family).hf.named_parameters())
    for layer in a.layers:
        assert all(n in params for n in layer.norms)
    assert all(e in params for e in a.embeddings)


# --- (b) attribution: nodes equal TransformerLens, edges add up to nodes --------------------------


def _toy_facts(n: int = 6, length: int = 6, seed: int = 0) -> list[Fact]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n // 2):
        base = torch.randint(0, 100, (length,), generator=gen).tolist()
        other = list(base)
        other[1] = (other[1] + 1 + k) % 100
        a, b = " ".join(f"w{i}" for i in base), " ".join(f"w{i}" for i in other)
        out += [Fact(a, f"w{(7 * k) % 100}", (), corrupt_prompt=b),
                Fact(b, f"w{(7 * k + 3) % 100}", (), corrupt_prompt=a)]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_nodes_and_edges(family):
    model = tiny(family)
    pairs = make_prompt_pairs(model, _toy_facts())
    ours = attribute(model, pairs, AttributionConfig(batch_size=64), progress=SILENT)
    tl = tl_node_scores(model, pairs)
    writers = all_components(model.n_layers, model.n_heads)
    assert set(tl) == set(ours.scores) == set(writers)
    assert max(abs(s) for s in tl.values()) > 1e-4
    assert max(abs(ours.scores[c] - tl[c]) for c in tl) < 1e-4
    edges = attribute(model, pairs, AttributionConfig(edges=True, batch_size=4), progress=SILENT)
    sums: dict[Component, float] = {}
    for (writer, _reader, _inp), score in edges.edge_scores.items():
        sums[writer] = sums.get(writer, 0.0) + score
    scale = max(1.0, max(abs(s) for s in edges.scores.values()))
    assert max(abs(sums[c] - edges.scores[c]) for c in writers) < 1e-5 * scale


# --- (c) MANSU and GradDiff through the normal entry ---------------------------------------------



@pytest.mark.parametrize("family", FAMILIES)
def test_mansu_and_graddiff_runs(family):
    model = tiny(family)
    split = own_top1_split(model, n_prompts=60, n_forget=10, name=f"toy-{model.architecture}")
    before = model.weights_hash()
    circuit = default_circuit(attribute_forget_set(model, split), top_k=4)
    mansu_cfg = MansuConfig(params_per_round=16, max_rounds=2, fisher_samples=16, retain_guard=None)
    result, _metrics, run = run_unlearning(model, split, method="mansu", circuit=circuit, method_config=mansu_cfg,
                                          measure_cad=False)
    assert run is not None and load_run(run.id).id == run.id
    masks = circuit_parameters(model, circuit.selected)
    assert result.update.nnz() > 0
    for name, delta in result.update.deltas.items():
        assert name in model.adapter.quantized and name in masks
        assert not bool((delta != 0)[~masks[name]].any()), f"{name}: MANSU moved outside the circuit"
    grad, _m, grad_run = run_unlearning(model, split, method="graddiff", optim=OptimConfig(lr=1e-3),
                                        stop=StopRule(max_steps=2, forget_target=None), measure_cad=False)
    assert grad_run is not None and grad.update.nnz() > 0
    assert set(grad.update.deltas) <= model.adapter.quantized
    assert model.weights_hash() == before


@pytest.mark.parametrize("family", ["phi3", "gemma3", "olmo2"])
def test_layout_dependent_baselines_run(family):
    """SURE (row saliency by layout), LoRA (target modules), RMU and QuAIL on fused-projection,
    (1 + w)-norm and post-norm families: each moves only quantized weights, never the base."""
    model = tiny(family)
    split = own_top1_split(model, n_prompts=60, n_forget=10, name=f"toy-{model.architecture}")
    before = model.weights_hash()
    for method in ("sure", "lora", "rmu", "quail"):
        result = unlearn(model, split, method=method, optim=OptimConfig(lr=1e-3),
                         stop=StopRule(max_steps=2, forget_target=None), progress=SILENT)
        assert result.update.nnz() > 0, method
        assert set(result.update.deltas) <= model.adapter.quantized, method
    assert model.weights_hash() == before


# --- (d) quantization coverage ---------------------------------------------------------------------


def _bnb_replaced(model: LoadedModel) -> set[str]:
    """Weights transformers' own 4-bit loader turns into bitsandbytes ``Linear4bit`` layers."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    work = copy.deepcopy(model.hf)
    work = replace_with_bnb_linear(work, modules_to_not_convert=get_keys_to_not_convert(work),
                                   quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    return {f"{n}.weight" for n, m in work.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_linears_are_what_bnb_replaces(family):
    model = tiny(family)
    a = model.adapter
    assert set(a.quantized) == _bnb_replaced(model)
    assert a.transposed == transposed_parameters(model.hf)
    for cfg in (QuantConfig("nf4"), QuantConfig("int8"), QuantConfig("nf4", include_embeddings=True),
                QuantConfig("nf4", include_lm_head=True)):
        assert a.quantizable(cfg) == quantizable_parameters(model.hf, cfg), cfg


# --- (e) refused families, and local directories ---------------------------------------------------


def _refused(hf: torch.nn.Module, match: str) -> None:
    model = LoadedModel(name="tiny", hf=hf, tokenizer=None)
    with pytest.raises(WorkbenchError, match=match):
        model.architecture  # noqa: B018
    with pytest.raises(WorkbenchError, match=match):
        model.adapter  # noqa: B018


def test_mixture_of_experts_is_refused():
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    _refused(MixtralForCausalLM(MixtralConfig(**small, num_local_experts=2, num_experts_per_tok=1)),
             "mixture-of-experts.*router over experts")
    _refused(Qwen2MoeForCausalLM(Qwen2MoeConfig(**small, num_experts=2, num_experts_per_tok=1,
                                                moe_intermediate_size=16)), "mixture-of-experts")


def test_encoder_decoder_and_state_space_are_refused():
    from transformers import MambaConfig, MambaForCausalLM, T5Config, T5ForConditionalGeneration

    _refused(T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                 d_kv=8)), "encoder–decoder")
    _refused(MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1)),
             "state-space.*no attention heads")


def test_unknown_family_names_the_supported_ones():
    from transformers import GPTJConfig, GPTJForCausalLM

    hf = GPTJForCausalLM(GPTJConfig(vocab_size=64, n_embd=16, n_layer=1, n_head=2, rotary_dim=4, n_positions=32))
    _refused(hf, "'gptj'.*Qwen2.*OLMo-2")


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_local_directory_of_a_new_family(tmp_path, family):
    model = tiny(family)
    path = tmp_path / family
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    loaded = load_model(str(path))
    assert loaded.architecture == model.architecture and loaded.n_kv_heads == 2
    assert loaded.fingerprint == model.fingerprint
    assert loaded.adapter.quantized == model.adapter.quantized
    with torch.no_grad():
        torch.testing.assert_close(loaded.hf(IDS).logits, model.hf(IDS).logits)
    pairs = make_prompt_pairs(loaded, _toy_facts())
    att = attribute(loaded, pairs, AttributionConfig(edges=True, batch_size=8), progress=SILENT)
    assert att.edge_scores


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_on_a_local_directory_with_user_fact_files(family, tmp_path, capsys):
    """The issue's acceptance path: ``workbench attribute --edges`` and ``unlearn --method
    mansu|graddiff`` on a local directory of each family with the user's own fact files."""
    model = tiny(family)
    path = tmp_path / family
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    split = own_top1_split(model, n_prompts=60, n_forget=10, name=f"toy-{model.architecture}")
    forget = save_fact_file(split.forget, tmp_path / "forget.jsonl")
    retain = save_fact_file(split.retain, tmp_path / "retain.jsonl")
    common = ["--model", str(path), "--forget", str(forget)]
    assert main(["attribute", *common, "--edges", "--top-k", "4", "--out", str(tmp_path / "c.json")]) == 0
    assert (tmp_path / "c.json").exists()
    for method in ("mansu", "graddiff"):
        code = main(["unlearn", *common, "--retain", str(retain), "--method", method, "--max-rounds", "2",
                     "--max-steps", "2", "--lr", "1e-3", "--runs-root", str(tmp_path / "runs")])
        assert code == 0, method
    assert "run saved" in capsys.readouterr().out
    assert len(list((tmp_path / "runs").iterdir())) == 2


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_the_app_session_and_the_widget_take_a_local_directory(family, tmp_path):
    """The issue's acceptance path in the two faces: the app's “Load model and data” (a Session,
    with the directory under an operator's --models-dir root) and the notebook widget."""
    from workbench.faces.session import SHARED, Session
    from workbench.faces.widgets import Workbench
    from workbench.models.loading import ModelRoots

    model = tiny(family)
    path = tmp_path / "models" / family
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    split = own_top1_split(model, n_prompts=60, n_forget=10, name=f"toy-{model.architecture}")
    forget = save_fact_file(split.forget, tmp_path / "forget.jsonl")
    retain = save_fact_file(split.retain, tmp_path / "retain.jsonl")

    previous = SHARED.roots
    SHARED.restrict(ModelRoots.of([str(tmp_path / "models")]))
    try:
        s = Session(runs_root=tmp_path / "runs")
        result = s.setup(str(path), forget_file=str(forget), retain_file=str(retain))
        assert s.model is not None and s.model.architecture == family and result.summary
        attribution = s.attribute(edges=True)
        assert attribution.edge_scores and s.circuit is not None and s.circuit.selected
    finally:
        SHARED.roots = previous

    w = Workbench(str(path), forget=forget, retain=retain, runs_root=tmp_path / "widget-runs",
                        measure_cad=False)
    assert w.model is not None and w.model.architecture == family and w.split is not None
    w.run_attribution()
    assert w.circuit is not None and w.circuit.selected
