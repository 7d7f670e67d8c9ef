"""Circuit graph, selection, files, faithfulness and the circuit -> parameter masks."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import networkx as nx
import pytest
import torch

from workbench.core.components import EMBED, LOGITS, Component, head, mlp
from workbench.core.errors import WorkbenchError
from workbench.interpretability.attribution import Attribution
from workbench.interpretability.circuit import SCHEMA_VERSION, Circuit, CircuitDiff
from workbench.interpretability.faithfulness import Faithfulness, faithfulness
from workbench.interpretability.parameters import _component_slices, circuit_parameters, parameter_slices
from workbench.models.toy import toy_model

# --- a hand-made attribution --------------------------------------------------------------

SCORES = {
    EMBED: 2.0,
    head(0, 0): 0.5,
    head(0, 1): -1.5,
    mlp(0): 0.25,
    head(1, 0): 1.0,
    head(1, 1): -0.05,
    mlp(1): -3.0,
}


def make_attribution(scores: dict[Component, float] | None = None, fingerprint: str = "abc123") -> Attribution:
    return Attribution(
        scores=dict(scores or SCORES),
        method="ig",
        metric="logit_diff",
        n_pairs=8,
        prompts_hash="f00dfeed",
        model_fingerprint=fingerprint,
        clean_metric=3.5,
        corrupt_metric=-0.5,
        n_layers=2,
        n_heads=2,
        ig_steps=16,
        edge_scores={
            (EMBED, head(0, 0), "q"): 0.3,
            (EMBED, head(0, 0), "k"): -0.2,
            (head(0, 1), mlp(0), "mlp"): 0.7,
            (mlp(0), head(1, 0), "v"): 0.1,
            (head(1, 0), LOGITS, "logits"): 0.9,
            (mlp(1), LOGITS, "logits"): -2.0,
        },
    )


@pytest.fixture
def circuit() -> Circuit:
    return Circuit.from_attribution(make_attribution())


# --- construction and selection -----------------------------------------------------------


def test_from_attribution_builds_all_nodes_unselected(circuit):
    assert isinstance(circuit.graph, nx.DiGraph)
    assert set(circuit.components) == set(SCORES)
    assert circuit.components[0] == EMBED and circuit.components[-1] == mlp(1)  # forward order
    assert circuit.selected == set()
    assert circuit.scores == SCORES
    assert LOGITS.name in circuit.graph and LOGITS not in circuit.components
    node = circuit.graph.nodes["L0.H1"]
    assert node == {"kind": "head", "layer": 0, "head": 1, "score": -1.5, "selected": False}
    # q and k edges between the same pair are kept apart (multigraph keyed by input).
    assert circuit.graph.number_of_edges("embed", "L0.H0") == 2
    assert circuit.edge_scores[(EMBED, head(0, 0), "k")] == -0.2
    meta = circuit.metadata
    assert meta["schema_version"] == SCHEMA_VERSION and meta["method"] == "ig" and meta["ig_steps"] == 16
    assert (meta["n_layers"], meta["n_heads"], meta["prompts_hash"]) == (2, 2, "f00dfeed")


def test_from_attribution_rejects_components_beyond_shape():
    bad = make_attribution({**SCORES, head(1, 5): 1.0})
    with pytest.raises(WorkbenchError, match="L1.H5"):
        Circuit.from_attribution(bad)


def _graph_edge_by_edge(attribution: Attribution) -> nx.MultiDiGraph:
    """``Circuit.from_attribution``'s graph as it was built before it named each component once:
    every edge checks and adds its two ends, then itself."""
    from workbench.interpretability.circuit import _node_attrs, component_order

    graph = nx.MultiDiGraph()
    for comp, score in sorted(attribution.scores.items(), key=lambda kv: component_order(kv[0])):
        if comp != LOGITS:
            graph.add_node(comp.name, **_node_attrs(comp, float(score), False))
    graph.add_node(LOGITS.name, **_node_attrs(LOGITS, 0.0, True))
    for (writer, reader, inp), score in attribution.edge_scores.items():
        for comp in (writer, reader):
            if comp.name not in graph:
                graph.add_node(comp.name, **_node_attrs(comp, 0.0, comp == LOGITS))
        graph.add_edge(writer.name, reader.name, key=inp, score=float(score), input=inp)
    return graph


def test_from_attribution_graph_equals_the_edge_by_edge_construction():
    """Same nodes, edges, attributes and insertion order, including components that only an edge
    names (a writer without a node score gets score 0) and repeated (writer, reader) pairs."""
    attribution = make_attribution()
    edges = {**attribution.edge_scores, (mlp(1), head(1, 1), "q"): 0.4, (head(0, 1), mlp(0), "logits"): -0.6}
    scores = {c: s for c, s in attribution.scores.items() if c != head(1, 1)}  # head(1, 1) only in an edge
    attribution = replace(attribution, scores=scores, edge_scores=edges)
    got, want = Circuit.from_attribution(attribution).graph, _graph_edge_by_edge(attribution)
    assert list(got.nodes(data=True)) == list(want.nodes(data=True))
    assert list(got.edges(keys=True, data=True)) == list(want.edges(keys=True, data=True))
    assert got.nodes["L1.H1"]["score"] == 0.0


def test_from_attribution_rejects_edge_components_beyond_shape():
    bad = replace(make_attribution(), edge_scores={(head(0, 0), mlp(7), "mlp"): 1.0})
    with pytest.raises(WorkbenchError, match="attribution edge: .*L7.MLP"):
        Circuit.from_attribution(bad)


def test_top_k_threshold_and_mass(circuit):
    assert circuit.select_top_k(3).selected == {mlp(1), EMBED, head(0, 1)}
    assert circuit.select_top_k(2, include_embed=False).selected == {mlp(1), head(0, 1)}
    assert circuit.select_top_k(0).selected == set()
    assert circuit.select_top_k(100).selected == set(SCORES)
    assert circuit.select_threshold(1.0).selected == {mlp(1), EMBED, head(0, 1), head(1, 0)}
    assert circuit.select_threshold(1.0 + 1e-9).selected == {mlp(1), EMBED, head(0, 1)}
    # total |score| = 8.3: 3.0 -> 36 %, +2.0 -> 60 %, +1.5 -> 78 %, +1.0 -> 90 %
    assert circuit.select_mass(0.5).selected == {mlp(1), EMBED}
    assert circuit.select_mass(5.0 / 8.3).selected == {mlp(1), EMBED}  # exactly reaching counts
    assert circuit.select_mass(0.61).selected == {mlp(1), EMBED, head(0, 1)}
    assert circuit.select_mass(0.0).selected == set()
    assert circuit.select_mass(1.0).selected == set(SCORES)
    for bad in (lambda: circuit.select_top_k(-1), lambda: circuit.select_mass(1.5),
                lambda: circuit.select_threshold(float("nan")), lambda: circuit.select_top_k(2.5)):
        with pytest.raises(WorkbenchError):
            bad()


def test_manual_edits_undo_redo(circuit):
    assert not circuit.can_undo and not circuit.redo()
    circuit.select_top_k(2)                      # step 1: {L1.MLP, embed}
    circuit.include("L0.H0", head(1, 1))         # step 2
    circuit.exclude(EMBED)                       # step 3
    circuit.exclude(EMBED)                       # no change -> no step
    assert circuit.selected == {mlp(1), head(0, 0), head(1, 1)}
    assert circuit.undo() and circuit.selected == {mlp(1), EMBED, head(0, 0), head(1, 1)}
    assert circuit.undo() and circuit.selected == {mlp(1), EMBED}
    assert circuit.redo() and circuit.selected == {mlp(1), EMBED, head(0, 0), head(1, 1)}
    circuit.toggle("L1.MLP")                     # a new step clears the redo tail
    assert not circuit.can_redo
    assert circuit.selected == {EMBED, head(0, 0), head(1, 1)}
    assert circuit.undo() and circuit.undo() and circuit.undo()
    assert circuit.selected == set() and not circuit.undo()
    # graph attributes follow the selection
    circuit.set_selection([head(0, 1)])
    assert circuit.graph.nodes["L0.H1"]["selected"] and not circuit.graph.nodes["L0.H0"]["selected"]
    with pytest.raises(WorkbenchError, match="L7.H0"):
        circuit.include("L7.H0")
    with pytest.raises(WorkbenchError, match="not a component name"):
        circuit.include("attention")
    with pytest.raises(WorkbenchError, match="sink"):
        circuit.include("logits")


def test_selected_edges_need_both_ends(circuit):
    circuit.set_selection([EMBED, head(1, 0), mlp(1)])
    assert set(circuit.selected_edges) == {
        (head(1, 0), LOGITS, "logits"),
        (mlp(1), LOGITS, "logits"),
    }
    circuit.include(head(0, 0))
    assert (EMBED, head(0, 0), "q") in circuit.selected_edges
    assert (mlp(0), head(1, 0), "v") not in circuit.selected_edges


@pytest.mark.parametrize("n", [0, 1, 3, 6, 10])
def test_strongest_edges_are_the_sorted_edges_with_their_selection(circuit, n):
    """The redraw's edges read without parsing every edge: the same edges, order and selection
    as sorting all :attr:`edge_scores` and looking each up in :attr:`selected_edges`."""
    circuit.set_selection([EMBED, head(0, 0), head(1, 0), mlp(1)])
    ranked = sorted(circuit.edge_scores.items(), key=lambda kv: -abs(kv[1]))[:n]
    expected = [(key, value, key in circuit.selected_edges) for key, value in ranked]
    assert circuit.strongest_edges(n) == expected
    if n >= 3:  # MLP1→logits and L1.H0→logits selected, L0.H1→MLP0 not (L0.H1 is out)
        assert [flag for _, _, flag in circuit.strongest_edges(n)][:3] == [True, True, False]


def test_strongest_edges_keep_the_graph_order_among_ties():
    tied = {(EMBED, head(0, 0), "q"): 0.5, (EMBED, head(0, 0), "k"): -0.5, (head(0, 1), mlp(0), "mlp"): 0.5,
            (mlp(1), LOGITS, "logits"): 0.25}
    circuit = Circuit.from_attribution(replace(make_attribution(), edge_scores=tied))
    assert [key for key, _, _ in circuit.strongest_edges(3)] == list(tied)[:3]


def test_diff():
    before = Circuit.from_attribution(make_attribution()).set_selection([EMBED, mlp(1), head(0, 1)])
    after_scores = {**SCORES, head(0, 1): -0.1, mlp(1): -3.0, head(1, 0): 2.5}
    after = Circuit.from_attribution(make_attribution(after_scores)).set_selection([EMBED, mlp(1), head(1, 0)])
    d = before.diff(after)
    assert isinstance(d, CircuitDiff)
    assert d.added == {head(1, 0)} and d.removed == {head(0, 1)} and d.common == {EMBED, mlp(1)}
    assert d.score_changes == {head(0, 1): (-1.5, -0.1), head(1, 0): (1.0, 2.5)}
    assert d.score_delta()[head(1, 0)] == pytest.approx(1.5)
    assert not d.unchanged and before.diff(before).unchanged


# --- files --------------------------------------------------------------------------------


def test_json_round_trip(circuit, tmp_path):
    circuit.select_threshold(1.0)
    path = circuit.save(tmp_path / "sub" / "c.json")
    assert [p.name for p in path.parent.iterdir()] == ["c.json"]  # no temp file left behind
    loaded = Circuit.load(path)
    assert loaded.metadata == circuit.metadata
    assert loaded.scores == circuit.scores
    assert loaded.edge_scores == circuit.edge_scores
    assert loaded.selected == circuit.selected
    assert dict(loaded.graph.nodes(data=True)) == dict(circuit.graph.nodes(data=True))
    assert not loaded.can_undo  # history is session state
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION and doc["model_fingerprint"] == "abc123"
    assert {n["name"] for n in doc["nodes"] if n["selected"]} == {"embed", "L0.H1", "L1.H0", "L1.MLP"}


def test_graphml_export(circuit, tmp_path):
    circuit.select_top_k(3)
    path = circuit.export_graphml(tmp_path / "c.graphml")
    g = nx.read_graphml(path)
    assert set(g.nodes) == set(circuit.graph.nodes)
    assert g.number_of_edges() == circuit.graph.number_of_edges()
    assert g.nodes["L1.MLP"]["score"] == -3.0 and g.nodes["L1.MLP"]["selected"] is True
    assert g.nodes["L0.H1"]["layer"] == 0 and g.nodes["L0.H1"]["head"] == 1
    assert "layer" not in g.nodes["embed"]
    assert g.graph["model_fingerprint"] == "abc123" and g.graph["ig_steps"] == 16


def _write(tmp_path, doc, name="c.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("nodes"), "missing field 'nodes'"),
        (lambda d: d.pop("model_fingerprint"), "missing field 'model_fingerprint'"),
        (lambda d: d.pop("schema_version"), "missing field 'schema_version'"),
        (lambda d: d.update(schema_version=99), "unknown schema_version 99"),
        (lambda d: d.update(n_layers="two"), "'n_layers' must be a whole number"),
        (lambda d: d["nodes"][0].pop("score"), r"nodes\[0\]: missing field 'score'"),
        (lambda d: d["nodes"][1].update(name="L0.X"), r"nodes\[1\].name: not a component name"),
        (lambda d: d["nodes"][1].update(name="L5.H0", layer=5), r"nodes\[1\].*L5.H0"),
        (lambda d: d["nodes"][1].update(score="high"), "must be a finite number"),
        (lambda d: d["nodes"][1].update(selected="yes"), "true or false"),
        (lambda d: d["nodes"].append(dict(d["nodes"][1])), "duplicate node"),
        (lambda d: d["edges"][0].update(input="z"), r"edges\[0\].input"),
        (lambda d: d["edges"][0].update(target="L1.H9"), r"edges\[0\].target"),
    ],
)
def test_bad_files_raise_workbench_error(circuit, tmp_path, mutate, message):
    doc = circuit.to_dict()
    mutate(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(WorkbenchError, match=message) as info:
        Circuit.load(path)
    assert str(path) in str(info.value)


def test_malformed_json_and_missing_file(tmp_path):
    path = _write(tmp_path, '{"schema_version": 1, "nodes": [')
    with pytest.raises(WorkbenchError, match=r"c.json: not valid JSON \(line 1"):
        Circuit.load(path)
    with pytest.raises(WorkbenchError, match="top level"):
        Circuit.load(_write(tmp_path, "[1, 2]", "list.json"))
    with pytest.raises(WorkbenchError, match="no such circuit file"):
        Circuit.load(tmp_path / "absent.json")


@pytest.fixture(scope="module")
def toy2():
    return toy_model("gpt2", n_layers=2, d_model=32, n_heads=2)


def test_load_against_model(tmp_path, toy2):
    ok = Circuit.from_attribution(make_attribution(fingerprint=toy2.fingerprint)).select_top_k(2)
    loaded = Circuit.load(ok.save(tmp_path / "ok.json"), model=toy2)
    assert loaded.selected == ok.selected

    wrong = Circuit.from_attribution(make_attribution(fingerprint="0123456789abcdef"))
    path = wrong.save(tmp_path / "wrong.json")
    with pytest.raises(WorkbenchError, match="different model.*0123456789abcdef") as info:
        Circuit.load(path, model=toy2)
    assert "wrong.json" in str(info.value)

    # A circuit for a wider model names heads toy2 (2 heads) lacks.
    wide = make_attribution({**SCORES, head(1, 3): 0.5}, fingerprint=toy2.fingerprint)
    wide.n_heads = 4
    path = Circuit.from_attribution(wide).save(tmp_path / "wide.json")
    with pytest.raises(WorkbenchError, match=r"wide.json.*L1.H3.*only 2 heads"):
        Circuit.load(path, model=toy2)


# --- circuit -> parameter masks -------------------------------------------------------------

ARCHS = {
    "gpt2": dict(architecture="gpt2"),
    "gpt_neox": dict(architecture="gpt_neox"),
    "llama_gqa": dict(architecture="llama", n_kv_heads=2),
}
LAYER, HEAD = 1, 2  # with 4 heads and 2 kv heads, kv head 1 serves query heads 2 and 3
TOKENS = torch.tensor([[3, 5, 7, 9, 11, 13, 17, 19], [4, 8, 15, 16, 23, 42, 50, 60]])
OUT_PROJ = {"gpt2": "attn.c_proj", "gpt_neox": "attention.dense", "llama": "self_attn.o_proj"}
MLP_OUT = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h", "llama": "mlp.down_proj"}
LAYER_PREFIX = {"gpt2": "transformer.h.", "gpt_neox": "gpt_neox.layers.", "llama": "model.layers."}


@pytest.fixture(scope="module", params=list(ARCHS))
def toy(request):
    return toy_model(n_layers=2, d_model=64, n_heads=4, **ARCHS[request.param])


def _noise_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)) * 0.5


def _perturbed(model, masks: dict[str, torch.Tensor], seed: int = 1):
    """A new model whose entries under ``masks`` get random noise (nothing else changes)."""
    state = model.state()
    new = {name: state[name] + _noise_like(state[name], seed + i) * m for i, (name, m) in enumerate(masks.items())}
    return model.with_state(new, f"{model.name}+noise")


def _attn_params(model, layer: int, *, out_proj: bool) -> list[str]:
    prefix = f"{LAYER_PREFIX[model.architecture]}{layer}."
    o = OUT_PROJ[model.architecture]
    names = [n for n, _ in model.hf.named_parameters()
             if n.startswith(prefix) and any(a in n for a in (".attn.", ".attention.", ".self_attn."))]
    return [n for n in names if (o in n) == out_proj]


def _run(model, hooks=()) -> dict[str, torch.Tensor]:
    """Cache q/k/v/z/attn_out of every layer from the bridge, with optional extra hooks."""
    cache: dict[str, torch.Tensor] = {}

    def keep(key):
        def fn(t, hook):
            cache[key] = t.detach().clone()
        return fn

    names = []
    for layer in range(model.n_layers):
        for short in ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "hook_attn_out", "hook_mlp_out"):
            names.append((f"blocks.{layer}.{short}", keep(f"{layer}.{short}")))
    with torch.no_grad():
        cache["logits"] = model.bridge().run_with_hooks(TOKENS, fwd_hooks=[*hooks, *names]).detach()
    return cache


def _changed_heads(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    diff = (a - b).abs().amax(dim=(0, 1, 3))
    return {int(i) for i in torch.nonzero(diff > 1e-5).flatten()}


def _kv_group(model, h: int) -> set[int]:
    g = model.n_heads // model.n_kv_heads
    return set(range((h // g) * g, (h // g + 1) * g))


def test_head_mask_sizes(toy):
    masks = circuit_parameters(toy, [head(LAYER, HEAD)])
    d, dh = toy.d_model, toy.d_head
    counts = {name.split(f".{LAYER}.")[1]: int(m.sum()) for name, m in masks.items()}
    expected = {
        "gpt2": {"attn.c_attn.weight": 3 * d * dh, "attn.c_attn.bias": 3 * dh, "attn.c_proj.weight": dh * d},
        "gpt_neox": {"attention.query_key_value.weight": 3 * d * dh, "attention.query_key_value.bias": 3 * dh,
                     "attention.dense.weight": dh * d},
        "llama": {f"self_attn.{p}_proj.weight": d * dh for p in "qkvo"},
    }[toy.architecture]
    assert counts == expected
    for name, m in masks.items():
        assert m.dtype == torch.bool and m.shape == dict(toy.hf.named_parameters())[name].shape
    both = circuit_parameters(toy, [head(LAYER, HEAD), head(LAYER, 0), mlp(0)])
    union = circuit_parameters(toy, [head(LAYER, 0)])
    for name, m in masks.items():
        assert torch.equal(both[name], m | union.get(name, torch.zeros_like(m)))
    with_bias = circuit_parameters(toy, [head(LAYER, HEAD)], include_shared_bias=True)
    if toy.architecture != "llama":
        o_bias = f"{LAYER_PREFIX[toy.architecture]}{LAYER}.{OUT_PROJ[toy.architecture]}.bias"
        assert set(with_bias) - set(masks) == {o_bias}


def test_head_qkv_slices_move_only_that_head(toy):
    base = _run(toy)
    masks = circuit_parameters(toy, [head(LAYER, HEAD)])
    in_names = set(_attn_params(toy, LAYER, out_proj=False))
    after = _run(_perturbed(toy, {n: m for n, m in masks.items() if n in in_names}))
    group = _kv_group(toy, HEAD)
    assert _changed_heads(base[f"{LAYER - 1}.attn.hook_z"], after[f"{LAYER - 1}.attn.hook_z"]) == set()
    assert _changed_heads(base[f"{LAYER}.attn.hook_q"], after[f"{LAYER}.attn.hook_q"]) == {HEAD}
    kv = {HEAD // (toy.n_heads // toy.n_kv_heads)}
    assert _changed_heads(base[f"{LAYER}.attn.hook_k"], after[f"{LAYER}.attn.hook_k"]) == kv
    assert _changed_heads(base[f"{LAYER}.attn.hook_v"], after[f"{LAYER}.attn.hook_v"]) == kv
    # Under GQA the shared K/V head moves its whole group of query heads.
    assert _changed_heads(base[f"{LAYER}.attn.hook_z"], after[f"{LAYER}.attn.hook_z"]) == group


def test_head_slices_are_complete(toy):
    """Noise everywhere in the layer's Q/K/V *outside* the head's mask leaves the head alone."""
    base = _run(toy)
    masks = circuit_parameters(toy, [head(LAYER, HEAD)])
    params = dict(toy.hf.named_parameters())
    outside = {}
    for name in _attn_params(toy, LAYER, out_proj=False):
        m = masks.get(name, torch.zeros(params[name].shape, dtype=torch.bool))
        outside[name] = ~m
    after = _run(_perturbed(toy, outside, seed=7))
    changed = _changed_heads(base[f"{LAYER}.attn.hook_z"], after[f"{LAYER}.attn.hook_z"])
    # Every other head moves (under GQA its group partners through their own queries).
    assert changed == set(range(toy.n_heads)) - {HEAD}


def test_head_q_k_v_descriptions_match_the_hooks(toy):
    """Each slice labelled query/key/value moves exactly that hook of the head."""
    base = _run(toy)
    params = dict(toy.hf.named_parameters())
    for part, hook in (("query", "hook_q"), ("key", "hook_k"), ("value", "hook_v")):
        masks: dict[str, torch.Tensor] = {}
        for sl in _component_slices(toy, head(LAYER, HEAD)):
            if sl.description.split("] ", 1)[1].startswith(part):
                masks.setdefault(sl.param, torch.zeros(params[sl.param].shape, dtype=torch.bool))[sl.index] = True
        after = _run(_perturbed(toy, masks, seed=3))
        for other in ("hook_q", "hook_k", "hook_v"):
            moved = _changed_heads(base[f"{LAYER}.attn.{other}"], after[f"{LAYER}.attn.{other}"])
            assert bool(moved) == (other == hook), (part, other, moved)


def _zero_heads(heads: set[int]):
    def fn(z, hook):
        z = z.clone()
        z[:, :, sorted(heads)] = 0.0
        return z
    return (f"blocks.{LAYER}.attn.hook_z", fn)


def test_head_output_slice_acts_only_through_its_z(toy):
    masks = circuit_parameters(toy, [head(LAYER, HEAD)])
    o_names = set(_attn_params(toy, LAYER, out_proj=True))
    o_masks = {n: m for n, m in masks.items() if n in o_names}
    assert len(o_masks) == 1
    perturbed = _perturbed(toy, o_masks, seed=5)
    base, after = _run(toy), _run(perturbed)
    assert not torch.allclose(base[f"{LAYER}.hook_attn_out"], after[f"{LAYER}.hook_attn_out"], atol=1e-5)
    # With head h's z zeroed the perturbed O slice has nothing to act on.
    base0, after0 = _run(toy, [_zero_heads({HEAD})]), _run(perturbed, [_zero_heads({HEAD})])
    torch.testing.assert_close(after0[f"{LAYER}.hook_attn_out"], base0[f"{LAYER}.hook_attn_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(after0["logits"], base0["logits"], atol=1e-5, rtol=0)
    # And the rest of O never reads head h: perturb outside the slice, keep only head h's z.
    name, mask = next(iter(o_masks.items()))
    rest = _perturbed(toy, {name: ~mask}, seed=6)
    others = set(range(toy.n_heads)) - {HEAD}
    torch.testing.assert_close(
        _run(rest, [_zero_heads(others)])[f"{LAYER}.hook_attn_out"],
        _run(toy, [_zero_heads(others)])[f"{LAYER}.hook_attn_out"],
        atol=1e-5,
        rtol=0,
    )


def test_gqa_shared_kv_assignment():
    model = toy_model("llama", n_layers=1, d_model=64, n_heads=4, n_kv_heads=2)
    k = "model.layers.0.self_attn.k_proj.weight"
    m2 = circuit_parameters(model, [head(0, 2)])[k]
    m3 = circuit_parameters(model, [head(0, 3)])[k]
    m0 = circuit_parameters(model, [head(0, 0)])[k]
    assert torch.equal(m2, m3) and not (m0 & m2).any()
    assert torch.equal(m2.nonzero()[:, 0].unique(), torch.arange(16, 32))
    text = dict(parameter_slices(model, "L0.H3"))
    assert "kv head 1, shared by query heads 2–3" in text[k]


def test_mlp_masks_cover_the_whole_mlp(toy):
    masks = circuit_parameters(toy, [mlp(LAYER)])
    prefix = f"{LAYER_PREFIX[toy.architecture]}{LAYER}.mlp."
    expected = {n for n, _ in toy.hf.named_parameters() if n.startswith(prefix)}
    assert set(masks) == expected and all(bool(m.all()) for m in masks.values())
    base, after = _run(toy), _run(_perturbed(toy, masks))
    assert _changed_heads(base[f"{LAYER}.attn.hook_z"], after[f"{LAYER}.attn.hook_z"]) == set()
    assert not torch.allclose(base[f"{LAYER}.hook_mlp_out"], after[f"{LAYER}.hook_mlp_out"], atol=1e-5)


def _mlp_acts(model, zero: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations entering the MLP output projection, the MLP output) at LAYER, via HF hooks."""
    module = model.hf.get_submodule(f"{LAYER_PREFIX[model.architecture]}{LAYER}.{MLP_OUT[model.architecture]}")
    seen: dict[str, torch.Tensor] = {}

    def pre(mod, args):
        x = args[0].clone()
        if zero:
            x[..., zero] = 0.0
        seen["acts"] = x
        return (x,)

    def post(mod, args, out):
        seen["out"] = out.detach().clone()

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model.hf(TOKENS)
    finally:
        for h in handles:
            h.remove()
    return seen["acts"], seen["out"]


def test_neuron_masks(toy):
    neurons = [3, 17, 200]
    masks = circuit_parameters(toy, [mlp(LAYER)], neurons={LAYER: neurons})
    out_name = f"{LAYER_PREFIX[toy.architecture]}{LAYER}.{MLP_OUT[toy.architecture]}.weight"
    in_masks = {n: m for n, m in masks.items() if n != out_name}
    assert out_name in masks and not any(n.endswith(f"{MLP_OUT[toy.architecture]}.bias") for n in masks)
    d = toy.d_model
    assert int(masks[out_name].sum()) == len(neurons) * d
    # Input side: only those neurons' activations move.
    base_acts, _ = _mlp_acts(toy)
    acts, _ = _mlp_acts(_perturbed(toy, in_masks))
    moved = torch.nonzero((acts - base_acts).abs().amax(dim=(0, 1)) > 1e-5).flatten().tolist()
    assert moved == neurons
    # ... and nothing outside the mask moves them.
    params = dict(toy.hf.named_parameters())
    prefix = f"{LAYER_PREFIX[toy.architecture]}{LAYER}.mlp."
    outside = {n: ~masks.get(n, torch.zeros(p.shape, dtype=torch.bool)) for n, p in params.items()
               if n.startswith(prefix) and not n.startswith(prefix + MLP_OUT[toy.architecture].split(".")[1])}
    acts, _ = _mlp_acts(_perturbed(toy, outside, seed=9))
    assert torch.allclose(acts[..., neurons], base_acts[..., neurons], atol=1e-6)
    assert not torch.allclose(acts, base_acts, atol=1e-5)
    # Output side: with those neurons silenced the perturbed columns/rows do nothing.
    perturbed = _perturbed(toy, {out_name: masks[out_name]}, seed=11)
    _, out0 = _mlp_acts(toy, zero=neurons)
    _, out1 = _mlp_acts(perturbed, zero=neurons)
    torch.testing.assert_close(out1, out0, atol=1e-5, rtol=0)
    _, out2 = _mlp_acts(perturbed)
    assert not torch.allclose(out2, _mlp_acts(toy)[1], atol=1e-5)


def test_embed_and_validation(toy):
    assert circuit_parameters(toy, [EMBED]) == {}
    emb = circuit_parameters(toy, [EMBED, LOGITS], include_embed=True)
    assert emb and all(bool(m.all()) for m in emb.values())
    assert all("emb" in n or "wte" in n or "wpe" in n for n in emb)
    with pytest.raises(WorkbenchError, match="L5.MLP"):
        circuit_parameters(toy, [mlp(5)])
    with pytest.raises(WorkbenchError, match="L1.H9"):
        circuit_parameters(toy, ["L1.H9"])
    with pytest.raises(WorkbenchError, match="not a component name"):
        circuit_parameters(toy, ["head 3"])
    with pytest.raises(WorkbenchError, match="L0.MLP is not among"):
        circuit_parameters(toy, [mlp(1)], neurons={0: [1]})
    with pytest.raises(WorkbenchError, match="out of range"):
        circuit_parameters(toy, [mlp(1)], neurons={1: [10_000]})
    text = parameter_slices(toy, "L1.H2")
    assert text and all(isinstance(p, str) and isinstance(s, str) for p, s in text)
    assert any("query" in s for _, s in text) and any("z" in s for _, s in text)
    assert not any("norm" in p or "ln_" in p for p, _ in text)


# --- faithfulness -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_faithfulness_full_and_empty(arch):
    from workbench.core.components import all_components
    from workbench.interpretability.attribution import PromptPairs

    model = toy_model(n_layers=2, d_model=32, n_heads=4, **ARCHS[arch])
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 100, (6, 7), generator=gen)
    corrupt = clean.clone()
    corrupt[:, -3:] = torch.randint(3, 100, (6, 3), generator=gen)
    pairs = PromptPairs.from_ids(clean, corrupt, torch.randint(3, 100, (6,), generator=gen),
                                 torch.randint(3, 100, (6,), generator=gen))
    scores = dict.fromkeys(all_components(model.n_layers, model.n_heads), 1.0)
    attr = Attribution(scores=scores, method="atp", metric="logit_diff", n_pairs=6, prompts_hash=pairs.prompts_hash,
                       model_fingerprint=model.fingerprint, clean_metric=0.0, corrupt_metric=0.0,
                       n_layers=model.n_layers, n_heads=model.n_heads)
    circuit = Circuit.from_attribution(attr)
    full = faithfulness(circuit.select_top_k(len(scores)), model, pairs)
    assert isinstance(full, Faithfulness) and full.n_components == len(scores)
    assert abs(full.clean_metric - full.corrupt_metric) > 0.01, (full.clean_metric, full.corrupt_metric)
    assert full.recovered == pytest.approx(1.0, abs=1e-4)
    assert full.drop == pytest.approx(1.0, abs=1e-4)
    empty = faithfulness(circuit.clear_selection(), model, pairs)
    assert empty.recovered == pytest.approx(0.0, abs=1e-4)
    assert empty.drop == pytest.approx(0.0, abs=1e-4)
    # A partial circuit lands in between in the sense that its two numbers are finite and
    # computed from the same baselines; mean ablation also runs.
    part = faithfulness(circuit.set_selection([EMBED, mlp(1)]), model, pairs, ablation="mean")
    assert math.isfinite(part.recovered) and math.isfinite(part.drop)
    assert part.clean_metric == pytest.approx(full.clean_metric)


def test_faithfulness_equal_metrics_is_a_clear_error(monkeypatch, toy2):
    import workbench.interpretability.faithfulness as attribution  # the names faithfulness() calls

    monkeypatch.setattr(attribution, "metric_baselines", lambda model, pairs, **kw: (1.25, 1.25), raising=False)
    monkeypatch.setattr(attribution, "ablated_metric", lambda *a, **k: 1.25, raising=False)
    monkeypatch.setattr(attribution, "corrupt_activations", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(attribution, "make_prompt_pairs", lambda model, facts: facts, raising=False)

    class FakePairs:  # what faithfulness reads of PromptPairs
        has_mean = False
        metric = "logit_diff"

    monkeypatch.setattr(attribution, "PromptPairs", FakePairs, raising=False)
    circuit = Circuit.from_attribution(make_attribution(fingerprint=toy2.fingerprint))
    with pytest.raises(WorkbenchError, match="clean metric .* equals the corrupt metric"):
        faithfulness(circuit, toy2, pairs=FakePairs())
    other = Circuit.from_attribution(make_attribution(fingerprint="feedfeedfeedfeed"))
    with pytest.raises(WorkbenchError, match="fingerprint"):
        faithfulness(other, toy2, pairs=FakePairs())


def test_faithfulness_arithmetic(monkeypatch, toy2):
    """recovered/drop follow the definitions (embed always kept, scale from the floor = every
    head and MLP ablated), whatever ablated_metric returns."""
    import workbench.interpretability.faithfulness as attribution  # the names faithfulness() calls

    calls = []

    def fake_ablated(model, pairs, keep, ablation="corrupt", **kwargs):
        calls.append((frozenset(keep), ablation))
        if keep == {EMBED}:
            return 0.5  # the floor
        return 3.0 if head(0, 1) in keep and len(keep) <= 3 else 1.0

    class FakePairs:  # what faithfulness reads of PromptPairs
        has_mean = False
        metric = "logit_diff"

    monkeypatch.setattr(attribution, "PromptPairs", FakePairs, raising=False)
    monkeypatch.setattr(attribution, "metric_baselines", lambda model, pairs, **kw: (4.0, 0.0), raising=False)
    monkeypatch.setattr(attribution, "ablated_metric", fake_ablated, raising=False)
    monkeypatch.setattr(attribution, "corrupt_activations", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(attribution, "dataset_means", lambda model, pairs: None, raising=False)
    circuit = Circuit.from_attribution(make_attribution(fingerprint=toy2.fingerprint))
    circuit.set_selection([head(0, 1), mlp(1)])
    f = faithfulness(circuit, toy2, pairs=FakePairs(), ablation="mean")
    assert f.floor_metric == 0.5
    assert f.recovered == pytest.approx((3.0 - 0.5) / 3.5) and f.drop == pytest.approx((4.0 - 1.0) / 3.5)
    assert calls[0] == (frozenset({EMBED}), "mean")
    assert calls[1] == (frozenset({head(0, 1), mlp(1), EMBED}), "mean")  # the embed is always kept
    assert calls[2][0] == frozenset(SCORES) - {head(0, 1), mlp(1)} and EMBED in calls[2][0]
    with pytest.raises(WorkbenchError, match="ablation"):
        faithfulness(circuit, toy2, pairs=[], ablation="zero")  # type: ignore[arg-type]


def test_component_hash_is_cached_consistent_and_the_same_in_every_process():
    """Components are hashed once (an attribution's edge dict hashes them ~750k times on SmolLM2):
    equal components hash equal however they were made, a pickled one keeps working as a key, and
    the value does not depend on the process' string-hash seed (it travels with a pickle)."""
    import pickle
    import subprocess
    import sys

    from workbench.core.components import all_components

    comps = [*all_components(30, 9), LOGITS]
    assert len({hash(c) for c in comps}) == len(comps)  # no collisions within a model's components
    table = {c: i for i, c in enumerate(comps)}
    for i, c in enumerate(comps):
        assert table[Component.parse(c.name)] == i
        assert table[Component(c.kind, c.layer, c.head)] == i
        assert table[pickle.loads(pickle.dumps(c))] == i
    assert replace(head(3, 5), head=4) == head(3, 4) and hash(replace(head(3, 5), head=4)) == hash(head(3, 4))
    code = ("from workbench.core.components import EMBED, LOGITS, head, mlp; "
            "print(hash(EMBED), hash(LOGITS), hash(head(2, 7)), hash(mlp(4)))")
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")}
    assert seen == {f"{hash(EMBED)} {hash(LOGITS)} {hash(head(2, 7))} {hash(mlp(4))}\n"}
