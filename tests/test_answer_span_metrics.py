"""Greedy exact match and answer log-probability of the five variants in ``measure_update``,
``metrics.json``, the report card's text and ``workbench compare`` (issue 16): the numbers are
``evaluate_facts``' on each variant, first-token top-1 is unchanged, old files still read."""

from __future__ import annotations

import pytest
import torch

import workbench.measurement.metrics as metrics_mod
from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact, FactSplit
from workbench.experiments.store import save_run
from workbench.faces.cli.runs import metrics_summary_text
from workbench.faces.compare import compare_row, comparison_markdown
from workbench.measurement.evaluation import evaluate_facts
from workbench.measurement.metrics import (
    VARIANTS,
    build_variants,
    measure_update,
    report_card_rows,
    summary_lines,
)
from workbench.measurement.results import SCHEMA_VERSION, ForgetRetain, RunMetrics, VariantAccuracies, VariantLogprobs
from workbench.models.update import Update
from workbench.quant import QuantConfig

pytestmark = pytest.mark.usefixtures("one_thread")

NF4 = QuantConfig("nf4")
WEIGHT = "transformer.h.0.mlp.c_fc.weight"


def _greedy(model, prompt: str, n: int) -> list[str]:
    """The model's own ``n`` greedy next words after ``prompt``."""
    ids = model.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(n):
            ids = [*ids, int(model.hf(torch.tensor([ids])).logits[0, -1].argmax())]
    return model.tokenizer.convert_ids_to_tokens(ids[-n:])


def _facts(model, start: int, n: int) -> tuple[tuple[Fact, ...], int]:
    """Two-word answers whose first word is the model's top-1: every other one its own greedy
    continuation (exact match), the rest with a wrong second word (top-1 right, exact wrong).
    Returns the facts and how many are the greedy continuation."""
    facts, own = [], 0
    for i in range(start, start + n):
        prompt = f"w{i} w{(7 * i) % 97} w{i + 1}"
        first, second = _greedy(model, prompt, 2)
        if not (first and second and first.startswith("w") and second.startswith("w")):
            continue
        if len(facts) % 2 == 0:
            own += 1
        else:
            second = next(w for w in ("w98", "w97") if w != second)
        facts.append(Fact(prompt, f"{first} {second}", ()))
    return tuple(facts), own


@pytest.fixture(scope="module")
def measured(toy_gpt2):
    forget, own_forget = _facts(toy_gpt2, 0, 12)
    retain, _ = _facts(toy_gpt2, 20, 16)
    split = FactSplit("span", forget=forget, retain=retain)
    base = toy_gpt2.state()[WEIGHT]
    update = Update({WEIGHT: 0.2 * torch.randn(base.shape, generator=torch.Generator().manual_seed(3))})
    return split, update, own_forget, measure_update(toy_gpt2, split, update, quant=NF4, cad=False)


def _as_run(measured_metrics) -> RunMetrics:
    return RunMetrics.of_update(measured_metrics, method="graddiff", model="toy", model_fingerprint="0" * 16,
                                split="span", n_forget=1, n_retain=1, steps=1, stopped="target", seconds=1.0,
                                unlearning_seconds=None, diagnostics={}, circuit=None)


def test_exact_and_logprob_are_evaluate_facts_of_each_variant(toy_gpt2, measured):
    split, update, own_forget, m = measured
    assert m.exact is not None and m.logprob is not None
    variants = build_variants(toy_gpt2, update, NF4)
    after_fp = update.apply(toy_gpt2)  # w+Δ built the plain way as well
    for name in VARIANTS:
        for sname, facts in (("forget", split.forget), ("retain", split.retain)):
            direct = evaluate_facts(variants[name], facts, multiple_choice=False)
            assert getattr(getattr(m.exact, sname), name) == direct.exact, (name, sname)
            assert getattr(getattr(m.logprob, sname), name) == direct.logprob, (name, sname)
            # first-token top-1 is still the very number evaluate_facts gives
            assert getattr(getattr(m, sname), name) == direct.top1, (name, sname)
            # a whole span right needs its first token right
            assert getattr(getattr(m.exact, sname), name) <= getattr(getattr(m, sname), name)
    plain = evaluate_facts(after_fp, split.forget, multiple_choice=False)
    assert (m.exact.forget.after_fp, m.logprob.forget.after_fp) == (plain.exact, plain.logprob)
    # the facts were built so that the base gets every first token and only the greedy ones whole
    assert m.forget.base_fp == 1.0
    assert m.exact.forget.base_fp == pytest.approx(own_forget / len(split.forget))
    assert 0.0 < m.exact.forget.base_fp < m.forget.base_fp
    assert m.logprob.forget.base_fp < 0.0
    assert len(set(m.logprob.forget.by_variant().values())) > 1, "the update moved no log-probability"


def test_no_extra_evaluation_for_the_span_metrics(toy_gpt2, measured, monkeypatch):
    """Exact match and log-probability come from the one evaluation per variant and set."""
    split, update, _, m = measured
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return evaluate_facts(*args, **kwargs)

    monkeypatch.setattr(metrics_mod, "evaluate_facts", counted)
    again = measure_update(toy_gpt2, split, update, quant=NF4, cad=False)
    assert len(calls) == len(VARIANTS) * 2  # forget and retain, no paraphrases in this split
    assert (again.forget, again.retain, again.exact, again.logprob) == (m.forget, m.retain, m.exact, m.logprob)


def test_metrics_json_carries_them_and_reads_them_back(measured):
    *_, m = measured
    j = m.to_json()
    for key, scores in (("exact", m.exact), ("logprob", m.logprob)):
        assert scores is not None
        assert j[key] == {"forget": scores.forget.by_variant(), "retain": scores.retain.by_variant()}
    run = _as_run(m)
    back = RunMetrics.from_json(run.to_json(), source="x")
    assert back == run and back.schema_version == SCHEMA_VERSION >= 3
    assert isinstance(back.exact, ForgetRetain) and isinstance(back.exact.forget, VariantAccuracies)
    assert isinstance(back.logprob, ForgetRetain) and isinstance(back.logprob.retain, VariantLogprobs)


def test_files_without_the_span_keys_read_as_absent(metrics_v1_json, run_metrics):
    assert run_metrics.exact is None and run_metrics.logprob is None
    v2 = RunMetrics.from_json({**metrics_v1_json, "schema_version": 2}, source="x")
    assert v2.exact is None and v2.logprob is None and v2.schema_version == 2
    assert "exact" not in run_metrics.to_json() and "logprob" not in v2.to_json()
    # nothing printed about them for an old run
    assert not any("exact match" in line or "log-prob" in line for line in summary_lines(run_metrics))


def test_a_broken_span_key_is_named(measured):
    *_, m = measured
    j = _as_run(m).to_json()
    del j["exact"]["forget"]["after_q"]
    with pytest.raises(WorkbenchError, match=r"x: 'exact\.forget\.after_q' is missing"):
        RunMetrics.from_json(j, source="x")
    j = _as_run(m).to_json()
    j["logprob"]["retain"]["base_q"] = "low"
    with pytest.raises(WorkbenchError, match=r"'logprob\.retain\.base_q' must be a number"):
        RunMetrics.from_json(j, source="x")


def test_report_card_text_names_the_metrics(measured):
    *_, m = measured
    run = _as_run(m)
    assert m.exact is not None and m.logprob is not None
    lines = summary_lines(run)
    exact_line = next(line for line in lines if line.startswith("greedy exact match"))
    f, r = m.exact.forget, m.exact.retain
    assert (f"forget fp {f.after_fp:.3f} · quantized {f.after_q:.3f} · "
            f"retain fp {r.after_fp:.3f} · quantized {r.after_q:.3f}") in exact_line
    assert "first-token top-1" in exact_line
    logprob_line = next(line for line in lines if line.startswith("answer log-prob"))
    assert f"forget fp {m.logprob.forget.after_fp:.3f} · quantized {m.logprob.forget.after_q:.3f}" in logprob_line
    # the card's forgetting property still says what it judges
    assert report_card_rows(m)[0]["property"] == "forgetting (first-token top-1, fp and quantized)"
    # workbench unlearn / report: every variant, each metric named
    text = metrics_summary_text(run)
    for label in ("forget top-1", "retain top-1", "forget exact match", "retain exact match",
                  "forget answer log-prob", "retain answer log-prob"):
        assert label in text, label
    row = next(line for line in text.splitlines() if line.startswith("forget answer log-prob"))
    assert f"{m.logprob.forget.after_q:.3f}" in row


def test_compare_shows_forget_exact_when_runs_have_it(tmp_path, measured, run_metrics):
    *_, m = measured
    new = save_run(config={"method": "graddiff", "model": "toy"}, metrics=_as_run(m), update=Update({}),
                   run_id="new", root=tmp_path)
    old = save_run(config={"method": "mansu", "model": "facts-tiny"}, metrics=run_metrics, update=Update({}),
                   run_id="old", root=tmp_path)
    assert m.exact is not None
    row_new, row_old = compare_row(new), compare_row(old)
    assert (row_new["forget exact fp"], row_new["forget exact Q"]) == (m.exact.forget.after_fp, m.exact.forget.after_q)
    assert row_old["forget exact fp"] is None and row_old["forget exact Q"] is None
    header = comparison_markdown([row_new, row_old]).splitlines()[0]
    assert "forget exact fp" in header and "forget exact Q" in header
    assert "forget exact" not in comparison_markdown([row_old]).splitlines()[0]  # no run has them: no column
