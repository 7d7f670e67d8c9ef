"""The forget set's pairs and dataset means taken ahead of the first attribution click
(flow.prepare_forget_set, run by the app's background start): the click then makes neither,
with the same attribution and readout as a cold start."""

from __future__ import annotations

import pytest
import torch

from workbench.core.memo import clear_base_memo
from workbench.data.facts import Fact, FactSplit

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: one torch thread


def _split() -> FactSplit:
    """Prompts of 3 to 7 tokens without corrupt twins: the 3- and 7-token ones have no
    same-length partner, so they are on the mean baseline."""
    gen = torch.Generator().manual_seed(0)
    facts = []
    for k, length in enumerate([3, 4, 4, 5, 6, 6, 7, 5]):
        words = " ".join(f"w{i}" for i in torch.randint(0, 100, (length,), generator=gen).tolist())
        facts.append(Fact(words, f"w{(11 * k + 5) % 100}", ()))
    return FactSplit("mixed", forget=tuple(facts), retain=())


def _counting(monkeypatch) -> dict[str, int]:
    import workbench.experiments.flow as flow
    import workbench.interpretability.attribution as attribution_module

    counts = {"pairs": 0, "means": 0}
    real_pairs, real_means = flow.pairs_for, attribution_module._means

    def pairs_for(*args, **kwargs):
        counts["pairs"] += 1
        return real_pairs(*args, **kwargs)

    def means(*args, **kwargs):
        counts["means"] += 1
        return real_means(*args, **kwargs)

    monkeypatch.setattr(flow, "pairs_for", pairs_for)
    monkeypatch.setattr(attribution_module, "_means", means)
    return counts


def test_a_prepared_forget_set_spares_the_click_its_pairs_and_means(monkeypatch):
    from workbench.experiments.flow import attribute_forget_set, forget_set_pairs, prepare_forget_set
    from workbench.interpretability.attribution import AttributionConfig
    from workbench.interpretability.faithfulness import FaithfulnessMeter
    from workbench.models.toy import toy_model

    model, split = toy_model("llama", n_kv_heads=2), _split()
    config = AttributionConfig(method="atp", edges=True)
    cold = attribute_forget_set(model, split, config)
    cold_meter = FaithfulnessMeter(model, forget_set_pairs(model, split, config))
    clear_base_memo()

    counts = _counting(monkeypatch)
    pairs = prepare_forget_set(model, split)
    assert pairs.has_mean and counts == {"pairs": 1, "means": 2}  # the attribution's batch and the readout's
    warm = attribute_forget_set(model, split, config)
    assert forget_set_pairs(model, split, config) is pairs
    meter = FaithfulnessMeter(model, pairs)
    assert counts == {"pairs": 1, "means": 2}  # the click and its readout made neither again
    assert warm.scores == cold.scores and warm.edge_scores == cold.edge_scores
    assert (meter.clean, meter.corrupt, meter.floor) == (cold_meter.clean, cold_meter.corrupt, cold_meter.floor)
    forget_set_pairs(model, split, AttributionConfig(baseline="mean"))  # another baseline: other pairs
    assert counts["pairs"] == 2


def test_the_app_background_start_prepares_the_forget_set(monkeypatch):
    """SharedModels.prepare_base ends with the forget set's pairs (its status says so), and the
    session's first "Run attribution" then makes none."""
    from workbench.faces.session import Session, SharedModels
    from workbench.quant import QuantConfig

    shared = SharedModels()
    model = shared.model("facts-tiny")
    split = shared.builtin_split(model)
    statuses: list[str] = []
    shared.prepare_base(model, split, QuantConfig("nf4"), status=statuses.append)
    assert "prompt pairs" in statuses[-1]
    counts = _counting(monkeypatch)
    s = Session()
    s.setup("facts-tiny")
    s.attribute("atp", measure=False)
    assert counts["pairs"] == 0
