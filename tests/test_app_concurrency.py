"""Many sessions at once against ONE app process, and what API callers must not be able to do.

Concurrency: eight ``gradio_client`` sessions (one ``Client`` each, one thread each) run the
whole flow at the same time — setup, attribution, a circuit edit of their own, a short MANSU
run — and each must see only its own circuit and its own run. Heavy jobs share one slot
(``--heavy-jobs 1``), so they queue; the light endpoints (edits) interleave freely.

Safety: run identifiers from the API cannot leave the runs directory, oversized uploads are
refused with a message, and no module of the workbench evaluates code or unpickles data.
"""

from __future__ import annotations

import ast
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
N_SESSIONS = 8
TOP_K = 9  # every session selects the top 9, then excludes a different one of them
TIMEOUT = 240  # seconds for the whole flow of one session, most of it waiting in the heavy queue


def _rows(table) -> list[list]:
    return table["value"]["data"] if "value" in table else table["data"]


def _selected(circuit_views) -> set[str]:
    """Component names ticked in the node table of a circuit-views answer."""
    return {r[1] for r in _rows(circuit_views[3]) if r[0]}


def _unlearn_args(max_rounds: int = 2) -> tuple:
    # method, circuit, projection, fisher, floor, max rounds, fisher budget, weights/round, forget target,
    # codes/weight, lr, max steps, settings, measure CAD, oracle, module, CAD of
    return ("mansu", True, True, True, True, max_rounds, 0.05, 0, 0.1, 2, 0, 100, "", False, False, "overall", "fp")


def _session_flow(url: str, index: int, barrier: threading.Barrier) -> dict:
    """One user's flow; returns what the session saw at every step (asserted by the caller)."""
    try:
        return _flow(url, index, barrier)
    except BaseException:
        barrier.abort()  # the other sessions stop waiting for this one at once
        raise


def _flow(url: str, index: int, barrier: threading.Barrier) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False)
    seen: dict = {"index": index}
    client.predict("facts-tiny", None, None, None, "nf4", 64, False, api_name="/setup")
    client.predict("atp", 8, False, api_name="/attribute")
    ranked = client.predict(TOP_K, api_name="/top_k")
    top = [r[1] for r in _rows(ranked[3]) if r[0]]
    victim = top[index]
    seen["expected"] = set(top) - {victim}
    seen["after_edit"] = _selected(client.predict(victim, api_name="/exclude"))
    barrier.wait(timeout=TIMEOUT)  # every session has made its own edit before anyone reads again

    # Undo + redo reads this session's circuit back after the others edited theirs.
    client.predict(api_name="/undo")
    seen["after_others_edited"] = _selected(client.predict(api_name="/redo"))

    _live, *compare = client.predict(*_unlearn_args(), api_name="/unlearn")
    seen["run_id"] = compare[-1]["value"]
    seen["summary_after_run"] = compare[1]
    files = client.predict(seen["run_id"], api_name="/run_files")
    metrics = json.loads(Path(next(f for f in files if f.endswith("metrics.json"))).read_text())
    seen["run_circuit"] = set(metrics["circuit"] or [])
    seen["metrics_run_id"] = metrics["run_id"]
    barrier.wait(timeout=TIMEOUT)  # every run is saved before anyone looks at "its" run again

    pinned = client.predict("overall", "fp", api_name="/pin")
    seen["summary_after_all_runs"] = pinned[1]
    seen["pinned_summary"] = pinned[5]
    history, pick = client.predict(api_name="/runs")
    seen["history"] = [r[0] for r in _rows(history)]
    seen["history_pick"] = pick["value"]
    return seen


def test_eight_sessions_at_once_keep_their_own_circuit_and_run(app_server):
    barrier = threading.Barrier(N_SESSIONS)
    with ThreadPoolExecutor(N_SESSIONS) as pool:
        futures = [pool.submit(_session_flow, app_server, i, barrier) for i in range(N_SESSIONS)]
        results, errors = [], []
        for i, fut in enumerate(futures):
            try:
                results.append(fut.result(timeout=3 * TIMEOUT))
            except Exception as exc:  # collect every session's failure, report them together
                errors.append(f"session {i}: {type(exc).__name__}: {exc}")
    first = [e for e in errors if "BrokenBarrierError" not in e] or errors  # the cause, not its echo
    assert not errors, "sessions failed:\n" + "\n".join(first)
    assert len(results) == N_SESSIONS

    expected = [r["expected"] for r in results]
    assert len({frozenset(e) for e in expected}) == N_SESSIONS, "the edits were meant to give distinct circuits"
    for r in results:
        i = r["index"]
        assert len(r["expected"]) == TOP_K - 1
        assert r["after_edit"] == r["expected"], f"session {i}: the edit's own answer shows another circuit"
        assert r["after_others_edited"] == r["expected"], (
            f"session {i}: its circuit changed while other sessions edited theirs: "
            f"missing {sorted(r['expected'] - r['after_others_edited'])}, "
            f"extra {sorted(r['after_others_edited'] - r['expected'])}")
        assert r["run_circuit"] == r["expected"], f"session {i}: its saved run used another session's circuit"
        assert r["metrics_run_id"] == r["run_id"]
        assert r["run_id"] in r["summary_after_run"]
        assert r["run_id"] in r["summary_after_all_runs"], (
            f"session {i}: after all runs its compare view shows another run:\n{r['summary_after_all_runs']}")
        assert r["run_id"] in r["pinned_summary"]
        assert r["history_pick"] == r["run_id"], f"session {i}: the run history pre-selects another run"

    run_ids = [r["run_id"] for r in results]
    assert len(set(run_ids)) == N_SESSIONS, f"run ids are not distinct: {run_ids}"
    for r in results:  # runs are private to their session: each history lists its own run only
        assert r["history"] == [r["run_id"]], f"session {r['index']}: history {r['history']}"
        others = set(run_ids) - {r["run_id"]}
        assert not any(o in r["summary_after_all_runs"] for o in others)


# --------------------------------------------------------------------------------------------
# Identifiers and uploads from API callers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(app_server):
    from gradio_client import Client

    return Client(app_server, verbose=False)


@pytest.mark.parametrize("bad", ["../x", "..", "/etc", "/etc/passwd", "a/../../b", "..\\x", ".hidden"])
@pytest.mark.parametrize("endpoint", ["/open_run", "/run_files"])
def test_run_ids_cannot_escape_the_runs_directory(client, endpoint, bad):
    from gradio_client.exceptions import AppError

    args = (bad, "overall", "fp") if endpoint == "/open_run" else (bad,)
    with pytest.raises(AppError) as info:
        client.predict(*args, api_name=endpoint)
    message = str(info.value)
    # Refused either by Gradio's picker (not one of the listed runs) or by the run store's id check.
    assert "invalid run id" in message or "not in the list of choices" in message, message
    assert "root:" not in message and "passwd" not in message.replace(bad, "")


def test_run_ids_cannot_escape_the_runs_directory_in_the_session(tmp_path):
    """Without Gradio's picker check: the session itself refuses the id and reads nothing outside."""
    from workbench.core.errors import WorkbenchError
    from workbench.faces.session import Session

    root = tmp_path / "runs"
    outside = tmp_path / "x"
    (outside).mkdir()
    for name in ("config.json", "metrics.json", "update.safetensors"):
        (outside / name).write_text("{}")  # a complete-looking "run" just outside the runs directory
    s = Session(runs_root=root)
    for bad in ("../x", str(outside), "/etc", "..", "x/../../x"):
        with pytest.raises(WorkbenchError, match="invalid run id"):
            s.open_run(bad)
        with pytest.raises(WorkbenchError, match="invalid run id"):
            s.run_files(bad)
    assert s.current is None


def test_oversized_upload_is_refused_by_the_server_with_a_message(app_server):
    """The server itself (``launch(max_file_size=...)``) refuses the upload, whatever the client."""
    import httpx

    from workbench.faces.session import MAX_UPLOAD_BYTES

    big = b'{"pad": "' + b"x" * (MAX_UPLOAD_BYTES + 10) + b'"}'
    r = httpx.post(app_server + "gradio_api/upload", files={"files": ("big-circuit.json", big, "application/json")},
                   timeout=60)
    assert r.status_code == 413, (r.status_code, r.text[:300])
    assert f"maximum allowed size of {MAX_UPLOAD_BYTES} bytes" in r.text
    small = httpx.post(app_server + "gradio_api/upload", files={"files": ("c.json", b"{}", "application/json")},
                       timeout=60)
    assert small.status_code == 200, "a small upload must pass the same route (else the 413 proves nothing)"


def test_oversized_upload_is_refused_by_the_client_with_a_message(client, tmp_path):
    from gradio_client import handle_file

    from workbench.faces.session import MAX_UPLOAD_BYTES

    big = tmp_path / "big-circuit.json"
    big.write_text('{"pad": "' + "x" * (MAX_UPLOAD_BYTES + 10) + '"}')
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {MAX_UPLOAD_BYTES} bytes"):
        client.predict(handle_file(str(big)), api_name="/upload_circuit")


def _raw_call(url: str, endpoint: str, data: list) -> str:
    """One call of a named endpoint over plain HTTP (no gradio_client, which would upload the file itself)."""
    import httpx

    r = httpx.post(f"{url}gradio_api/call/{endpoint}", json={"data": data}, timeout=30)
    r.raise_for_status()
    with httpx.stream("GET", f"{url}gradio_api/call/{endpoint}/{r.json()['event_id']}", timeout=120) as stream:
        return "".join(stream.iter_text())


@pytest.mark.parametrize("where", ["tmp", "repo"])
def test_api_cannot_make_the_app_read_a_server_file(app_server, tmp_path, where):
    """A FileData naming a file already on the server (not uploaded) never reaches the handler.

    The file is JSON but not a circuit: had the handler read it, the answer would say
    "missing field 'schema_version'".
    """
    secret = (tmp_path if where == "tmp" else ROOT / "tests") / "not-uploaded-secret.json"
    secret.write_text('{"secret": "TOPSECRET"}')
    try:
        answer = _raw_call(app_server, "upload_circuit", [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}])
    finally:
        secret.unlink()
    assert answer.startswith("event: error"), answer[:300]
    assert "schema_version" not in answer and "TOPSECRET" not in answer, answer[:300]
    # the same route with an empty input reaches the handler and answers with its own message
    assert "choose a circuit JSON file" in _raw_call(app_server, "upload_circuit", [None])


# --------------------------------------------------------------------------------------------
# No code evaluation, no unpickling, anywhere in the workbench
# --------------------------------------------------------------------------------------------


def _sources() -> list[Path]:
    files = [*sorted((ROOT / "workbench").rglob("*.py")), ROOT / "app.py"]
    assert len(files) > 10
    return files


def _dangerous_calls(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                if n and n.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve", "joblib"):
                    found.append((node.lineno, f"import {n}"))
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("eval", "exec", "compile", "__import__"):
            found.append((node.lineno, f"{func.id}()"))
        if isinstance(func, ast.Attribute):
            owner = ast.unparse(func.value)
            if func.attr in ("load", "loads") and owner.split(".")[-1] in ("pickle", "dill", "marshal", "joblib"):
                found.append((node.lineno, f"{owner}.{func.attr}()"))
            if func.attr == "load" and owner == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    found.append((node.lineno, "torch.load() without weights_only=True"))
            if func.attr == "from_pretrained" and any(
                    k.arg == "trust_remote_code" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                    for k in node.keywords):
                found.append((node.lineno, "from_pretrained(trust_remote_code=...)"))
    return found


def test_no_module_evaluates_code_or_unpickles():
    problems = []
    for path in _sources():
        for line, what in _dangerous_calls(ast.parse(path.read_text(), filename=str(path))):
            problems.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not problems, "unsafe calls in the workbench:\n" + "\n".join(problems)


def test_the_scanner_finds_what_it_looks_for():
    bad = ("import pickle\nx = eval('1')\nexec('y=2')\nimport torch\ntorch.load('m.pt')\n"
           "torch.load('m.pt', weights_only=False)\npickle.loads(b'')\n")
    good = "model.eval()\ntorch.load('m.pt', weights_only=True)\njson.loads('{}')\n"
    kinds = [w for _, w in _dangerous_calls(ast.parse(bad))]
    assert sorted(kinds) == sorted(["import pickle", "eval()", "exec()", "torch.load() without weights_only=True",
                                    "torch.load() without weights_only=True", "pickle.loads()"])
    assert _dangerous_calls(ast.parse(good)) == []
