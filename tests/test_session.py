"""The app's session logic without a browser: setup, attribution, circuit edits, unlearning,
compare views, runs — on facts-tiny, through the same core calls the CLI makes."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest

from workbench.core.errors import WorkbenchError
from workbench.faces.session import (
    MAX_UPLOAD_BYTES,
    SHARED,
    RunView,
    Session,
    SharedModels,
    compare_figures,
    read_fact_upload,
    runs_table,
    shared_figures,
)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("session-runs")


@pytest.fixture(scope="module")
def attributed(runs_root):
    """A session set up on facts-tiny with an attribution (shared by the read-mostly tests)."""
    s = Session(runs_root=runs_root)
    s.setup("facts-tiny")
    s.attribute("atp", edges=True)
    return s


def test_setup_builtin_split_and_base_accuracy():
    s = Session()
    result = s.setup("facts-tiny", quant_type="fp4", blocksize=128)
    assert s.quant.label == "fp4/b128"
    rows = {r["set"]: r for r in result.accuracy}
    assert {"forget", "retain"} <= set(rows)
    assert rows["forget"]["facts"] == len(s.split.forget) > 0
    for r in rows.values():
        assert 0.0 <= r["full precision"] <= 1.0 and 0.0 <= r["fp4/b128"] <= 1.0
        assert r["difference"] == pytest.approx(r["fp4/b128"] - r["full precision"])
    assert "pathogens" in result.domains and result.domain == "pathogens"
    assert "facts-tiny" in result.summary and "fp4/b128" in result.summary


def test_setup_other_forget_domain():
    s = Session()
    result = s.setup("facts-tiny", forget_domain="cities")
    assert result.domain == "cities"
    assert {f.domain for f in s.split.forget} == {"cities"}


def test_sessions_share_one_read_only_model(attributed):
    other = Session()
    other.setup("facts-tiny")
    assert other.model is attributed.model  # one base model per name, process-wide


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"quant_type": "nf5"}, "unknown quantizer"),
        ({"blocksize": 48}, "not supported"),
        ({"blocksize": "big"}, "whole number"),
    ],
)
def test_setup_rejects_bad_quantizer(kwargs, needle):
    with pytest.raises(WorkbenchError, match=needle):
        Session().setup("facts-tiny", **kwargs)


def test_setup_unknown_model_and_local_dir_without_data(tmp_path):
    with pytest.raises(WorkbenchError, match="neither a built-in"):
        Session().setup(str(tmp_path / "nope"))
    with pytest.raises(WorkbenchError, match="choose a model"):
        Session().setup("  ")


def _write_split_files(split, tmp_path):
    from workbench.data.files import save_fact_file

    forget = save_fact_file(split.forget[:6], tmp_path / "forget.jsonl")
    retain = save_fact_file(split.retain[:10], tmp_path / "retain.jsonl")
    return forget, retain


def test_setup_with_uploaded_files(attributed, tmp_path):
    forget, retain = _write_split_files(attributed.split, tmp_path)
    s = Session()
    result = s.setup("facts-tiny", forget_file=forget, retain_file=retain)
    assert s.split.name == "user:forget.jsonl"
    assert len(s.split.forget) == 6 and len(s.split.retain) == 10
    assert result.domains == [] and result.domain is None
    with pytest.raises(WorkbenchError, match="both a forget file and a retain file"):
        Session().setup("facts-tiny", forget_file=forget)


def test_malformed_upload_names_file_and_line(tmp_path, attributed):
    bad = tmp_path / "upload-dir" / "broken.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"prompt": "The sky is", "answer": "blue"}\n{"prompt": "no answer here"\n')
    with pytest.raises(WorkbenchError) as info:
        read_fact_upload(bad, "forget file")
    message = str(info.value)
    assert "broken.jsonl" in message and "line 2" in message
    assert str(bad.parent) not in message  # the server's temporary directory is not shown
    with pytest.raises(WorkbenchError, match="line 2"):
        Session().setup("facts-tiny", forget_file=bad, retain_file=bad)


def test_upload_limits(tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_bytes(b" " * (MAX_UPLOAD_BYTES + 1))
    with pytest.raises(WorkbenchError, match="limit"):
        read_fact_upload(big, "forget file")
    wrong = tmp_path / "facts.pkl"
    wrong.write_bytes(b"\x80\x04N.")
    with pytest.raises(WorkbenchError, match="expected a"):
        read_fact_upload(wrong, "forget file")


def test_upload_checks_tokens_against_the_model(tmp_path, attributed):
    f = tmp_path / "multi.jsonl"
    f.write_text(json.dumps({"prompt": "The vector of Veltrax is", "answer": "certainly not one token"}) + "\n")
    read_fact_upload(f, "forget file")  # format only: fine
    with pytest.raises(WorkbenchError, match="token"):
        read_fact_upload(f, "forget file", attributed.model)


def test_steps_before_setup_say_what_to_do():
    s = Session()
    with pytest.raises(WorkbenchError, match="Load model and data"):
        s.attribute()
    with pytest.raises(WorkbenchError, match="Load model and data"):
        s.unlearn("mansu")
    with pytest.raises(WorkbenchError, match="Run attribution"):
        s.edit("top_k", 3)
    with pytest.raises(WorkbenchError, match="pin"):
        s.pin()


def test_skipped_steps_run_with_the_defaults_and_say_so(runs_root):
    """With the app's start model as the default, attribution or MANSU as the first action loads
    it (built-in split, NF4) and, for MANSU, attributes the default circuit; ``assumed`` says so."""
    s = Session(runs_root=runs_root, default_model="facts-tiny")
    view = s.unlearn("mansu", mansu={"max_rounds": 2}, measure_cad=False, use_oracle=False)
    assert s.model is not None and s.model.name == "facts-tiny" and s.quant is not None and s.quant.label == "nf4/b64"
    assert view.metrics.method == "mansu" and view.metrics.properties.forgetting.verdict in ("PASS", "fail")
    assert len(s.assumed) == 2 and "facts-tiny" in s.assumed[0] and "default one" in s.assumed[1]
    assert s.live_text().startswith(s.assumed[0]) and "elapsed" in s.live_text()
    # once set up, nothing more is assumed
    s.attribute()
    assert s.assumed == [] and s.circuit is not None


def test_time_left_is_a_linear_estimate_from_the_progress():
    from workbench.faces.session import _time_line

    now = time.monotonic()
    assert _time_line(now - 60, 0.25) == "elapsed 1:00 · about 3:00 left"
    assert _time_line(now - 5, 0.0) == "elapsed 0:05"  # too early to estimate
    assert _time_line(now - 90, 1.0) == "elapsed 1:30"


def test_attribution_gives_default_circuit_and_faithfulness(attributed):
    s = attributed
    from workbench.experiments.flow import DEFAULT_TOP_K

    assert s.circuit is not None and s.attribution.n_pairs > 0
    # The CLI's start, computed here from the scores (not by the call the session itself made):
    # the ten heads/MLPs of largest |score|, embeddings excluded.
    ranked = sorted((c for c in s.attribution.scores if c.kind.value in ("head", "mlp")),
                    key=lambda c: -abs(s.attribution.scores[c]))
    assert set(s.circuit.selected) == set(ranked[:DEFAULT_TOP_K])
    assert any(c.kind.value == "embed" for c in s.attribution.scores)  # scored, yet never in the start circuit
    # facts-tiny's forget pairs separate clean from corrupt, so faithfulness is defined and measured.
    assert s.faithfulness_error is None and s.faithfulness_result is not None
    assert len(s.circuit.selected) > 0 and math.isfinite(s.faithfulness_result.recovered)
    rows = s.node_rows()
    assert [abs(r["score"]) for r in rows] == sorted((abs(r["score"]) for r in rows), reverse=True)
    assert {r["component"] for r in rows if r["in circuit"]} == {c.name for c in s.circuit.selected}
    graph, heat = s.circuit_figures()
    assert any(t.name == "selected" for t in graph.data) and heat.data[0].type == "heatmap"


def test_edits_undo_redo_and_live_faithfulness(attributed):
    s = Session()
    s.setup("facts-tiny")
    s.attribute("atp", edges=False)
    s.edit("top_k", 3)
    assert len(s.circuit.selected) == 3
    before = s.faithfulness_result
    strongest = max(s.circuit.selected, key=lambda c: abs(s.circuit.scores[c]))
    after = s.edit("exclude", strongest.name)
    assert strongest not in s.circuit.selected and len(s.circuit.selected) == 2
    assert (after.recovered, after.drop) != (before.recovered, before.drop)  # measured again, on the new circuit
    assert "2 components selected" in s.faithfulness_text()
    s.edit("undo")
    assert strongest in s.circuit.selected and s.faithfulness_result.drop == pytest.approx(before.drop)
    s.edit("redo")
    assert strongest not in s.circuit.selected
    with pytest.raises(WorkbenchError, match="nothing to redo"):
        s.edit("redo")
    s.edit("threshold", 0.0)
    assert len(s.circuit.selected) == len([c for c in s.circuit.components if c.kind.value != "embed"])
    s.edit("mass", 0.5)
    assert 0 < len(s.circuit.selected) < len(s.circuit.components)
    with pytest.raises(WorkbenchError, match="whole number"):
        s.edit("top_k", 2.5)
    with pytest.raises(WorkbenchError, match="threshold must be a number"):
        s.edit("threshold", "high")
    with pytest.raises(WorkbenchError, match="mass fraction must be finite"):
        s.edit("mass", float("nan"))
    with pytest.raises(WorkbenchError, match="not in this circuit"):
        s.edit("include", "L9.H9")
    with pytest.raises(WorkbenchError, match="choose a component"):
        s.edit("exclude", None)


def test_an_edit_can_leave_the_readout_to_follow(attributed):
    """The app redraws the circuit at once and measures faithfulness in a second step: until
    then the readout says so instead of showing the previous selection's numbers."""
    s = Session()
    s.setup("facts-tiny")
    s.attribute("atp", edges=False)
    s.edit("top_k", 3)
    measured = s.faithfulness_result
    assert s.faithfulness_is_current and "recovers" in s.faithfulness_text()
    assert s.edit("top_k", 2, measure=False) is None
    assert not s.faithfulness_is_current
    assert s.faithfulness_text() == "**2 components selected.** Faithfulness: measuring…"
    follow = s.measure_faithfulness()
    assert s.faithfulness_is_current and "recovers" in s.faithfulness_text()
    assert follow is not None and (follow.recovered, follow.drop) != (measured.recovered, measured.drop)
    assert follow == s.edit("top_k", 2)  # the same numbers as measuring with the edit
    s.edit("top_k", 3, measure=False)
    s.edit("top_k", 2, measure=False)  # back to the measured selection: the readout is current again
    assert s.faithfulness_is_current and s.faithfulness_result == follow


def test_the_readout_measures_on_the_attributed_pairs_and_keeps_their_baselines(monkeypatch):
    """Faithfulness after attribution and after each edit is measured on the very pairs attributed,
    its baselines (means, clean/baseline metrics, the floor) taken once per attribution: the same
    numbers as :func:`faithfulness` measuring from scratch, at two ablated runs per edit. The pairs'
    corrupt runs are kept with them, let go when unlearning starts and taken again after."""
    import workbench.interpretability.faithfulness as faith
    from workbench.interpretability.attribution import make_prompt_pairs

    built = []
    real = faith.FaithfulnessMeter.__init__

    def counting(self, *args, **kwargs):
        built.append(args[1])
        real(self, *args, **kwargs)

    monkeypatch.setattr(faith.FaithfulnessMeter, "__init__", counting)
    s = Session()
    s.setup("facts-tiny")
    s.attribute("atp", edges=False)
    pairs = s.pairs
    assert built == [pairs]  # the attribution's own pairs, not a second making of them
    results = {}
    for k in (3, 2, 5):
        results[k] = s.edit("top_k", k)
        fresh = faith.faithfulness(s.circuit, s.model, make_prompt_pairs(s.model, s.split.forget))
        assert results[k] == fresh
    # four meters: the three from-scratch measurements above and the session's one (none per edit)
    assert len(built) == 4 and built[0] is pairs and s.pairs is pairs
    s.attribute("atp", edges=False)  # the same forget set again: its (memoised) pairs, baselines kept
    assert s.pairs is pairs and len(built) == 4
    s.attribute("atp", edges=False, baseline="mean")  # other pairs: their own baselines
    assert s.pairs is not pairs and len(built) == 5 and built[-1] is s.pairs
    s.attribute("atp", edges=False)
    assert s.pairs is pairs and len(built) == 6 and built[-1] is pairs  # the session keeps one meter
    assert s._meter is not None and s._meter.keeps_corrupt_runs  # facts-tiny's are far under the cap
    s.unlearn("mansu", mansu={"max_rounds": 1}, measure_cad=False, use_oracle=False)
    assert not s._meter.keeps_corrupt_runs  # let go for the run; the baselines stay
    assert s.edit("top_k", 3) == results[3] and s._meter.keeps_corrupt_runs  # taken again, same numbers
    # The faithfulness curve on the readout's ablation and metric reuses its meter, same curve.
    n_built = len(built)
    curve, _fig = s.faithfulness_curve(4)
    assert len(built) == n_built
    assert curve == faith.faithfulness_curve(s.attribution, s.model, s.pairs, max_k=4, metric="logit_diff")
    s.faithfulness_curve(3, ablation="mean")  # another ablation: its own meter
    assert len(built) == n_built + 2  # that one, and the from-scratch curve's above
    with pytest.raises(WorkbenchError, match="meter given was measured on another"):
        faith.faithfulness_curve(s.attribution, s.model, s.pairs, max_k=2, ablation="mean", meter=s._meter)


def test_attribution_can_leave_the_readout_to_follow():
    """"Run attribution" in the app draws the new circuit first: its faithfulness is measured
    next, and a readout measured for the previous attribution's circuit (even with the same
    components) is not shown as this one's."""
    s = Session()
    s.setup("facts-tiny")
    s.attribute("atp", edges=False)
    measured = s.faithfulness_result
    assert s.faithfulness_is_current and measured is not None
    s.attribute("atp", edges=False, measure=False)  # same method, same default selection
    assert not s.faithfulness_is_current
    assert s.faithfulness_text().endswith("Faithfulness: measuring…")
    assert s.measure_faithfulness() == measured and s.faithfulness_is_current


def test_node_table_sets_the_selection(attributed):
    s = Session()
    s.setup("facts-tiny")
    s.attribute("atp", edges=False)
    rows = [[r["in circuit"], r["component"]] for r in s.node_rows()]
    assert s.apply_node_table(rows) is False  # unchanged table: no undo step
    rows = [[name in ("L0.H1", "L1.MLP"), name] for _flag, name in rows]
    assert s.apply_node_table(rows) is True
    assert {c.name for c in s.circuit.selected} == {"L0.H1", "L1.MLP"}
    assert s.circuit.can_undo


def test_two_sessions_keep_separate_circuits():
    a, b = Session(), Session()
    for s in (a, b):
        s.setup("facts-tiny")
        s.attribute("atp", edges=False)
    a.edit("top_k", 2)
    assert len(a.circuit.selected) == 2 and len(b.circuit.selected) != 2
    assert a.circuit is not b.circuit and a.model is b.model


def test_circuit_download_upload_roundtrip(attributed, tmp_path):
    s = Session()
    s.setup("facts-tiny")
    s.attribute("atp", edges=False)
    s.edit("top_k", 4)
    path = s.save_circuit()
    assert json.loads(path.read_text())["kind"] == "mansu-workbench-circuit"
    t = Session()
    t.setup("facts-tiny")
    t.load_circuit(path)
    assert t.circuit.selected == s.circuit.selected and t.faithfulness_result is not None
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(WorkbenchError, match="garbage.json"):
        t.load_circuit(garbage)
    other = json.loads(path.read_text())
    other["model_fingerprint"] = "0" * 16
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(other))
    with pytest.raises(WorkbenchError, match="fingerprint"):
        t.load_circuit(foreign)
    s.close()
    assert not path.exists()


def test_agreement_with_exact_patching(attributed):
    numbers, figure = attributed.agreement("exact")
    assert numbers["n"] >= 10 and -1.0 <= numbers["spearman"] <= 1.0
    assert "Spearman" in figure.layout.title.text
    with pytest.raises(WorkbenchError, match="already uses"):
        attributed.agreement("atp")


def test_unlearn_compare_and_runs(attributed, runs_root):
    s = attributed
    base_hash = s.model.weights_hash()
    seen = []
    drawn = []  # what the live plot shows at each progress message: the rounds recorded so far

    def progress(f, m):
        seen.append((f, m))
        figure = s.live_figure()
        drawn.append(None if figure is None else list(figure.data[0].y))

    view = s.unlearn("mansu", mansu={"max_rounds": 2}, progress=progress)
    assert s.model.weights_hash() == base_hash  # the shared base is never modified
    assert any("MANSU round" in m for _f, m in seen) and "MANSU round" in s.live_text()
    # the live plot grew round by round, and ends as the run's history
    first_round = next(i for i, (_f, m) in enumerate(seen) if m.startswith("MANSU round 1:"))
    assert drawn[first_round - 1] is None and drawn[first_round] == [view.history[0]["forget_top1"]]
    assert s.live_records == list(view.history)
    m = view.metrics
    assert m.method == "mansu" and m.steps <= 2 and view.run_id and (runs_root / view.run_id).is_dir()
    assert [name for name, _ in m.properties.items()] == ["forgetting", "retain", "ptq", "structural"]

    figs = compare_figures(view, "overall", "fp")
    assert [t.type for t in figs.occupancy.data] == ["bar", "bar", "bar"]
    before, after = figs.occupancy.data[0].y, figs.occupancy.data[1].y
    assert sum(before) == sum(after) == m.quantization["overall"]["n_weights"]
    assert figs.cad is not None and len(figs.cad.data) == 3  # before | after | difference
    assert next(r["property"] for r in figs.report).startswith("forgetting") and len(figs.report) == 4
    # beside the card, named: greedy exact match and answer log-prob, fp and quantized
    assert m.exact is not None and f"greedy exact match (whole answer): forget fp {m.exact.forget.after_fp:.3f}" \
        f" · quantized {m.exact.forget.after_q:.3f}" in figs.summary
    assert "answer log-prob" in figs.summary
    module = view.modules[1]
    assert module in compare_figures(view, module).occupancy.layout.title.text

    s.pin()
    graddiff = s.unlearn("graddiff", stop={"max_steps": 2, "forget_target": None}, measure_cad=False,
                         use_oracle=False)
    assert graddiff.metrics.method == "graddiff" and s.pinned is view
    accuracy, _ratios, steps = shared_figures([s.current, s.pinned])
    assert len({t.name for t in accuracy.data}) == 2
    # forget/retain over the steps: the graddiff run's records as saved (its last step read retain too)
    assert s.current.history and list(s.current.history) == json.loads((graddiff.path / "history.json").read_text())
    retain_fp = next(t for t in steps.data if t.name.endswith("full precision") and t.xaxis == "x2"
                     and t.name.startswith(graddiff.label))
    assert list(retain_fp.x) == [2] and list(retain_fp.y) == [s.current.history[-1]["retain_top1"]]
    assert compare_figures(graddiff).cad is None and compare_figures(graddiff).notes  # measured without CAD

    rows = runs_table(runs_root)
    assert {r["run"] for r in rows} >= {view.run_id, graddiff.run_id}
    reopened = s.open_run(view.run_id)
    assert reopened.metrics == m
    names = {p.name for p in s.run_files(view.run_id)}
    assert names == {"metrics.json", "config.json", "update.safetensors"}
    with pytest.raises(WorkbenchError, match="invalid run id"):
        s.open_run("../etc")


def test_unlearn_rejects_bad_settings(attributed):
    with pytest.raises(WorkbenchError, match="unknown method"):
        attributed.unlearn("nope")
    with pytest.raises(WorkbenchError, match="max_rounds"):
        attributed.unlearn("mansu", mansu={"max_rounds": 0})
    with pytest.raises(WorkbenchError, match="bad hyper-parameter"):
        attributed.unlearn("mansu", mansu={"rounds": 3})


def test_cancel_stops_a_run_and_saves_nothing(tmp_path):
    s = Session(runs_root=tmp_path)
    s.setup("facts-tiny")
    s.attribute("atp", edges=False)
    assert s.cancel() is False  # nothing running

    def progress(_f: float, message: str) -> None:
        if "round" in message:
            assert s.cancel() is True

    with pytest.raises(WorkbenchError, match="cancelled"):
        s.unlearn("mansu", mansu={"max_rounds": 50, "forget_target": 0.0}, progress=progress)
    assert not s.running and s.cancel_requested and runs_table(tmp_path) == []


def test_shared_models_preload_status():
    shared = SharedModels()
    assert shared.status("facts-tiny") == "not loaded"
    shared.preload("facts-tiny")
    shared.wait("facts-tiny", timeout=120)
    assert shared.status("facts-tiny") == "ready"
    shared.preload("/no/such/model")
    shared.wait("/no/such/model", timeout=30)
    assert shared.status("/no/such/model").startswith("error:")


def test_every_heavy_step_hands_freed_memory_back(runs_root, monkeypatch):
    """The app's clicks (and the start model's background preload) return what glibc kept of their
    transients when they end, failed or not, so it is not resident between clicks."""
    import workbench.faces.session as session_mod
    from workbench.core import allocator

    calls: list[str] = []
    # every one collects first: a click or a preload step may have let go of models (bridges are cyclic)
    monkeypatch.setattr(allocator, "hand_back_freed_memory",
                        lambda collect=False: calls.append("step" * collect) or True)
    monkeypatch.setattr(session_mod, "hand_back_freed_memory",
                        lambda collect=False: calls.append("preload" * collect) or True)
    s = Session(runs_root=runs_root)
    with pytest.raises(WorkbenchError):
        s.setup("facts-tiny", quant_type="int3")
    assert calls == ["step"]
    s.setup("facts-tiny")
    s.attribute("atp", edges=False, measure=False)  # the app's click: the readout follows it
    s.measure_faithfulness()
    s.faithfulness_curve(2)
    s.agreement("exact")
    assert calls == ["step"] * 6
    s.attribute("atp", edges=False)  # measuring inside: trimmed after each, harmless
    assert calls == ["step"] * 8
    path = s.save_circuit()
    s.load_circuit(path)  # an upload: its prompt pairs and readout
    s.unlearn("mansu", mansu={"max_rounds": 1}, measure_cad=False, use_oracle=False)
    assert calls == ["step"] * 11  # the upload and its readout, the run
    shared = SharedModels()
    shared.preload("facts-tiny")
    shared.wait("facts-tiny", timeout=120)
    # the preload: after the base accuracies, after the base's CAD attributions, at its end
    assert shared.status("facts-tiny") == "ready" and calls == ["step"] * 11 + ["preload"] * 3


def test_shared_base_accuracy_is_computed_once(attributed, monkeypatch):
    calls = []
    import workbench.faces.session as session_mod  # the base_scores the session calls

    real = session_mod.base_scores
    monkeypatch.setattr(session_mod, "base_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared = SharedModels()
    results = []
    threads = [threading.Thread(target=lambda: results.append(shared.base_accuracy(
        attributed.model, attributed.split, attributed.quant))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1] == results[2]  # once for 3 sessions
    assert SHARED is not shared


def test_runview_modules(run_metrics):
    from dataclasses import replace

    view = RunView(label="x", metrics=replace(run_metrics, quantization={"modules": [{"name": "a.weight"}]}))
    assert view.modules == ["overall", "a.weight"]


def test_baseline_with_its_own_settings(attributed):
    from workbench.faces.session import method_settings

    assert method_settings("mansu") == {} and method_settings("graddiff") == {}
    defaults = method_settings("rmu")
    assert "steering_scale" in defaults
    view = attributed.unlearn("rmu", settings=json.dumps({**defaults, "steering_scale": 2.0}),
                              stop={"max_steps": 2, "forget_target": None}, measure_cad=False, use_oracle=False)
    assert view.metrics.method == "rmu" and view.metrics.steps == 2
    assert json.loads((view.path / "config.json").read_text())["method_config"]["steering_scale"] == 2.0
    with pytest.raises(WorkbenchError, match="not valid JSON"):
        attributed.unlearn("rmu", settings="{steering_scale: 2")
    with pytest.raises(WorkbenchError, match="bad hyper-parameter"):
        attributed.unlearn("rmu", settings={"no_such_field": 1})
    with pytest.raises(WorkbenchError, match="no settings of its own"):
        attributed.unlearn("graddiff", settings={"alpha": 1})


def test_per_fact_view_baseline_and_faithfulness_curve(attributed):
    s = attributed
    s.attribute("atp", edges=False, baseline="resample")
    a = s.attribution
    assert a.baseline == "resample" and a.n_dropped == 0
    assert "resample baseline" in s.attribution_text() and "0 dropped" in s.attribution_text()
    assert s.pairs is not None and s.pairs.baseline == "resample"  # faithfulness uses the same baselines
    choices = s.fact_choices()
    assert len(choices) == a.n_pairs and choices[1] == (f"1: {a.pair_prompts[1]}", 1)
    figure, rows = s.fact_view(1)
    assert figure.data[0].type == "heatmap" and a.pair_prompts[1] in figure.layout.title.text
    own = a.for_fact(1)
    assert rows[0]["score"] == pytest.approx(max(own.values(), key=abs), abs=1e-6)
    with pytest.raises(WorkbenchError, match="fact index"):
        s.fact_view(a.n_pairs)
    curve, fig = s.faithfulness_curve(4, ablation="mean", metric="logprob")
    assert curve.ks == (1, 2, 3, 4) and curve.metric == "logprob" and len(fig.data) == 2
    assert list(fig.data[0].y) == list(curve.recovered)
    s.attribute("atp", edges=False)  # back to the shared fixture's state
