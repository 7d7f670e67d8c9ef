"""The app as a shared service, attacked over HTTP (issue 18): one test per hole.

One app process with the flags an operator would give a shared server — model roots, a short
per-job time limit, a small queue, a tiny per-session runs quota — driven by ``gradio_client``
sessions ("alice", "bob", "carol") and by raw HTTP requests with no session at all. Every test
here fails against the app as it was before issue 18 (which loaded any path, served the run
store by URL, listed every run to everyone, had no queue bound and no time limit).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import running_app

JOB_SECONDS = 45  # long enough for setup, attribution and a 2-round run on a busy 2-core machine
QUEUE_SIZE = 2


def _rows(table) -> list[list]:
    return table["value"]["data"] if "value" in table else table["data"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """``allowed/`` (the only --models-dir) holds a safetensors model ``m``, a ``.bin``-only copy and a
    symlink out to ``outside/m``, the same model where the app must not load it from."""
    from workbench.models.toy import toy_model

    base = tmp_path_factory.mktemp("models")
    toy = toy_model("gpt2")
    for where in ("allowed/m", "outside/m", "allowed/binonly"):
        toy.hf.save_pretrained(base / where)
        toy.tokenizer.save_pretrained(base / where)
    torch.save(toy.hf.state_dict(), base / "allowed" / "binonly" / "pytorch_model.bin")
    for f in (base / "allowed" / "binonly").glob("*.safetensors"):
        f.unlink()
    os.symlink(base / "outside" / "m", base / "allowed" / "escape")
    os.symlink(base / "allowed" / "m", base / "allowed" / "alias")
    return base


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("secure-app")
    args = ["--models-dir", str(models / "allowed"), "--job-timeout", str(JOB_SECONDS),
            "--queue-size", str(QUEUE_SIZE), "--runs-quota-mb", "0.001", "--heavy-jobs", "1"]
    with running_app(work, args) as url:
        yield url, work / "runs"


def _client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def _setup_error(client, model: str) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict(model, None, None, None, "nf4", 64, False, api_name="/setup")
    return str(info.value)


# --- models: roots only, one message, no pickles -------------------------------------------------


def test_a_model_outside_the_roots_is_refused_and_existence_is_not_revealed(server, models):
    url, _runs = server
    client = _client(url)
    names = [str(models / "outside" / "m"), str(models / "outside" / "missing"), "/etc", "/etc/passwd",
             str(models / "allowed" / "escape"), str(models / "allowed" / ".." / "outside" / "m"),
             str(models / "allowed" / "missing"), "~/.ssh"]
    messages = {_setup_error(client, name).replace(repr(name), "NAME") for name in names}
    assert len(messages) == 1, f"messages tell existing and missing paths apart: {messages}"
    message = messages.pop()
    assert "not allowed or not found" in message and str(models) not in message


def test_every_spelling_of_an_allowed_directory_loads(server, models):
    url, _runs = server
    client = _client(url)
    m = str(models / "allowed" / "m")
    for spelling in (m, m + "/", m + "/.", str(models / "allowed" / "alias")):
        # The model loaded: what stops it now is the missing fact files, not the roots.
        assert "without a built-in fact split" in _setup_error(client, spelling), spelling


def test_a_bin_only_directory_is_never_unpickled(server, models):
    url, _runs = server
    message = _setup_error(_client(url), str(models / "allowed" / "binonly"))
    assert "no .safetensors weights" in message and "never loaded" in message


# --- runs: private to their session, never served by URL -----------------------------------------


@pytest.fixture(scope="module")
def alice(server):
    """A session with one finished run (its quota, 1 kB, is then used up)."""
    url, runs = server
    client = _client(url)
    client.predict("facts-tiny", None, None, None, "nf4", 64, False, api_name="/setup")
    client.predict("atp", 8, False, api_name="/attribute")
    _live, *compare = client.predict("mansu", True, True, True, True, 2, 0.05, 0, 0.1, 2, 0, 100, "", False, False,
                                     "overall", "fp", api_name="/unlearn")
    run_id = compare[-1]["value"]
    (run_dir,) = [p for p in runs.rglob(run_id) if p.is_dir()]
    return client, run_id, run_dir


def test_the_run_store_is_not_served_by_url(server, alice):
    url, runs = server
    _, run_id, run_dir = alice
    assert (run_dir / "update.safetensors").is_file()
    for path in (run_dir / "update.safetensors", run_dir / "config.json",
                 Path("runs") / run_id / "update.safetensors", runs / run_id / "metrics.json"):
        r = httpx.get(f"{url}gradio_api/file={path}", timeout=30)
        assert r.status_code in (403, 404), (path, r.status_code)
        assert "model_fingerprint" not in r.text and b"__metadata__" not in r.content  # no config, no update


def test_another_session_cannot_list_open_or_download_a_run(server, alice):
    from gradio_client.exceptions import AppError

    url, _runs = server
    _alice, run_id, _run_dir = alice
    bob = _client(url)
    history, pick = bob.predict(api_name="/runs")
    assert run_id not in [r[0] for r in _rows(history)] and run_id not in (pick.get("choices") or [])
    for endpoint, args in (("/open_run", (run_id, "overall", "fp")), ("/run_files", (run_id,))):
        with pytest.raises(AppError) as info:
            bob.predict(*args, api_name=endpoint)
        assert "not in the list of choices" in str(info.value) or "no run" in str(info.value)


def test_a_session_downloads_its_own_run_through_its_handlers(alice):
    client, run_id, run_dir = alice
    files = client.predict(run_id, api_name="/run_files")
    assert sorted(Path(f).name for f in files) == ["config.json", "metrics.json", "update.safetensors"]
    assert all(not Path(f).resolve().is_relative_to(run_dir.resolve()) for f in files)  # copies, not the store
    assert Path(next(f for f in files if f.endswith("update.safetensors"))).read_bytes() == \
        (run_dir / "update.safetensors").read_bytes()


def test_the_runs_quota_refuses_a_new_run_with_a_message(alice):
    from gradio_client.exceptions import AppError

    client, _run_id, _run_dir = alice
    with pytest.raises(AppError, match=r"quota.*--runs-quota-mb"):
        client.predict("mansu", True, True, True, True, 2, 0.05, 0, 0.1, 2, 0, 100, "", False, False,
                       "overall", "fp", api_name="/unlearn")


# --- bounded work: ranges, the time limit, the queue ---------------------------------------------


def _raw_call(url: str, endpoint: str, data: list) -> str:
    """One call over plain HTTP from a brand-new session; NaN and ±inf are sent as JSON's
    common extension (``NaN``, ``Infinity``), which gradio_client's encoder refuses to write."""
    body = json.dumps({"data": data}, allow_nan=True)
    r = httpx.post(f"{url}gradio_api/call/{endpoint}", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    r.raise_for_status()
    with httpx.stream("GET", f"{url}gradio_api/call/{endpoint}/{r.json()['event_id']}", timeout=120) as stream:
        return "".join(stream.iter_text())


UNLEARN = {"max_rounds": 2, "fisher_budget": 0.05, "params_per_round": 0, "forget_target": 0.1, "code_steps": 2,
           "lr": 0, "max_steps": 100}


@pytest.mark.parametrize("field,value", [("max_rounds", 10**9), ("max_rounds", float("inf")),
                                         ("params_per_round", 10**12), ("max_steps", 10**9),
                                         ("code_steps", 10**4), ("forget_target", float("nan")),
                                         ("fisher_budget", float("inf")), ("lr", float("nan"))])
def test_out_of_range_numbers_are_refused_with_a_message(server, field, value):
    """Refused by the server before any work, whatever the session has loaded (a fresh one here)."""
    url, _runs = server
    v = {**UNLEARN, field: value}
    answer = _raw_call(url, "unlearn", ["mansu", True, True, True, True, v["max_rounds"], v["fisher_budget"],
                                        v["params_per_round"], v["forget_target"], v["code_steps"], v["lr"],
                                        v["max_steps"], "", False, False, "overall", "fp"])
    assert answer.startswith("event: error"), answer[:300]
    assert "went wrong inside" not in answer and "load a model" not in answer, answer[:300]
    assert "maximum value" in answer or "minimum value" in answer or "must be" in answer, answer[:300]


@pytest.mark.parametrize("action,value", [("top_k", 10**12), ("threshold", float("inf")), ("threshold", float("nan"))])
def test_out_of_range_circuit_edits_are_refused(server, action, value):
    url, _runs = server
    answer = _raw_call(url, action, [value])
    assert answer.startswith("event: error"), answer[:300]
    assert "maximum value" in answer or "must be" in answer, answer[:300]


@pytest.mark.parametrize("settings", ["[" * 10_000 + "]" * 10_000, '{"alpha": 1' + "0" * 5000 + "}"])
def test_hostile_method_settings_get_a_message_not_a_traceback(alice, settings):
    from gradio_client.exceptions import AppError

    client, _run_id, _run_dir = alice
    with pytest.raises(AppError) as info:
        client.predict("graddiff", True, True, True, True, 2, 0.05, 0, 0.1, 2, 0, 3, settings, False, False,
                       "overall", "fp", api_name="/unlearn")
    assert "method settings" in str(info.value) and "went wrong inside" not in str(info.value)


def _join(url: str) -> int:
    """Queue one heavy job (attribution) from a brand-new session over plain HTTP; the status code."""
    return httpx.post(f"{url}gradio_api/call/attribute", json={"data": ["atp", 8, False]}, timeout=30).status_code


def test_a_long_job_is_stopped_at_the_time_limit_and_the_queue_is_bounded(server):
    from gradio_client.exceptions import AppError

    url, _runs = server
    carol = _client(url)
    carol.predict("facts-tiny", None, None, None, "nf4", 64, False, api_name="/setup")
    carol.predict("atp", 8, False, api_name="/attribute")
    start = time.monotonic()
    job = carol.submit("mansu", True, True, True, True, 5000, 0.05, 1, 0.0, 2, 0, 100, "", False, False,
                       "overall", "fp", api_name="/unlearn")  # thousands of one-weight rounds
    time.sleep(5)  # it holds the only heavy slot now
    with ThreadPoolExecutor(QUEUE_SIZE + 4) as pool:
        codes = list(pool.map(lambda _i: _join(url), range(QUEUE_SIZE + 4)))
    assert 503 in codes, f"the queue took every request: {codes}"
    assert codes.count(200) <= QUEUE_SIZE, codes

    with pytest.raises(AppError, match=f"limit of {JOB_SECONDS} s per job.*nothing was saved"):
        job.result(timeout=JOB_SECONDS * 4)
    assert time.monotonic() - start < JOB_SECONDS * 3
    history, _pick = carol.predict(api_name="/runs")
    assert not any(row and row[0] for row in _rows(history)), _rows(history)  # nothing saved, nothing half-saved


def test_the_gradio_cache_is_cleaned():
    from workbench.faces.app import CACHE_CLEANUP, build_app

    demo = build_app("facts-tiny")
    assert demo.delete_cache == CACHE_CLEANUP and CACHE_CLEANUP[1] <= 24 * 3600


# --- with --auth-file: runs belong to the signed-in user, across that user's sessions ------------


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("auth-app")
    users = work / "users.txt"
    users.write_text("# user:password\nann:ann-secret\nben:ben-secret\n")
    with running_app(work, ["--auth-file", str(users)]) as url:
        yield url


def test_without_a_login_nothing_answers(auth_server):
    r = httpx.post(f"{auth_server}gradio_api/call/runs", json={"data": []}, timeout=30)
    assert r.status_code in (401, 403), r.status_code
    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own types for a refused login
        _client_as(auth_server, ("ann", "wrong password"))


def _client_as(url: str, auth: tuple[str, str]):
    from gradio_client import Client

    return Client(url, auth=auth, verbose=False)


def test_a_users_runs_follow_them_and_no_one_else_sees_them(auth_server):
    from gradio_client.exceptions import AppError

    ann = _client_as(auth_server, ("ann", "ann-secret"))
    ann.predict("facts-tiny", None, None, None, "nf4", 64, False, api_name="/setup")
    ann.predict("atp", 8, False, api_name="/attribute")
    _live, *compare = ann.predict("mansu", True, True, True, True, 2, 0.05, 0, 0.1, 2, 0, 100, "", False, False,
                                  "overall", "fp", api_name="/unlearn")
    run_id = compare[-1]["value"]
    later = _client_as(auth_server, ("ann", "ann-secret"))  # another session (tab) of the same user
    history, _pick = later.predict(api_name="/runs")
    assert [r[0] for r in _rows(history)] == [run_id]
    assert len(later.predict(run_id, api_name="/run_files")) == 3
    ben = _client_as(auth_server, ("ben", "ben-secret"))
    history, _pick = ben.predict(api_name="/runs")
    assert run_id not in [r[0] for r in _rows(history)]
    with pytest.raises(AppError):
        ben.predict(run_id, api_name="/run_files")
