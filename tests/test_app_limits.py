"""The app's limits without a server: input ranges, the auth file, who owns a session's runs,
the per-job time limit and the runs quota (the HTTP suite, test_security.py, drives the same)."""

from __future__ import annotations

import copy
import math

import pytest

from workbench.core.errors import WorkbenchError
from workbench.faces.app import INPUTS, number, parse_args, read_auth_file
from workbench.faces.session import PRIVATE_RUNS, Limits, Session


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_every_numeric_input_refuses_nan_inf_and_out_of_range(name):
    allowed = INPUTS[name]
    for bad in (math.nan, math.inf, -math.inf, "x", None, True, allowed.high * 10 + 1, -1e-9 - 1):
        with pytest.raises(WorkbenchError, match="must be"):
            number(bad, name)
    assert number(allowed.high, name) == allowed.high
    assert isinstance(number(float(allowed.high), name), int if allowed.integer else float)


def test_the_app_defaults_bound_every_job():
    args = parse_args([])
    assert args.job_timeout > 0 and args.queue_size >= 1 and args.runs_quota_mb > 0 and args.max_models == 2
    assert args.models_dir == []


def test_auth_file(tmp_path):
    f = tmp_path / "users"
    f.write_text("# comment\n\nann: pass:with:colons\n")
    assert read_auth_file(str(f)) == [("ann", " pass:with:colons")]
    f.write_text("no separator\n")
    with pytest.raises(SystemExit, match="line 1: expected 'user:password'"):
        read_auth_file(str(f))
    f.write_text("# nobody\n")
    with pytest.raises(SystemExit, match="lists no users"):
        read_auth_file(str(f))


def test_each_copy_of_the_initial_session_gets_its_own_runs(tmp_path):
    """Gradio deep-copies one initial Session per browser session: the copies must not share an owner."""
    initial = Session(runs_root=tmp_path, limits=Limits(private_runs=True))
    a, b = copy.deepcopy(initial), copy.deepcopy(initial)
    assert a.runs_root != b.runs_root
    assert a.runs_root.parent == tmp_path / PRIVATE_RUNS
    assert Session(runs_root=tmp_path).runs_root == tmp_path  # the library's default: one shared store


def test_a_signed_in_user_owns_their_runs_in_every_session(tmp_path):
    limits = Limits(private_runs=True)
    first, second, other = (Session(runs_root=tmp_path, limits=limits) for _ in range(3))
    first.sign_in("ann")
    second.sign_in("ann")
    other.sign_in("ben")
    assert first.runs_root == second.runs_root != other.runs_root
    assert "ann" not in str(first.runs_root)  # a hash, so any user name is a safe directory name
    with pytest.raises(WorkbenchError, match="another user"):
        first.sign_in("ben")


def test_a_job_past_its_time_limit_stops_at_the_next_report(monkeypatch):
    import workbench.faces.session as session

    clock = [100.0]
    monkeypatch.setattr(session.time, "monotonic", lambda: clock[0])
    seen = []
    report = Session(limits=Limits(job_seconds=10))._bounded(lambda f, m: seen.append(m))
    report(0.1, "step 1")
    clock[0] += 11
    with pytest.raises(WorkbenchError, match="limit of 10 s per job.*nothing was saved"):
        report(0.5, "step 2")
    report(1.0, "done")  # a finished job is never failed
    assert seen == ["step 1", "done"]


def test_the_runs_quota(tmp_path):
    s = Session(runs_root=tmp_path, limits=Limits(private_runs=True, runs_quota_bytes=1000))
    s._check_quota()  # nothing saved yet
    s.runs_root.mkdir(parents=True)
    (s.runs_root / "x.bin").write_bytes(b"0" * 1000)
    with pytest.raises(WorkbenchError, match="quota"):
        s._check_quota()


def test_the_total_runs_quota_holds_across_sessions(tmp_path):
    """A new session per run must not sidestep the per-session quota: the store has a total."""
    limits = Limits(private_runs=True, runs_quota_bytes=1000, runs_total_bytes=1500)
    a, b = Session(runs_root=tmp_path, limits=limits), Session(runs_root=tmp_path, limits=limits)
    for s, size in ((a, 900), (b, 700)):
        s._check_quota()
        s.runs_root.mkdir(parents=True)
        (s.runs_root / "x.bin").write_bytes(b"0" * size)
    with pytest.raises(WorkbenchError, match="run store is full.*--runs-total-mb"):
        Session(runs_root=tmp_path, limits=limits)._check_quota()


def test_a_malformed_working_budget_stops_the_app_at_its_start(monkeypatch):
    """``$WORKBENCH_WORKING_MB`` is read by the first click that sizes work; the app checks it at
    its start instead (before it changes anything), so the operator sees the error, not a user."""
    from workbench.faces.app import configure

    monkeypatch.setenv("WORKBENCH_WORKING_MB", "lots")
    with pytest.raises(WorkbenchError, match="WORKBENCH_WORKING_MB must be a whole number of MiB, got 'lots'"):
        configure(parse_args([]))
