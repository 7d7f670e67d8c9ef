"""Attribution on a trained model (facts-tiny's forget set): agreement with TransformerLens and
with exact patching, faithfulness bounds, and circuit files tied to their model."""

from __future__ import annotations

import json

import pytest

from workbench.core.components import EMBED, all_components
from workbench.core.errors import WorkbenchError
from workbench.experiments.flow import default_circuit
from workbench.interpretability.attribution import AttributionConfig, agreement, attribute, make_prompt_pairs
from workbench.interpretability.circuit import Circuit
from workbench.interpretability.faithfulness import faithfulness, faithfulness_curve
from workbench.measurement.reference import tl_node_scores
from workbench.models.builtin_splits import builtin_split


@pytest.fixture(scope="module")
def pairs(facts_tiny):
    return make_prompt_pairs(facts_tiny, builtin_split(facts_tiny).forget)


@pytest.fixture(scope="module")
def atp(facts_tiny, pairs):
    return attribute(facts_tiny, pairs, AttributionConfig(method="atp"))


def test_pairs_cover_the_forget_set(facts_tiny, pairs):
    split = builtin_split(facts_tiny)
    assert pairs.n_pairs == len(split.forget) and pairs.n_dropped == 0
    assert pairs.n_model_answers == 0  # every corrupt prompt is another forget fact's
    assert pairs.metric == "logit_diff"


def test_atp_equals_transformerlens_attribution_patch(facts_tiny, pairs, atp):
    tl = tl_node_scores(facts_tiny, pairs)
    expected = set(all_components(facts_tiny.n_layers, facts_tiny.n_heads, include_embed=True))
    assert set(tl) == expected
    diffs = {c.name: abs(atp.scores[c] - tl[c]) for c in tl}
    assert max(diffs.values()) < 1e-4, diffs
    # the scores are not all ~0: the comparison means something
    assert max(abs(s) for s in tl.values()) > 0.1


def test_atp_ranks_like_exact_patching(facts_tiny, pairs, atp):
    exact = attribute(facts_tiny, pairs, AttributionConfig(method="exact"))
    agree = agreement(atp, exact, top_k=5)
    print(f"\nfacts-tiny forget set, atp vs exact: spearman {agree['spearman']:.3f}, kendall {agree['kendall']:.3f}, "
          f"pearson {agree['pearson']:.3f}, top-5 overlap {agree['top_k_overlap']:.2f}")
    assert agree["spearman"] > 0
    assert agree["n"] == len(atp.scores)
    # both sweeps saw the same pairs and the same baselines
    assert exact.prompts_hash == atp.prompts_hash
    assert exact.clean_metric == pytest.approx(atp.clean_metric, rel=1e-5)
    assert exact.corrupt_metric == pytest.approx(atp.corrupt_metric, rel=1e-5)
    assert atp.clean_metric > atp.corrupt_metric  # the model knows its facts


def test_faithfulness_of_full_and_empty_circuits(facts_tiny, pairs, atp):
    full = Circuit.from_attribution(atp).set_selection(atp.scores)
    assert full.selected == set(all_components(facts_tiny.n_layers, facts_tiny.n_heads, include_embed=True))
    f = faithfulness(full, facts_tiny, pairs)
    assert f.recovered == pytest.approx(1.0, abs=1e-4)
    assert f.drop == pytest.approx(1.0, abs=1e-4)
    assert f.clean_metric == pytest.approx(atp.clean_metric, rel=1e-5)

    empty = Circuit.from_attribution(atp)
    assert empty.selected == set()
    f = faithfulness(empty, facts_tiny, pairs)
    assert f.recovered == pytest.approx(0.0, abs=1e-4)
    assert f.drop == pytest.approx(0.0, abs=1e-4)
    assert f.n_components == 0

    # a real circuit lies in between on recovery
    top = Circuit.from_attribution(atp).select_top_k(5, include_embed=False)
    f = faithfulness(top, facts_tiny, pairs)
    print(f"\nfacts-tiny top-5 circuit: recovered {f.recovered:.3f}, drop {f.drop:.3f}")
    assert f.n_components == 5


def test_circuit_faithfulness_lies_in_0_1_and_moves_with_its_nodes(facts_tiny, pairs, atp):
    # facts-tiny has only 10 heads and MLPs, so the default circuit (top 10) is all of them: use 5
    assert len(default_circuit(atp).selected) == facts_tiny.n_layers * (facts_tiny.n_heads + 1) == 10
    circuit = default_circuit(atp, top_k=5)
    f = faithfulness(circuit, facts_tiny, pairs)
    print(f"\nfacts-tiny default circuit ({f.n_components}): recovered {f.recovered:.3f}, drop {f.drop:.3f}")
    assert 0.0 < f.recovered < 1.0 and 0.0 < f.drop <= 1.0
    weakest = min(circuit.selected, key=lambda c: abs(circuit.scores[c]))
    strongest = max(circuit.selected, key=lambda c: abs(circuit.scores[c]))
    smaller = faithfulness(circuit.copy().exclude(strongest), facts_tiny, pairs)
    assert smaller.recovered != pytest.approx(f.recovered, abs=1e-4)
    assert faithfulness(circuit.copy().exclude(weakest), facts_tiny, pairs).n_components == f.n_components - 1


def test_faithfulness_curve_over_circuit_size(facts_tiny, pairs, atp):
    n = facts_tiny.n_layers * (facts_tiny.n_heads + 1)
    curve = faithfulness_curve(atp, facts_tiny, pairs, max_k=n + 5, progress=lambda f, m: None)
    assert curve.ks == tuple(range(1, n + 1)) and len(curve.ranking) == n and EMBED not in curve.ranking
    assert [abs(atp.scores[c]) for c in curve.ranking] == sorted((abs(atp.scores[c]) for c in curve.ranking),
                                                                 reverse=True)
    assert curve.recovered[-1] == pytest.approx(1.0, abs=1e-4) and curve.drop[-1] == pytest.approx(1.0, abs=1e-4)
    assert len({round(r, 4) for r in curve.recovered}) > n // 2  # it moves as nodes are added
    top3 = faithfulness(Circuit.from_attribution(atp).set_selection(curve.ranking[:3]), facts_tiny, pairs)
    assert curve.recovered[2] == pytest.approx(top3.recovered, abs=1e-6)
    kl = faithfulness_curve(atp, facts_tiny, pairs, max_k=n, metric="kl", ablation="mean", progress=lambda f, m: None)
    assert kl.metric == "kl" and kl.clean_metric == 0.0 and kl.floor_metric < 0
    assert kl.recovered[-1] == pytest.approx(1.0, abs=1e-4)
    assert curve.rows()[0]["added"] == curve.ranking[0].name


def test_circuit_json_round_trip_and_fingerprint_check(facts_tiny, atp, tmp_path):
    from workbench.models.loading import load_model

    circuit = Circuit.from_attribution(atp).select_top_k(5, include_embed=False)
    path = circuit.save(tmp_path / "circuit.json")
    loaded = Circuit.load(path, model=facts_tiny)
    assert loaded.to_dict() == circuit.to_dict()
    assert loaded.selected == circuit.selected and len(loaded.selected) == 5
    assert loaded.scores == pytest.approx(circuit.scores)
    assert loaded.model_fingerprint == facts_tiny.fingerprint == atp.model_fingerprint
    assert json.loads(path.read_text())["prompts_hash"] == atp.prompts_hash
    assert EMBED not in loaded.selected

    oracle = load_model("facts-tiny-oracle")
    assert (oracle.n_layers, oracle.n_heads) == (facts_tiny.n_layers, facts_tiny.n_heads)
    assert oracle.fingerprint != facts_tiny.fingerprint
    with pytest.raises(WorkbenchError, match="different model.*fingerprint") as err:
        Circuit.load(path, model=oracle)
    assert str(path) in str(err.value) and facts_tiny.fingerprint in str(err.value)
    with pytest.raises(WorkbenchError, match="fingerprint"):
        faithfulness(loaded, oracle, make_prompt_pairs(oracle, builtin_split(oracle).forget))
