"""Attribution without counterfactual twins (mean and resample baselines), multi-token
answers, per-fact scores and the KL ablation metric, on tiny random models (CPU, seconds)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from workbench.core.components import EMBED, all_components, head, mlp
from workbench.core.errors import WorkbenchError
from workbench.interpretability.attribution import (
    AttributionConfig,
    ablated_metric,
    agreement,
    attribute,
    dataset_means,
    make_prompt_pairs,
    metric_baselines,
)

SILENT = lambda fraction, message: None  # noqa: E731


@dataclass(frozen=True)
class Fact:
    """What make_prompt_pairs reads of a fact (workbench Facts have no corrupt_answer)."""

    prompt: str
    answer: str
    corrupt_prompt: str = ""
    corrupt_answer: str = ""


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: one torch thread, the box is small and shared


@pytest.fixture(scope="module")
def models():
    from workbench.models.toy import toy_model

    return {"gpt2": toy_model("gpt2"), "llama_gqa": toy_model("llama", n_kv_heads=2)}


def mixed_facts(seed: int = 0) -> list:
    """Prompts of 3 to 7 tokens, no corrupt twins, single-token answers."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, length in enumerate([3, 4, 4, 5, 6, 6, 7, 5]):
        words = " ".join(f"w{i}" for i in torch.randint(0, 100, (length,), generator=gen).tolist())
        out.append(Fact(words, f"w{(11 * k + 5) % 100}"))
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_mean_baseline_exact_scores_are_mean_ablation_effects(models, name):
    """Exact patching on the mean baseline is m(clean) - m(clean, node at its dataset mean),
    checked against ablated_metric (another code path) node by node."""
    m = models[name]
    pairs = make_prompt_pairs(m, mixed_facts(), baseline="mean", metric="logprob")
    assert set(pairs.pair_kinds) == {"mean"} and len({g.seq for g in pairs.groups}) == 5  # any length
    exact = attribute(m, pairs, AttributionConfig(method="exact", metric="logprob", batch_size=3), progress=SILENT)
    clean, corrupt = metric_baselines(m, pairs)
    assert exact.clean_metric == pytest.approx(clean, abs=1e-4)
    assert exact.corrupt_metric == pytest.approx(corrupt, abs=1e-4) and abs(clean - corrupt) > 1e-3
    everything = set(all_components(m.n_layers, m.n_heads))
    means = dataset_means(m, pairs)
    for c in (EMBED, head(0, 1), head(1, 3), mlp(0), mlp(1)):
        ablated = ablated_metric(m, pairs, everything - {c}, "mean", means=means)
        assert exact.scores[c] == pytest.approx(clean - ablated, abs=1e-4), c
    # every writer at its mean is the baseline run ("corrupt" falls back to the mean for these pairs)
    assert ablated_metric(m, pairs, set(), "corrupt") == pytest.approx(corrupt, abs=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_mean_baseline_atp_and_ig_estimate_exact(models, name):
    m = models[name]
    pairs = make_prompt_pairs(m, mixed_facts(), baseline="mean")
    cfg = dict(batch_size=4)
    atp = attribute(m, pairs, AttributionConfig(**cfg), progress=SILENT)
    ig1 = attribute(m, pairs, AttributionConfig(method="ig", ig_steps=1, **cfg), progress=SILENT)
    exact = attribute(m, pairs, AttributionConfig(method="exact", **cfg), progress=SILENT)
    for c in atp.scores:
        assert ig1.scores[c] == pytest.approx(atp.scores[c], abs=1e-5)
    assert agreement(atp, exact)["spearman"] > 0.5
    if name == "llama_gqa":  # no positional embedding: IG's embed score tends to the exact effect
        ig = attribute(m, pairs, AttributionConfig(method="ig", ig_steps=24, **cfg), progress=SILENT)
        assert abs(ig.scores[EMBED] - exact.scores[EMBED]) < abs(atp.scores[EMBED] - exact.scores[EMBED])
        assert ig.scores[EMBED] == pytest.approx(exact.scores[EMBED], rel=0.1, abs=0.05)


def test_resample_baseline_draws_partners_of_equal_length(models):
    m = models["gpt2"]
    facts = mixed_facts()
    pairs = make_prompt_pairs(m, facts, baseline="resample", seed=3)
    assert pairs.pair_kinds == ("mean", "resample", "resample", "resample", "resample", "resample", "mean",
                                "resample")
    tok = m.tokenizer
    for i, kind in enumerate(pairs.pair_kinds):
        if kind == "resample":
            donor = pairs.corrupt_prompts[i]
            assert donor != facts[i].prompt and donor in [f.prompt for f in facts]
            assert len(tok(donor)["input_ids"]) == len(tok(facts[i].prompt)["input_ids"])
    again = make_prompt_pairs(m, facts, baseline="resample", seed=3)
    assert again.corrupt_prompts == pairs.corrupt_prompts
    att = attribute(m, facts, AttributionConfig(baseline="resample", seed=3), progress=SILENT)
    assert att.baseline == "resample" and att.pairing.resample == 6 and att.pairing.mean == 2 and att.n_dropped == 0
    exact = attribute(m, facts, AttributionConfig(method="exact", baseline="resample", seed=3), progress=SILENT)
    assert agreement(att, exact)["spearman"] > 0.5


def test_per_fact_scores_average_to_the_set_and_match_a_lone_fact(models):
    m = models["llama_gqa"]
    facts = [Fact("w1 w2 w3 w4", "w10", corrupt_prompt="w1 w9 w3 w4", corrupt_answer="w11"),
             Fact("w5 w6 w7", "w12", corrupt_prompt="w5 w8 w7", corrupt_answer="w13"),
             Fact("w20 w21 w22 w23 w24", "w14", corrupt_prompt="w20 w25 w22 w23 w24", corrupt_answer="w15")]
    att = attribute(m, facts, AttributionConfig(batch_size=2), progress=SILENT)
    for c, s in att.scores.items():
        assert sum(att.for_fact(i)[c] for i in range(3)) / 3 == pytest.approx(s, abs=1e-6)
    alone = attribute(m, [facts[1]], AttributionConfig(), progress=SILENT)
    for c, s in alone.scores.items():
        assert att.for_fact(1)[c] == pytest.approx(s, abs=1e-5)
    assert att.pair_prompts[1] == "w5 w6 w7" and att.pair_kinds == ("twin", "twin", "twin")
    with pytest.raises(WorkbenchError, match="fact index"):
        att.for_fact(3)


def test_multi_token_answers_sum_the_teacher_forced_log_probability(models):
    m = models["gpt2"]
    facts = [Fact("w1 w2 w3", "w40 w41 w42", corrupt_prompt="w1 w5 w3"),
             Fact("w1 w5 w3", "w43", corrupt_prompt="w1 w2 w3"),
             Fact("w7 w8", "w44 w45", corrupt_prompt="w7 w9")]
    pairs = make_prompt_pairs(m, facts, metric="logprob")
    assert sorted(g.span for g in pairs.groups) == [1, 2, 3]
    clean, _ = metric_baselines(m, pairs)
    tok = m.tokenizer
    expected = []
    for f in facts:
        prompt = tok(f.prompt)["input_ids"]
        answer = tok(" " + f.answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = torch.log_softmax(m.hf(ids).logits[0].float(), -1)
        expected.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(answer)))
    assert clean == pytest.approx(sum(expected) / 3, abs=1e-4)
    att = attribute(m, pairs, AttributionConfig(metric="logprob", method="exact"), progress=SILENT)
    assert att.clean_metric == pytest.approx(clean, abs=1e-4)
    # logit_diff reads the first answer token against the alternative's first token
    ld = make_prompt_pairs(m, facts)
    assert attribute(m, ld, AttributionConfig(), progress=SILENT).n_pairs == 3


def test_kl_ablation_metric(models):
    m = models["gpt2"]
    facts = [Fact("w1 w2 w3", "w40", corrupt_prompt="w1 w5 w3", corrupt_answer="w41"),
             Fact("w7 w8 w9 w10", "w44", corrupt_prompt="w7 w6 w9 w10", corrupt_answer="w45")]
    pairs = make_prompt_pairs(m, facts)
    everything = set(all_components(m.n_layers, m.n_heads))
    assert ablated_metric(m, pairs, everything, metric="kl") == pytest.approx(0.0, abs=1e-6)
    none = ablated_metric(m, pairs, set(), metric="kl")
    tok = m.tokenizer
    kls = []
    for f in facts:
        with torch.no_grad():
            p = torch.log_softmax(m.hf(torch.tensor([tok(f.prompt)["input_ids"]])).logits[0, -1].float(), -1)
            q = torch.log_softmax(m.hf(torch.tensor([tok(f.corrupt_prompt)["input_ids"]])).logits[0, -1].float(), -1)
        kls.append(float((p.exp() * (p - q)).sum()))
    assert none == pytest.approx(-sum(kls) / 2, abs=1e-5) and none < 0
    assert metric_baselines(m, pairs, metric="kl") == pytest.approx((0.0, none), abs=1e-6)
    with pytest.raises(WorkbenchError, match="unknown metric"):
        ablated_metric(m, pairs, set(), metric="accuracy")  # type: ignore[arg-type]


@pytest.mark.parametrize("metric", [None, "kl"])
def test_faithfulness_meter_takes_the_dataset_means_once(models, monkeypatch, metric):
    """The meter's baselines on pairs with a mean-baseline fact: one pass for the means (not one
    more inside metric_baselines), and the same clean/baseline metrics as metric_baselines taking
    its own."""
    from workbench.interpretability.faithfulness import FaithfulnessMeter

    m = models["llama_gqa"]
    pairs = make_prompt_pairs(m, mixed_facts(), baseline="mean", metric="logprob")
    own = metric_baselines(m, pairs) if metric is None else metric_baselines(m, pairs, metric=metric)
    passes = _count_means(monkeypatch)
    meter = FaithfulnessMeter(m, pairs, metric=metric)
    assert len(passes) == 1
    assert (meter.clean, meter.corrupt) == own  # equal, not approximately: the same means


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_kept_corrupt_runs_give_the_same_ablated_metrics(models, name):
    """ablated_metric with the pairs' corrupt runs kept (corrupt_activations) equals it running
    them itself, bit for bit, on pairs mixing partnered and mean-baseline facts, for several
    circuits and metrics; a cap too small keeps nothing, and mismatched chunks are refused."""
    from workbench.interpretability.attribution import corrupt_activations

    m = models[name]
    pairs = make_prompt_pairs(m, mixed_facts(), metric="logprob")
    assert {"mean"} < set(pairs.pair_kinds)  # some facts partnered, some on the mean
    kept = corrupt_activations(m, pairs, batch_size=2)
    assert kept is not None and kept.nbytes > 0
    assert sum(c is None for c in kept.chunks) == sum((g.n + 1) // 2 for g in pairs.groups if g.baseline == "mean")
    everything = set(all_components(m.n_layers, m.n_heads, include_embed=True))
    for keep in (set(), {EMBED}, {EMBED, head(0, 1), mlp(1)}, everything - {head(1, 3)}):
        for metric in ("logprob", "kl"):
            own = ablated_metric(m, pairs, keep, metric=metric, batch_size=2)
            assert ablated_metric(m, pairs, keep, metric=metric, batch_size=2, corrupt=kept) == own
    assert corrupt_activations(m, pairs, batch_size=2, max_bytes=kept.nbytes // 2) is None
    assert corrupt_activations(m, pairs, batch_size=2, max_bytes=2 * kept.nbytes) is not None
    with pytest.raises(WorkbenchError, match="do not match these pairs in chunks of 3"):
        ablated_metric(m, pairs, {EMBED}, batch_size=3, corrupt=kept)


def test_faithfulness_meter_keeps_the_corrupt_runs_until_released(models, monkeypatch):
    """The meter runs the pairs' corrupt forwards once (at its floor) and measures the same
    faithfulness as a meter that may keep nothing; released, it takes them again when next needed."""
    import workbench.interpretability.faithfulness as faith

    m = models["llama_gqa"]
    pairs = make_prompt_pairs(m, mixed_facts(), metric="logprob")
    meter = faith.FaithfulnessMeter(m, pairs)
    assert meter.keeps_corrupt_runs
    monkeypatch.setattr(faith, "KEEP_CORRUPT_BYTES", 0)
    plain = faith.FaithfulnessMeter(m, pairs)
    assert not plain.keeps_corrupt_runs
    assert (meter.clean, meter.corrupt, meter.floor) == (plain.clean, plain.corrupt, plain.floor)
    for selected in ({head(0, 1)}, {head(0, 1), mlp(0), head(1, 2)}, {mlp(0), mlp(1)}):
        assert meter.measure(selected) == plain.measure(selected)
    monkeypatch.undo()
    meter.release()
    assert not meter.keeps_corrupt_runs
    again = meter.measure({mlp(0), mlp(1)})
    assert meter.keeps_corrupt_runs and again == plain.measure({mlp(0), mlp(1)})


def _count_means(monkeypatch) -> list[int]:
    import workbench.interpretability.attribution as attribution_module

    passes: list[int] = []
    real = attribution_module._means

    def counted(*args, **kwargs):
        passes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution_module, "_means", counted)
    return passes


def test_dataset_means_are_taken_once_per_weights_pairs_and_batch(models, monkeypatch):
    """dataset_means is memoised: the same object for the same weights, clean ids and batch size,
    bit for bit the pass it memoises; another batch size, pairs or model is a pass of its own."""
    import workbench.interpretability.attribution as attribution_module

    m = models["llama_gqa"]
    pairs = make_prompt_pairs(m, mixed_facts(), metric="logprob")
    bridge = attribution_module._check_model(m)
    lay = attribution_module._Layout.of(bridge)
    direct = attribution_module._means(bridge, lay, pairs, 64)
    passes = _count_means(monkeypatch)
    first = dataset_means(m, pairs)
    assert dataset_means(m, pairs) is first and len(passes) == 1
    assert set(first.rest) == set(direct.rest) and first.n_sequences == direct.n_sequences == pairs.n_pairs
    for name in direct.rest:
        assert torch.equal(first.first[name], direct.first[name]) and torch.equal(first.rest[name], direct.rest[name])
    dataset_means(m, pairs, batch_size=2)
    dataset_means(m, make_prompt_pairs(m, mixed_facts(seed=1), metric="logprob"))
    dataset_means(models["gpt2"], make_prompt_pairs(models["gpt2"], mixed_facts(), metric="logprob"))
    assert len(passes) == 4


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_attribution_reads_given_means_with_the_same_scores(models, monkeypatch, name):
    """attribute(means=) takes no means pass of its own and gives the scores, per-pair scores and
    edges it gives when it takes them (bit for bit); means of other pairs are refused."""
    m = models[name]
    pairs = make_prompt_pairs(m, mixed_facts(), metric="logprob")
    assert pairs.has_mean
    config = AttributionConfig(method="atp", edges=True, metric="logprob", batch_size=2)
    own = attribute(m, pairs, config, progress=SILENT)
    means = dataset_means(m, pairs, batch_size=2)
    passes = _count_means(monkeypatch)
    given = attribute(m, pairs, config, progress=SILENT, means=means)
    assert passes == []
    assert given.scores == own.scores and given.edge_scores == own.edge_scores
    assert torch.equal(given.pair_scores, own.pair_scores)
    other = make_prompt_pairs(m, mixed_facts()[:5], metric="logprob")
    with pytest.raises(WorkbenchError, match="not the dataset means of these pairs"):
        attribute(m, pairs, config, progress=SILENT, means=dataset_means(m, other))
    with pytest.raises(WorkbenchError, match="ActivationMeans"):
        attribute(m, pairs, config, progress=SILENT, means={"x": 1})  # type: ignore[arg-type]
