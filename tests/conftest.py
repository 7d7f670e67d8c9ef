"""Shared fixtures. Every test runs offline on CPU, with a cache of its own per test session
(``WORKBENCH_CACHE`` points at a temporary directory, see :func:`_session_cache`)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite loads a dozen models in one process; with the library's default of two cached, the
# session's facts-tiny would be evicted and reloaded (its bridge booted again) in module after
# module. The LRU itself is tested in test_model_roots.py; the app sets its own (--max-models).
os.environ.setdefault("WORKBENCH_MAX_MODELS", "6")
# the tests choose the dtype and working budget themselves:
# one exported in the shell would change the defaults they check
for _setting in ("WORKBENCH_DTYPE", "WORKBENCH_WORKING_MB"):
    os.environ.pop(_setting, None)


def _session_cache() -> Path:
    """Point ``WORKBENCH_CACHE`` at a fresh directory for this test session, sharing only built models.

    Everything the workbench writes to its cache goes to the session's own directory, except
    ``models/``, a symlink to the user's (or ``$WORKBENCH_CACHE``'s) built models: building
    ``facts`` or converting ``smollm2`` takes minutes, and a built model is safe to share — it is
    published whole by one rename under an inter-process lock and never modified afterwards
    (SmolLM2's filtered facts, kept beside it, are content-keyed and written under a lock too).
    """
    shared = Path(os.environ.get("WORKBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mansu-workbench"))
    (shared / "models").mkdir(parents=True, exist_ok=True)
    session = Path(tempfile.mkdtemp(prefix="workbench-test-cache-"))
    (session / "models").symlink_to((shared / "models").resolve(), target_is_directory=True)
    os.environ["WORKBENCH_CACHE"] = str(session)
    return session


SESSION_CACHE = _session_cache()


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)  # removes the models/ symlink, never what it points at


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path, monkeypatch):
    """Runs saved by a test land in its own temporary directory, never in ./runs."""
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))


@pytest.fixture(autouse=True)
def _fresh_base_memo():
    """Tests that fake the evaluator must not leave fake base numbers for the next test."""
    from workbench.core.memo import clear_base_memo

    clear_base_memo()
    yield
    clear_base_memo()


DATA = Path(__file__).parent / "data"


@pytest.fixture
def metrics_v1_json():
    """A ``metrics.json`` as the workbench wrote it before ``schema_version`` (version 1):
    a real facts-tiny MANSU run with an oracle and CAD, its per-module analysis cut to two
    modules. A fresh copy per test, so tests may edit it."""
    return json.loads((DATA / "metrics_v1.json").read_text())


@pytest.fixture
def run_metrics(metrics_v1_json):
    """:class:`RunMetrics` of :func:`metrics_v1_json`."""
    from workbench.measurement.results import RunMetrics

    return RunMetrics.from_json(metrics_v1_json, source="tests/data/metrics_v1.json")


@pytest.fixture(scope="session")
def toy_gpt2():
    from workbench.models.toy import toy_model

    return toy_model("gpt2")


@pytest.fixture(scope="session")
def toy_llama_gqa():
    from workbench.models.toy import toy_model

    return toy_model("llama", n_kv_heads=2)


@pytest.fixture(scope="session")
def facts_tiny():
    """The trained facts-tiny model (built once per cache, < 30 s)."""
    from workbench.models.loading import load_model

    return load_model("facts-tiny")


# --- the Gradio app, started once per test session for the browser and API tests -------------


def launch_app(workdir: Path, args: list[str] | None = None, env: dict[str, str] | None = None,
               wait: bool = True) -> tuple[subprocess.Popen, str]:
    """Start ``python app.py [args]`` on facts-tiny, on a free port of 127.0.0.1: the process and its URL.

    The start model comes from ``WORKBENCH_MODEL`` and the port from ``GRADIO_SERVER_PORT``
    (the variables the README documents); runs go to ``workdir/runs`` unless ``env`` says
    otherwise; the output goes to ``workdir/app.log``. ``wait``: until the page answers.
    """
    import socket
    import sys

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "WORKBENCH_MODEL": "facts-tiny", "GRADIO_SERVER_PORT": str(port),
           "WORKBENCH_RUNS": str(workdir / "runs"), "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(workdir / "app.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "app.py", *(args or [])], cwd=root, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    if wait:
        _wait_for_page(proc, url, workdir / "app.log")
    return proc, url


def _wait_for_page(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_app(proc)
            pytest.fail(f"app.py did not answer on {url} within 180 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running_app(workdir: Path, args: list[str] | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """:func:`launch_app` for the duration of a block; yields the URL."""
    proc, url = launch_app(workdir, args, env)
    try:
        yield url
    finally:
        stop_app(proc)


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """The app with its default flags (see :func:`running_app`), shared by the browser and API tests.

    Torch runs on one thread in the server (as in test_faults' servers): its jobs are on facts-tiny,
    where a second thread gains little, and beside the test process, the browser and the rest of a
    shared 2-core machine two threads wait on each other."""
    with running_app(tmp_path_factory.mktemp("app"), env={"OMP_NUM_THREADS": "1"}) as url:
        yield url


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of many tiny-model steps: on a shared 2-core machine
    that is several times faster than two threads competing with other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_cycle_collector():
    """Python's cycle collector off for the test: what is freed is freed by reference counts
    (a test of what a step lets go of without waiting for the collector)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture(scope="session")
def split(facts_tiny):
    """facts-tiny's built-in forget/retain split (modules may override with their own)."""
    from workbench.models.builtin_splits import builtin_split

    return builtin_split(facts_tiny)


def own_top1_split(model, *, n_prompts: int = 40, n_forget: int = 8, name: str = "toy"):
    """Facts on ``"w<i> …"`` prompts whose answers are the model's own top-1 (so forget accuracy
    starts at 1): the split the tiny random models of any family are unlearned on."""
    import torch

    from workbench.data.facts import Fact, FactSplit
    from workbench.models.scoring import encode_prompts, last_token_logits

    prompts = [f"w{i} w{i + 1} w{(3 * i) % 97}" for i in range(n_prompts)]
    ids, last, _ = encode_prompts(model.tokenizer, prompts)
    with torch.no_grad():
        top = last_token_logits(model.hf, ids, last).argmax(-1)
    facts = [Fact(p, model.tokenizer.convert_ids_to_tokens(int(t)), ()) for p, t in zip(prompts, top.tolist())]
    facts = [f for f in facts if f.answer.startswith("w")]
    return FactSplit(name, forget=tuple(facts[:n_forget]), retain=tuple(facts[n_forget:]))


def bf16_copy(model):
    """``model`` with its weights in bfloat16 (its own copy; the tokenizer shared)."""
    import copy

    import torch

    from workbench.models.loaded import LoadedModel

    return LoadedModel(name=model.name + "-bf16", hf=copy.deepcopy(model.hf).to(torch.bfloat16),
                       tokenizer=model.tokenizer)


def large_circuit_paths(monkeypatch) -> None:
    """MANSU's paths for a large circuit at any size: grids rebuilt, Q(w+Δ) as codes, w+Δ summed
    at forward, scoring in two passes (each threshold set to 0)."""
    import workbench.unlearning.mansu.candidates as candidates
    import workbench.unlearning.mansu.state as mansu_state

    for module, threshold in ((mansu_state, "MANY_CANDIDATES_WEIGHTS"), (mansu_state, "GRID_KEEP_WEIGHTS"),
                              (mansu_state, "COMPACT_QWORK_BYTES"),
                              (candidates, "SCORE_CACHE_WEIGHTS")):
        monkeypatch.setattr(module, threshold, 0)
