"""Browser tests of the Gradio app: Playwright drives Debian's Chromium against ``app.py`` on
127.0.0.1 (facts-tiny). Screenshots of every step go to ``test-artifacts/app/`` (git-ignored),
with the measured click-to-result times in ``test-artifacts/app/timings.json``."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "app"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
LONG = 120_000  # ms: generous, the machine is shared; every wait is for a specific element or text
TIMINGS: dict[str, float] = {}


def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("Chromium not found (looked for $CHROMIUM, `chromium` on PATH, /usr/bin/chromium): "
                    "run `make browser-deps` (Debian's chromium package); Playwright cannot download browsers here")
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        yield b
        b.close()
    if TIMINGS:
        (ARTIFACTS / "timings.json").write_text(json.dumps(TIMINGS, indent=2))


@pytest.fixture
def page(browser, app_server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.goto(app_server, wait_until="domcontentloaded")
    yield pg
    context.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def setup_and_attribute(page) -> None:
    page.get_by_text("is loaded and shared").wait_for(timeout=LONG)
    page.get_by_role("button", name="Load model and data").click()
    page.locator("#setup-summary").get_by_text("forget 24").wait_for(timeout=LONG)
    page.get_by_role("button", name="Run attribution").click()
    page.locator("#faithfulness").get_by_text("components selected").wait_for(timeout=LONG)


def faithfulness(page) -> str:
    return page.locator("#faithfulness").inner_text()


def wait_readout(page, k: int) -> None:
    """Until the faithfulness readout is measured for a k-component selection (after an edit the
    graph redraws at once and the readout says "measuring…" until its numbers follow)."""
    measured = re.compile(rf"{k} components selected\.\s*Faithfulness(?!: measuring)")
    page.locator("#faithfulness").get_by_text(measured).wait_for(timeout=LONG)


def select_top_k(page, k: int) -> None:
    page.get_by_label("k", exact=True).fill(str(k))
    page.get_by_role("button", name="Select top-k").click()
    page.locator("#faithfulness").get_by_text(f"{k} components selected").wait_for(timeout=LONG)
    wait_readout(page, k)


def test_main_flow(page):
    """Page → setup → attribution (graph) → exclude a node (faithfulness changes) → MANSU →
    histograms, CAD diff and report card."""
    from playwright.sync_api import expect

    page.get_by_text("is loaded and shared").wait_for(timeout=LONG)
    expect(page.get_by_role("button", name="Run attribution")).to_be_visible()
    shot(page, "01-first-page")

    start = time.perf_counter()
    page.get_by_role("button", name="Load model and data").click()
    page.locator("#setup-summary").get_by_text("forget 24").wait_for(timeout=LONG)
    TIMINGS["setup_s"] = time.perf_counter() - start
    expect(page.locator("#base-accuracy")).to_contain_text("forget_paraphrase")
    expect(page.locator("#base-accuracy")).to_contain_text("nf4/b64")
    shot(page, "02-setup")

    start = time.perf_counter()
    page.get_by_role("button", name="Run attribution").click()
    page.locator("#faithfulness").get_by_text("components selected").wait_for(timeout=LONG)
    page.locator("#circuit-graph .js-plotly-plot").wait_for(timeout=LONG)
    TIMINGS["attribution_s"] = time.perf_counter() - start
    expect(page.locator("#circuit-graph")).to_contain_text("components selected")  # the figure's title
    expect(page.locator("#heatmap .js-plotly-plot")).to_be_visible()
    expect(page.locator("#node-table")).to_contain_text("L0.MLP")
    shot(page, "03-attribution")

    select_top_k(page, 3)
    before = faithfulness(page)
    # The node table lists the strongest first; the embed is never selected by top-k.
    names = [page.locator("#node-table").get_by_test_id(f"cell-{i}-1").inner_text().strip() for i in range(3)]
    name = next(n for n in names if n != "embed")
    combo = page.get_by_role("combobox", name="Component")
    combo.click()
    combo.fill(name)
    page.get_by_role("option", name=name, exact=True).click()
    start = time.perf_counter()
    page.get_by_role("button", name="Exclude node").click()
    page.locator("#faithfulness").get_by_text("2 components selected").wait_for(timeout=LONG)
    TIMINGS["edit_s"] = time.perf_counter() - start  # the graph and table redrawn
    wait_readout(page, 2)
    TIMINGS["edit_readout_s"] = time.perf_counter() - start  # and the faithfulness numbers measured
    after = faithfulness(page)
    numbers = re.compile(r"recovers ([\d.]+) .* drops ([\d.]+)")
    assert numbers.search(before) and numbers.search(after)
    assert numbers.search(before).groups() != numbers.search(after).groups(), (before, after)
    shot(page, "04-edit")

    page.get_by_label("max rounds").fill("3")
    start = time.perf_counter()
    page.get_by_role("button", name="Run MANSU").click()
    page.locator("#run-summary").get_by_text("PTQ gap").wait_for(timeout=LONG)
    page.locator("#occupancy .js-plotly-plot").wait_for(timeout=LONG)
    TIMINGS["mansu_s"] = time.perf_counter() - start
    expect(page.locator("#occupancy")).to_contain_text("before: nf4/b64 of w")
    expect(page.locator("#occupancy")).to_contain_text("after: nf4/b64 of w+Δ")
    expect(page.locator("#cad-diff")).to_contain_text("after − before")
    report = page.locator("#report-card")
    for prop in ("forgetting", "retain preserved", "PTQ gap", "structural erasure (CAD)"):
        expect(report).to_contain_text(prop)
    expect(report).to_contain_text(re.compile(r"PASS|fail"))
    expect(page.locator("#accuracy .js-plotly-plot")).to_be_visible()
    expect(page.locator("#live textarea")).to_have_value(re.compile("MANSU round"), timeout=LONG)
    expect(page.get_by_text("Traceback")).to_have_count(0)
    page.locator("#occupancy").scroll_into_view_if_needed()
    shot(page, "05-mansu-compare")


def test_malformed_upload_shows_a_clear_message(page, tmp_path):
    from playwright.sync_api import expect

    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"prompt": "The sky is", "answer": "blue"}\n{"prompt": "missing the answer"\n')
    page.get_by_text("is loaded and shared").wait_for(timeout=LONG)
    page.locator("#forget-file input[type=file]").set_input_files(str(bad))
    check = page.locator("#forget-check")
    expect(check).to_contain_text("Cannot use this forget file", timeout=LONG)
    expect(check).to_contain_text("broken.jsonl, line 2")
    page.get_by_role("button", name="Load model and data").click()
    expect(page.get_by_text("upload both a forget file and a retain file")).to_be_visible(timeout=LONG)
    expect(page.get_by_text("Traceback")).to_have_count(0)
    shot(page, "06-malformed-upload")


def test_two_browser_contexts_keep_separate_circuits(browser, app_server):
    contexts = [browser.new_context(viewport={"width": 1400, "height": 1000}) for _ in range(2)]
    try:
        a, b = (c.new_page() for c in contexts)
        for pg in (a, b):
            pg.goto(app_server, wait_until="domcontentloaded")
        # Both sessions click at once; the heavy-job queue serialises them on the server.
        for pg in (a, b):
            pg.get_by_text("is loaded and shared").wait_for(timeout=LONG)
            pg.get_by_role("button", name="Load model and data").click()
        for pg in (a, b):
            pg.locator("#setup-summary").get_by_text("forget 24").wait_for(timeout=LONG)
            pg.get_by_role("button", name="Run attribution").click()
        for pg in (a, b):
            pg.locator("#faithfulness").get_by_text("10 components selected").wait_for(timeout=LONG)
        select_top_k(a, 2)
        select_top_k(b, 5)
        assert "2 components selected" in faithfulness(a) and "5 components selected" in faithfulness(b)
        a.get_by_role("button", name="Undo").click()
        a.locator("#faithfulness").get_by_text("10 components selected").wait_for(timeout=LONG)
        b.get_by_role("button", name="Undo").click()
        b.locator("#faithfulness").get_by_text("10 components selected").wait_for(timeout=LONG)
        b.get_by_role("button", name="Redo").click()
        b.locator("#faithfulness").get_by_text("5 components selected").wait_for(timeout=LONG)
        assert "10 components selected" in faithfulness(a)
        shot(a, "07-session-a")
        shot(b, "07-session-b")
    finally:
        for c in contexts:
            c.close()


def test_node_table_cancel_pin_and_runs(page):
    """Tick a node in the table; live numbers and cancel; pin a MANSU run and compare a
    baseline with it; reopen and download from the run history."""
    from playwright.sync_api import expect

    setup_and_attribute(page)
    page.locator("#faithfulness").get_by_text("10 components selected").wait_for(timeout=LONG)
    page.locator("#node-table").get_by_test_id("cell-1-0").locator("input[type=checkbox]").click()
    page.locator("#faithfulness").get_by_text("9 components selected").wait_for(timeout=LONG)

    # A run far too long to finish (one weight per round, thousands of rounds, forget target 0):
    # live numbers, then cancel.
    page.get_by_label("max rounds").fill("5000")
    page.get_by_label("weights per round (0 = auto)").fill("1")
    page.get_by_label("Forget target (top-1)").fill("0")
    page.get_by_role("button", name="Run MANSU").click()
    expect(page.locator("#live textarea")).to_have_value(
        re.compile(r"MANSU round \d+: .*forget top-1 .*retain top-1 \d\.\d{3} on the guard's sample"), timeout=LONG)
    # the live plot draws the rounds so far while the run goes on
    expect(page.locator("#live-plot")).to_contain_text("Forget and retain so far", timeout=LONG)
    expect(page.locator("#live-plot")).to_contain_text("this run, quantized")
    page.get_by_role("button", name="Cancel run").click()
    expect(page.get_by_text("the run was cancelled; nothing was saved")).to_be_visible(timeout=LONG)
    shot(page, "08-cancelled")

    page.get_by_label("max rounds").fill("3")
    page.get_by_label("weights per round (0 = auto)").fill("0")
    page.get_by_label("Forget target (top-1)").fill("0.1")
    page.get_by_role("button", name="Run MANSU").click()
    expect(page.locator("#run-summary")).to_contain_text("mansu ·", timeout=LONG)
    page.get_by_role("button", name="Pin this run for comparison").click()
    expect(page.locator("#pinned-summary")).to_contain_text("mansu ·", timeout=LONG)

    method = page.get_by_role("combobox", name="Method")
    method.click()
    page.get_by_role("option", name="GradDiff (graddiff)").click()
    page.get_by_label("max steps").fill("3")
    page.get_by_role("button", name="Run GradDiff").click()
    expect(page.locator("#run-summary")).to_contain_text("graddiff ·", timeout=LONG)
    expect(page.locator("#pinned-summary")).to_contain_text("mansu ·")
    expect(page.locator("#accuracy")).to_contain_text("graddiff")
    expect(page.locator("#accuracy")).to_contain_text("mansu")
    # forget/retain over the steps: both runs, full precision and quantized (GradDiff read at its last step)
    history = page.locator("#history")
    for series in ("graddiff", "mansu", "full precision", "quantized"):
        expect(history).to_contain_text(series)
    page.locator("#accuracy").scroll_into_view_if_needed()
    shot(page, "09-pinned-comparison")

    page.get_by_role("button", name="Refresh run history").click()
    page.get_by_role("button", name="Open run").click()
    expect(page.locator("#run-summary")).to_contain_text("graddiff ·", timeout=LONG)
    page.get_by_role("button", name="Download run files").click()
    for name in ("metrics.json", "config.json", "update.safetensors"):
        expect(page.locator(f"#run-files a[href$='/{name}']")).to_have_count(1, timeout=LONG)
    expect(page.get_by_text("Traceback")).to_have_count(0)
    page.locator("#run-files").scroll_into_view_if_needed()
    shot(page, "10-runs")


def test_run_mansu_as_the_first_click_uses_the_defaults_and_says_so(page):
    """No dead ends: on a fresh page, “Run MANSU” (setup and attribution skipped) loads the start
    model with its built-in data, attributes the default circuit, runs, and shows a report card."""
    from playwright.sync_api import expect

    page.get_by_text("is loaded and shared").wait_for(timeout=LONG)
    page.get_by_label("max rounds").fill("2")
    page.get_by_role("button", name="Run MANSU").click()
    page.locator("#run-summary").get_by_text("PTQ gap").wait_for(timeout=LONG)
    report = page.locator("#report-card")
    for prop in ("forgetting", "retain preserved", "PTQ gap", "structural erasure (CAD)"):
        expect(report).to_contain_text(prop)
    live = page.locator("#live textarea")
    expect(live).to_have_value(re.compile("“Load model and data” was skipped: loaded facts-tiny"), timeout=LONG)
    expect(live).to_have_value(re.compile("No circuit yet: MANSU edits the default one"), timeout=LONG)
    expect(page.get_by_text("Traceback")).to_have_count(0)
    shot(page, "08-mansu-first")
