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
    made = _counting_clean_runs(monkeypatch)
    s = Session()
    s.setup("facts-tiny")
    s.attribute("atp", measure=False)
    assert counts["pairs"] == 0 and made == []  # nor clean runs: held for the click's own config


def _counting_clean_runs(monkeypatch) -> list[int]:
    import workbench.interpretability.attribution as attribution_module

    made: list[int] = []
    real = attribution_module._clean_run

    def clean_run(bridge, lay, chunk, metric):
        made.append(chunk.n)
        return real(bridge, lay, chunk, metric)

    monkeypatch.setattr(attribution_module, "_clean_run", clean_run)
    return made


def _held() -> bool:
    import workbench.core.memo as memo
    from workbench.experiments.flow import CLEAN_RUNS

    return CLEAN_RUNS in memo._ONCE


@pytest.mark.parametrize("config_args", [
    {"method": "atp", "edges": True},
    {"method": "ig", "ig_steps": 3, "edges": True, "batch_size": 2},
    {"method": "atp", "edges": False, "metric": "logprob"},
])
def test_clean_runs_taken_ahead_give_the_click_the_same_attribution(monkeypatch, config_args):
    """The background start's clean runs (prepare_forget_set with the click's config) replace
    the click's own: the same scores, edges, per-pair scores and metrics bit for bit, no clean
    forward in the click, and nothing held after it."""
    from workbench.experiments.flow import attribute_forget_set, prepare_forget_set
    from workbench.interpretability.attribution import AttributionConfig
    from workbench.models.toy import toy_model

    model, split = toy_model("llama", n_kv_heads=2), _split()
    config = AttributionConfig(**config_args)
    cold = attribute_forget_set(model, split, config)
    clear_base_memo()
    made = _counting_clean_runs(monkeypatch)
    pairs = prepare_forget_set(model, split, config)
    paired = sum(g.n for g in pairs.groups if g.baseline != "mean")
    assert paired > 0 and sum(made) == paired and _held()  # every paired fact's clean run, once, ahead
    warm = attribute_forget_set(model, split, config)
    assert sum(made) == paired  # the click made none
    assert warm.scores == cold.scores and warm.edge_scores == cold.edge_scores
    assert torch.equal(warm.pair_scores, cold.pair_scores)
    assert (warm.clean_metric, warm.corrupt_metric) == (cold.clean_metric, cold.corrupt_metric)
    assert not _held()  # let go once used
    attribute_forget_set(model, split, config)  # a second click makes its own
    assert sum(made) == 2 * paired


def _other_answers(split: FactSplit) -> FactSplit:
    """The same prompts with other answers (the clean runs' ids are the same, their metric not)."""
    return FactSplit(split.name, forget=tuple(Fact(f.prompt, f"w{(int(f.answer[1:]) + 7) % 100}", ())
                                              for f in split.forget), retain=split.retain)


@pytest.mark.parametrize("click", ["batch", "edges", "metric", "answers"])
def test_clean_runs_held_for_another_attribution_are_let_go_not_used(monkeypatch, click):
    """Runs held for one config or forget set are not used by a click with another batch size,
    edge setting, metric or answers (same prompts): the click makes its own and gives what a
    cold click gives; the held runs are let go."""
    from workbench.experiments.flow import attribute_forget_set, prepare_forget_set
    from workbench.interpretability.attribution import AttributionConfig
    from workbench.models.toy import toy_model

    model, split = toy_model("llama", n_kv_heads=2), _split()
    held = AttributionConfig(edges=True)
    asked = {"batch": AttributionConfig(edges=True, batch_size=2), "edges": AttributionConfig(),
             "metric": AttributionConfig(edges=True, metric="logprob"), "answers": held}[click]
    asked_split = _other_answers(split) if click == "answers" else split
    cold = attribute_forget_set(model, asked_split, asked)
    clear_base_memo()
    made = _counting_clean_runs(monkeypatch)
    prepare_forget_set(model, split, held)
    ahead = len(made)
    warm = attribute_forget_set(model, asked_split, asked)
    assert len(made) > ahead and not _held()  # the click made its own; the held runs are gone
    assert warm.scores == cold.scores and warm.clean_metric == cold.clean_metric


def test_attribute_refuses_clean_runs_of_other_pairs_config_or_weights():
    from workbench.core.errors import WorkbenchError
    from workbench.experiments.flow import forget_set_pairs
    from workbench.interpretability.attribution import AttributionConfig, attribute, clean_runs
    from workbench.models.toy import toy_model

    model, split = toy_model("llama", n_kv_heads=2), _split()
    pairs = forget_set_pairs(model, split)
    other = forget_set_pairs(model, _other_answers(split))
    cases = [(model, pairs, AttributionConfig(batch_size=2), AttributionConfig()),
             (model, pairs, AttributionConfig(edges=True), AttributionConfig()),
             (model, pairs, AttributionConfig(metric="logprob"), AttributionConfig()),
             (model, other, AttributionConfig(), AttributionConfig()),
             (toy_model("llama", n_kv_heads=2, seed=3), pairs, AttributionConfig(), AttributionConfig())]
    for on, taken_for, held, asked in cases:
        with pytest.raises(WorkbenchError, match="clean runs were taken for other"):
            attribute(model, pairs, asked, taken_ahead=clean_runs(on, taken_for, held))


def test_a_run_lets_go_of_clean_runs_held_for_an_attribution(monkeypatch):
    """Runs held for a first attribution that does not come (a run started with a circuit of its
    own) are let go before the run's unlearning, not carried through its memory peak."""
    import workbench.core.memo as memo
    import workbench.experiments.flow as flow
    from workbench.core.errors import WorkbenchError
    from workbench.interpretability.attribution import AttributionConfig
    from workbench.models.toy import toy_model

    model, forget = toy_model("llama", n_kv_heads=2), _split()
    split = FactSplit("mixed", forget=forget.forget, retain=(Fact("w1 w2 w3", "w4", ()), Fact("w5 w6", "w7", ())))
    circuit = flow.default_circuit(flow.attribute_forget_set(model, split), top_k=2)
    flow.prepare_forget_set(model, split, AttributionConfig(edges=True))
    assert _held() and flow.READOUT_METER in memo._ONCE
    held_at_unlearning = []
    real_unlearn = flow.unlearn

    def unlearn(*args, **kwargs):
        held_at_unlearning.append(_held())
        return real_unlearn(*args, **kwargs)

    monkeypatch.setattr(flow, "unlearn", unlearn)
    try:  # stopped before its first round: what is held is let go at the start all the same
        flow.run_unlearning(model, split, circuit=circuit, save=False, measure_cad=False, should_stop=lambda: True)
    except WorkbenchError as e:
        assert "cancelled" in str(e)
    assert held_at_unlearning == [False]
    assert flow.READOUT_METER not in memo._ONCE  # nor the readout's meter


def test_runs_computed_while_their_click_came_are_not_held():
    """hold_once does not hold what was computed while the kind was taken or let go (the click
    came first and made its own, or a run started): it would be held for nothing."""
    from workbench.core import memo

    def taken_meanwhile() -> str:
        assert memo.take_once("k", ("a",), str) is None
        return "value"

    memo.hold_once("k", ("a",), taken_meanwhile)
    assert memo.take_once("k", ("a",), str) is None
    memo.hold_once("k", ("a",), lambda: "value")
    assert memo.take_once("k", ("b",), str) is None and memo.take_once("k", ("a",), str) is None  # let go
    memo.hold_once("k", ("a",), lambda: "value")
    assert memo.take_once("k", ("a",), int) is None  # of another type: not given
    memo.hold_once("k", ("a",), lambda: "value")
    assert memo.take_once("k", ("a",), str) == "value"
    since = memo.once_asked("k")
    memo.drop_once("k")  # asked before the work began: nothing computed, nothing held
    memo.hold_once("k", ("a",), lambda: pytest.fail("computed"), since=since)
    memo.hold_once("k", ("a",), lambda: None)
    assert "k" not in memo._ONCE  # None is not held


def test_the_readout_meter_made_ahead_gives_the_first_readout_without_its_baselines(monkeypatch):
    """prepare_forget_set makes the faithfulness readout's meter (baselines, floor, corrupt runs);
    the session's first readout takes it: only the circuit's two ablated runs, the same numbers
    as a meter made in the click, and nothing held after."""
    import workbench.core.memo as memo
    import workbench.interpretability.faithfulness as faithfulness_module
    from workbench.experiments.flow import READOUT_METER
    from workbench.faces.session import Session

    cold = Session()
    cold.setup("facts-tiny")
    cold.attribute("atp", measure=False)
    expected = cold.measure_faithfulness()
    clear_base_memo()

    s = Session()
    s.setup("facts-tiny")
    model, split, _q = s.require()
    prepare_forget_set_default(model, split)
    assert READOUT_METER in memo._ONCE
    s.attribute("atp", measure=False)
    runs = []
    real = faithfulness_module.ablated_metric

    def ablated_metric(*args, **kwargs):
        runs.append(kwargs.get("keep"))
        return real(*args, **kwargs)

    monkeypatch.setattr(faithfulness_module, "ablated_metric", ablated_metric)
    monkeypatch.setattr(faithfulness_module, "metric_baselines", lambda *a, **k: pytest.fail("baselines again"))
    got = s.measure_faithfulness()
    assert len(runs) == 2 and READOUT_METER not in memo._ONCE  # the circuit's two ablated runs only
    assert got == expected


def prepare_forget_set_default(model, split):
    from workbench.experiments.flow import prepare_forget_set
    from workbench.faces.session import attribution_config

    return prepare_forget_set(model, split, attribution_config())


def test_undefined_faithfulness_holds_no_meter_and_fails_nothing_ahead(monkeypatch):
    """Pairs whose faithfulness is undefined: the background start holds no meter (and does not
    fail); the readout then says why itself, as without it."""
    import workbench.core.memo as memo
    import workbench.experiments.flow as flow
    from workbench.core.errors import WorkbenchError
    from workbench.interpretability.attribution import AttributionConfig
    from workbench.models.toy import toy_model

    class Undefined(flow.FaithfulnessMeter):
        def __init__(self, *args, **kwargs):
            raise WorkbenchError("faithfulness is undefined: ...")

    monkeypatch.setattr(flow, "FaithfulnessMeter", Undefined)
    model, split = toy_model("llama", n_kv_heads=2), _split()
    pairs = flow.prepare_forget_set(model, split, AttributionConfig(edges=True))
    assert flow.READOUT_METER not in memo._ONCE and flow.take_readout_meter(model, pairs) is None


def test_a_readout_meter_is_given_only_to_its_own_pairs_and_metric():
    """The held meter goes to a readout of the very pairs it measured with their metric only: not
    to the same pairs under another metric, nor to another pairs object of the same ids."""
    import dataclasses

    import workbench.experiments.flow as flow
    from workbench.interpretability.attribution import AttributionConfig
    from workbench.models.toy import toy_model

    model, split = toy_model("llama", n_kv_heads=2), _split()
    pairs = flow.prepare_forget_set(model, split, AttributionConfig(edges=True))
    assert flow.take_readout_meter(model, pairs.with_metric("logprob")) is None
    pairs = flow.prepare_forget_set(model, split, AttributionConfig(edges=True))
    assert flow.take_readout_meter(model, dataclasses.replace(pairs)) is None
    pairs = flow.prepare_forget_set(model, split, AttributionConfig(edges=True))
    assert flow.take_readout_meter(model, pairs) is not None


@pytest.mark.parametrize("meanwhile", ["run", "click"])
def test_nothing_is_held_when_a_run_or_click_came_while_the_start_worked(monkeypatch, meanwhile):
    """A run that starts (release_prepared), or a first readout and attribution that come
    (take_*), while the background start still makes the clean runs: the start then neither
    holds those nor makes the readout's meter (it would be held through the run's peak)."""
    import workbench.core.memo as memo
    import workbench.experiments.flow as flow
    from workbench.interpretability.attribution import AttributionConfig, CleanRuns
    from workbench.models.toy import toy_model

    model, split = toy_model("llama", n_kv_heads=2), _split()
    config = AttributionConfig(edges=True)
    real_clean_runs, meters = flow.clean_runs, []

    def clean_runs_while_asked(*args, **kwargs):
        if meanwhile == "run":
            flow.release_prepared()
        else:
            pairs = flow.forget_set_pairs(model, split, config)
            memo.take_once(flow.CLEAN_RUNS, CleanRuns.key_of(model, pairs, config), CleanRuns)
            flow.take_readout_meter(model, pairs)
        return real_clean_runs(*args, **kwargs)

    class CountedMeter(flow.FaithfulnessMeter):
        def __init__(self, *args, **kwargs):
            meters.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(flow, "clean_runs", clean_runs_while_asked)
    monkeypatch.setattr(flow, "FaithfulnessMeter", CountedMeter)
    flow.prepare_forget_set(model, split, config)
    assert memo._ONCE == {} and meters == []
