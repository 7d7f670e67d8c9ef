"""The app's HTTP API through ``gradio_client``: the same flow as the browser test
(setup → attribution → an edit → MANSU → report card → runs), one client = one session."""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="module")
def client(app_server):
    from gradio_client import Client

    return Client(app_server, verbose=False)


def _rows(table) -> list[list]:
    return table["value"]["data"] if "value" in table else table["data"]


def test_api_lists_only_the_public_endpoints(client):
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/setup", "/attribute", "/top_k", "/exclude", "/undo", "/unlearn", "/ablations", "/faithfulness", "/runs",
            "/run_files"} <= endpoints
    assert not any(e.startswith("/lambda") for e in endpoints)  # timers and page-load helpers stay private


def test_api_flow(client):
    from gradio_client.exceptions import AppError

    summary, accuracy, domain = client.predict("facts-tiny", None, None, None, "nf4", 64, False, api_name="/setup")
    assert "facts-tiny" in summary and "nf4/b64" in summary
    rows = {r[0]: r for r in _rows(accuracy)}
    assert rows["forget"][1] == 24 and 0.0 <= rows["forget"][3] <= 1.0
    assert domain["value"] == "pathogens"

    out = client.predict("atp", 8, True, api_name="/attribute")
    assert "24 prompt pairs" in out[0] and "10 components selected" in out[3]
    nodes = _rows(out[4])
    assert sum(1 for r in nodes if r[0]) == 10

    picked = client.predict(2, api_name="/fact")  # one fact's own heads/MLPs
    assert picked[0] is not None and len(_rows(picked[1])) == 10
    text, _plot = client.predict(3, "corrupt", "logit_diff", api_name="/faithfulness_curve")
    assert "k=1:" in text and "k=3:" in text

    out = client.predict(3, api_name="/top_k")
    assert "3 components selected" in out[2]
    readout = client.predict(api_name="/faithfulness")  # an edit returns at once; the readout follows
    assert readout.startswith("**3 components selected.** Faithfulness (") and "recovers" in readout
    chosen = next(r[1] for r in _rows(out[3]) if r[0])
    out = client.predict(chosen, api_name="/exclude")
    assert "2 components selected" in out[2]
    assert not any(r[0] and r[1] == chosen for r in _rows(out[3]))
    with pytest.raises(AppError, match="L9.H9 is not in the list of choices"):  # Gradio checks the picker
        client.predict("L9.H9", api_name="/include")

    live, *compare = client.predict("mansu", True, True, True, True, 3, 0.05, 0, 0.1, 2, 0, 100, "", True, True,
                                    "overall", "fp", api_name="/unlearn")
    summary = compare[1]
    report = _rows(compare[2])
    runs, run_pick = compare[-2], compare[-1]
    assert "MANSU round" in live and "PTQ gap" in summary
    assert [r[0] for r in report] == ["forgetting (first-token top-1, fp and quantized)", "retain preserved",
                                      "PTQ gap ≤ threshold", "structural erasure (CAD)"]
    assert all(r[1] in ("PASS", "fail") for r in report)
    run_id = run_pick["value"]
    assert run_id in summary and any(r[0] == run_id for r in _rows(runs))

    files = client.predict(run_id, api_name="/run_files")
    assert sorted(f.rsplit("/", 1)[-1] for f in files) == ["config.json", "metrics.json", "update.safetensors"]

    # Which ablation would have passed: MANSU re-run with each of its four components off, each saved.
    text, runs_after, _pick = client.predict(api_name="/ablations")
    lines = text.splitlines()
    assert lines[0].startswith(("- MANSU without its", "- no ablation passes", "- the full method passes"))
    if "fail" in [r[1] for r in report]:
        assert [line.split(":")[0] for line in lines if line.startswith("- without the")] == [
            "- without the circuit", "- without the projection", "- without the fisher", "- without the floor"]
    assert len(_rows(runs_after)) == len(_rows(runs)) + 4

    # A run that would take thousands of rounds (one weight each), cancelled from a second request
    # of the same session.
    n_runs = len(_rows(client.predict(api_name="/runs")[0]))
    job = client.submit("mansu", True, True, True, True, 5000, 0.05, 1, 0.0, 2, 0, 100, "", True, True, "overall", "fp",
                        api_name="/unlearn")
    deadline = time.monotonic() + 120
    while client.predict(api_name="/cancel") != "Cancelling at the next step…":
        assert time.monotonic() < deadline and not job.done(), "the run never started"
        time.sleep(0.5)
    with pytest.raises(AppError, match="the run was cancelled; nothing was saved") as info:
        job.result(timeout=120)
    assert info.value.title == "Run cancelled"
    assert len(_rows(client.predict(api_name="/runs")[0])) == n_runs  # nothing saved for the cancelled run


def test_api_errors_are_messages(client):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    fresh = Client(client.src, verbose=False)  # a new session: nothing loaded yet
    with pytest.raises(AppError, match="Run attribution"):
        fresh.predict(3, api_name="/top_k")
    with pytest.raises(AppError, match="neither a built-in"):
        fresh.predict("/no/such/model", None, None, None, "nf4", 64, False, api_name="/setup")


def test_errors_become_page_messages_never_tracebacks(caplog):
    """User errors keep their message (HTML-escaped); anything else is logged, the page gets a note."""
    import gradio as gr

    from workbench.core.errors import WorkbenchError
    from workbench.faces.app import friendly

    @friendly
    def user_error():
        raise WorkbenchError("broken.jsonl, line 2: <b>bad</b> field")

    @friendly
    def bug():
        raise KeyError("secret internal detail")

    with pytest.raises(gr.Error) as info:
        user_error()
    assert info.value.message == "broken.jsonl, line 2: &lt;b&gt;bad&lt;/b&gt; field"
    with caplog.at_level("ERROR", logger="workbench.app"), pytest.raises(gr.Error) as info:
        bug()
    assert "KeyError" in info.value.message and "secret internal detail" not in info.value.message
    assert "server log" in info.value.message
    # The server log keeps the exception itself (every log.exception record has *some* exc_info: check which).
    logged = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert any(isinstance(e, KeyError) and "secret internal detail" in str(e) for e in logged), logged


def test_the_live_plot_is_redrawn_only_when_a_record_came():
    import gradio as gr

    from workbench.faces.app import on_live_tick
    from workbench.faces.session import Session

    s = Session()
    _text, plot, drawn = on_live_tick(s, 0)
    assert plot == gr.skip() and drawn == 0  # nothing yet: nothing drawn
    s.live_records.append({"step": 1, "forget_top1": 0.5, "forget_top1_q": 0.6})
    _text, plot, drawn = on_live_tick(s, 0)
    assert drawn == 1 and [list(t.y) for t in plot.data] == [[0.5], [0.6]]
    _text, plot, drawn = on_live_tick(s, 1)
    assert plot == gr.skip() and drawn == 1
