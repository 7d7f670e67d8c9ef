"""CAD — Circuit Attribution Divergence: the formula, its invariances, and that it separates
structural erasure from a no-op or a negligible change on a real model."""

from __future__ import annotations

import math
import random

import pytest
import torch

from workbench.core.components import EMBED, ComponentKind, all_components, head, mlp
from workbench.core.errors import WorkbenchError
from workbench.interpretability.cad import circuit_attribution_divergence, jensen_shannon_bits
from workbench.models.update import Update
from workbench.quant import QuantConfig

COMPS = [EMBED, head(0, 0), head(0, 1), mlp(0), head(1, 0), mlp(1)]


def _random_scores(seed: int) -> dict:
    rng = random.Random(seed)
    return {c: rng.uniform(-3, 3) for c in COMPS}


def _jsd_reference(p: list[float], q: list[float]) -> float:
    """JSD in bits, written out from its definition."""
    m = [(a + b) / 2 for a, b in zip(p, q)]
    def kl(x, y):
        return sum(a * math.log2(a / b) for a, b in zip(x, y) if a > 0)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_identical_maps_give_zero():
    s = _random_scores(0)
    assert circuit_attribution_divergence(s, dict(s)).cad == 0.0


def test_cad_ignores_scale_and_sign():
    s = _random_scores(1)
    assert circuit_attribution_divergence(s, {c: -2.5 * v for c, v in s.items()}).cad == pytest.approx(0.0, abs=1e-12)


def test_hand_example():
    # |before| -> p = (1/2, 1/2, 0), |after| -> q = (0, 1/2, 1/2); m = (1/4, 1/2, 1/4)
    # KL(p‖m) = ½·log2(2) + ½·log2(1) = ½ = KL(q‖m)  =>  JSD = ½ bit.
    a, b, c = head(0, 0), head(0, 1), mlp(0)
    before = {a: 1.0, b: -1.0, c: 0.0}
    after = {a: 0.0, b: 2.0, c: -2.0}
    assert circuit_attribution_divergence(before, after).cad == pytest.approx(0.5, abs=1e-12)
    # disjoint supports: the maximum, 1 bit
    assert circuit_attribution_divergence({a: 1.0, b: 0.0, c: 0.0}, {a: 0.0, b: 0.0, c: 5.0}).cad == pytest.approx(1.0)
    assert jensen_shannon_bits([0.2, 0.3, 0.5], [0.6, 0.3, 0.1]) == pytest.approx(
        _jsd_reference([0.2, 0.3, 0.5], [0.6, 0.3, 0.1]), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_bounded_symmetric_and_matches_definition(seed):
    s, t = _random_scores(seed), _random_scores(100 + seed)
    forward = circuit_attribution_divergence(s, t).cad
    backward = circuit_attribution_divergence(t, s).cad
    assert 0.0 <= forward <= 1.0
    assert forward == pytest.approx(backward, abs=1e-12)
    comps = sorted(s)
    p = [abs(s[c]) for c in comps]
    q = [abs(t[c]) for c in comps]
    p = [v / sum(p) for v in p]
    q = [v / sum(q) for v in q]
    assert forward == pytest.approx(_jsd_reference(p, q), abs=1e-12)
    assert forward > 0


def test_per_node_and_circuit_share():
    a, b, c = head(0, 0), head(0, 1), mlp(0)
    before = {a: 2.0, b: -1.0, c: 1.0}
    after = {a: 0.5, b: -1.0, c: 2.5}
    r = circuit_attribution_divergence(before, after, circuit=[a, c], metric_before=3.0, metric_after=1.0)
    assert r.per_node[a.name] == (2.0, 0.5, -1.5)
    assert r.per_node[c.name] == (1.0, 2.5, 1.5)
    assert r.circuit_share_before == pytest.approx(3 / 4)
    assert r.circuit_share_after == pytest.approx(3 / 4)
    d = r.to_dict()
    assert d["cad"] == r.cad and d["metric_before"] == 3.0 and d["per_node"][a.name] == [2.0, 0.5, -1.5]
    no_circuit = circuit_attribution_divergence(before, after)
    assert math.isnan(no_circuit.circuit_share_before)


def test_all_zero_after_is_uniform():
    a, b = head(0, 0), head(0, 1)
    # before concentrated on a, after all zero (-> uniform): JSD((1,0), (½,½))
    expected = _jsd_reference([1.0, 0.0], [0.5, 0.5])
    assert circuit_attribution_divergence({a: 4.0, b: 0.0}, {a: 0.0, b: 0.0}).cad == pytest.approx(expected)


def test_mismatched_or_empty_maps_are_refused():
    with pytest.raises(WorkbenchError, match="different components"):
        circuit_attribution_divergence({head(0, 0): 1.0}, {head(0, 1): 1.0})
    with pytest.raises(WorkbenchError):
        circuit_attribution_divergence({}, {})
    with pytest.raises(WorkbenchError):
        jensen_shannon_bits([1.0], [0.5, 0.5])


# --- on facts-tiny ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split(facts_tiny):
    from workbench.models.builtin_splits import builtin_split

    return builtin_split(facts_tiny)


@pytest.fixture(scope="module")
def base_attribution(facts_tiny, split):
    from workbench.experiments.flow import attribute_forget_set

    return attribute_forget_set(facts_tiny, split)


def test_empty_update_has_exactly_zero_cad(facts_tiny, split):
    """measure_update → cad_for_variants: fp compares base_fp with after_fp, quantized compares
    base_q with after_q; an empty update changes neither, so both are exactly 0 (if the quantized
    CAD compared the full-precision base with the quantized after-model it would not be)."""
    from workbench.measurement.metrics import measure_update

    before = facts_tiny.weights_hash()
    comps = [head(1, 2), mlp(0)]
    m = measure_update(facts_tiny, split, Update({}), quant=QuantConfig("nf4"), circuit=comps)
    assert facts_tiny.weights_hash() == before
    assert m.cad.fp == 0.0
    assert m.cad.quantized == 0.0
    for b, a, d in m.cad.fp_detail["per_node"].values():
        assert a == b and d == 0.0
    assert m.cad.fp_detail["circuit_share_before"] == m.cad.fp_detail["circuit_share_after"]
    assert m.properties.structural.passed is False
    assert m.params_changed == 0 and m.codes_changed == 0 and m.retain_kl == 0.0
    assert m.forget.after_fp == m.forget.base_fp and m.forget.after_q == m.forget.base_q


def _output_weights_update(model, component, fill) -> Update:
    """Change the *output* weights of one component (GPT-2: rows of attn.c_proj for a head, the
    whole mlp.c_proj for an MLP); ``fill(w, mask)`` gives the delta."""
    from workbench.interpretability.parameters import circuit_parameters

    masks = {n: m for n, m in circuit_parameters(model, [component]).items() if ".c_proj.weight" in n}
    assert masks, f"{component.name} owns no output weight"
    state = model.state()
    return Update({n: fill(state[n], m) for n, m in masks.items()})


def test_cad_grows_with_real_erasure(facts_tiny, split, base_attribution):
    from workbench.interpretability.attribution import attribute
    from workbench.interpretability.cad import circuit_attribution_divergence as cad

    top = next(c for c, _ in base_attribution.top(20) if c.kind is not ComponentKind.EMBED)
    gen = torch.Generator().manual_seed(0)
    erase = _output_weights_update(facts_tiny, top, lambda w, m: -w * m)  # zero the output weights
    tiny = _output_weights_update(facts_tiny, top, lambda w, m: 1e-5 * torch.randn(w.shape, generator=gen) * m)
    before = facts_tiny.weights_hash()
    scores = {}
    for label, update in (("erase", erase), ("tiny", tiny)):
        after = attribute(update.apply(facts_tiny), split.forget, progress=lambda *_: None)
        scores[label] = cad(base_attribution.scores, after.scores, circuit=[top])
    assert facts_tiny.weights_hash() == before
    assert scores["erase"].cad > 10 * scores["tiny"].cad
    assert scores["erase"].cad > 1e-3
    # the erased component's own attribution collapses
    b, a, _ = scores["erase"].per_node[top.name]
    assert abs(a) < 0.1 * abs(b)
    assert scores["erase"].circuit_share_after < scores["erase"].circuit_share_before
    assert set(scores["erase"].per_node) == {c.name for c in all_components(facts_tiny.n_layers, facts_tiny.n_heads)}
