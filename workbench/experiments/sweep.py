"""Run a list of :class:`~workbench.experiments.jobs.Job` as saved runs: skip the finished
ones, run the rest in this process, in N worker processes, or on a Ray cluster.

Every job becomes one saved run that records its job key, and the result is read back
from the runs root, so an interrupted table resumes with the same command: finished jobs
are found by key and skipped, a run killed mid-write never counts (the store writes runs
atomically), and the table is assembled from the saved runs whichever executor made them.

The driver (this process) holds the loaded models and splits as :class:`JobGroup`; it
attributes the default circuit once per model and split, and only when a pending job needs
it. Worker processes and Ray tasks load their model themselves (by name, checked against the
job's fingerprint) and get the split and the circuit as data.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from workbench.core.errors import WorkbenchError
from workbench.core.paths import runs_dir
from workbench.core.progress import Progress, ProgressBar, silent
from workbench.data.facts import FactSplit
from workbench.experiments.flow import attribute_forget_set, default_circuit, run_unlearning
from workbench.experiments.jobs import DEFAULT_CIRCUIT, Job, circuit_digest, split_digest
from workbench.experiments.store import Run, finished_jobs, import_run, load_run, run_files
from workbench.interpretability.circuit import Circuit
from workbench.models.loaded import LoadedModel
from workbench.models.loading import load_model

ExecutorKind = Literal["local", "ray"]
EXECUTORS: tuple[ExecutorKind, ...] = ("local", "ray")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where the pending jobs run.

    Attributes:
        kind: ``local``: this machine (this process with ``jobs=1``, else ``jobs`` worker
            processes); ``ray``: tasks on the Ray cluster ``ray.init()`` connects to
            (``RAY_ADDRESS``, else a local one), each on one CPU.
        jobs: worker processes for ``local``; ignored by ``ray`` (the cluster's CPUs decide).
    """

    kind: ExecutorKind = "local"
    jobs: int = 1

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise WorkbenchError(f"unknown executor {self.kind!r}; choose from {', '.join(EXECUTORS)}")
        if not isinstance(self.jobs, int) or isinstance(self.jobs, bool) or self.jobs < 1:
            raise WorkbenchError(f"--jobs must be a positive integer, got {self.jobs!r}")


@dataclass
class JobGroup:
    """A model and a split loaded in the driver, shared by the jobs that name them.

    ``circuit`` is the circuit jobs naming :data:`DEFAULT_CIRCUIT` or its digest use; when
    None, the default one is attributed here, once, if a pending job needs it.
    """

    model: LoadedModel
    split: FactSplit
    circuit: Circuit | None = None
    oracle: LoadedModel | None = None
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        self.digest = split_digest(self.split)

    def owns(self, job: Job) -> bool:
        return job.model_fingerprint == self.model.fingerprint and job.split_digest == self.digest


@dataclass(frozen=True)
class Workload:
    """A pending job with the data its worker needs and the key only summarises."""

    job: Job
    split: FactSplit
    circuit_json: str | None


@dataclass
class JobRuns:
    """The saved run of every job, in the jobs' order, and how many were skipped as finished."""

    runs: list[Run]
    skipped: int
    ran: int


RunCallback = Callable[[Job, Run], None]
"""Called in the driver for each newly finished run (tracking, a live table)."""


def run_jobs(jobs: Sequence[Job], groups: Sequence[JobGroup], *, runs_root: str | os.PathLike[str] | None = None,
             executor: ExecutorConfig | None = None, progress: Progress | None = None,
             on_run: RunCallback | None = None) -> JobRuns:
    """Run every job not yet finished in ``runs_root``; return all the jobs' saved runs, in order.

    Without ``progress`` a bar is drawn on stderr (a script or notebook still sees the jobs go by).
    """
    root = Path(runs_root) if runs_root is not None else runs_dir()
    root.mkdir(parents=True, exist_ok=True)
    done = finished_jobs(root=root)
    pending = _unique([j for j in jobs if j.key not in done])
    skipped = len(_unique(jobs)) - len(pending)
    bar = ProgressBar(f"{len(pending)} jobs") if progress is None else None
    report = progress or bar or silent
    try:
        if skipped:
            report(0.0, f"{skipped} finished job(s) found in {root}: skipped")
        if pending:
            _dispatch(pending, groups, root, executor or ExecutorConfig(), on_run or _ignore, report)
    finally:
        if bar is not None:
            bar.close()
    return JobRuns(runs=_saved_runs(jobs, root), skipped=skipped, ran=len(pending))


def _ignore(_job: Job, _run: Run) -> None:
    return None


def _dispatch(pending: Sequence[Job], groups: Sequence[JobGroup], root: Path, executor: ExecutorConfig,
              on_run: RunCallback, report: Progress) -> None:
    """The pending jobs, with their split and circuit, to the executor asked for."""
    works = [_workload(job, _group_of(job, groups), report) for job in pending]
    if executor.kind == "ray":
        _run_on_ray(works, root, on_run, report)
    elif executor.jobs > 1 and len(works) > 1:
        _run_in_processes(works, root, executor.jobs, on_run, report)
    else:
        _run_here(works, groups, root, on_run, report)


def _unique(jobs: Sequence[Job]) -> list[Job]:
    """Jobs without repeats (a table that names one job twice runs it once)."""
    return list({j.key: j for j in jobs}.values())


def _group_of(job: Job, groups: Sequence[JobGroup]) -> JobGroup:
    for group in groups:
        if group.owns(job):
            return group
    raise WorkbenchError(f"no loaded model and split for the job {job.label}")


def _workload(job: Job, group: JobGroup, report: Progress) -> Workload:
    """The job with its split and circuit; the default circuit is attributed on first need."""
    circuit = _circuit(job, group, report)
    return Workload(job, group.split, json.dumps(circuit.to_dict()) if circuit is not None else None)


def _circuit(job: Job, group: JobGroup, report: Progress) -> Circuit | None:
    if job.circuit is None:
        return None
    if group.circuit is None and job.circuit == DEFAULT_CIRCUIT:
        report(0.0, f"attributing the forget set of {group.split.name} (one circuit for every run)")
        group.circuit = default_circuit(attribute_forget_set(group.model, group.split))
    if group.circuit is None or (job.circuit != DEFAULT_CIRCUIT and circuit_digest(group.circuit) != job.circuit):
        raise WorkbenchError(f"the job {job.label} names circuit {job.circuit}, which was not given")
    return group.circuit


def _saved_runs(jobs: Sequence[Job], root: Path) -> list[Run]:
    """The table's runs, read back from the store by job key (whoever made them)."""
    done = finished_jobs(root=root)
    missing = [j.label for j in jobs if j.key not in done]
    if missing:
        raise WorkbenchError(f"no saved run for {len(missing)} job(s), e.g. {missing[0]}")
    return [load_run(done[j.key], root=root) for j in jobs]


# --- one job ---------------------------------------------------------------------------------------


def execute(model: LoadedModel, work: Workload, root: str | os.PathLike[str], oracle: LoadedModel | None,
            progress: Progress | None = None) -> Run:
    """Run one job on a loaded model and save it (with its key) under ``root``."""
    job = work.job
    if model.fingerprint != job.model_fingerprint:
        raise WorkbenchError(f"{job.model!r} has fingerprint {model.fingerprint} here, the job wants "
                             f"{job.model_fingerprint}: a worker must see the same weights as the driver")
    circuit = Circuit.from_dict(json.loads(work.circuit_json), model=model) if work.circuit_json else None
    _, _, run = run_unlearning(model, work.split, method=job.method, quant=job.quant, circuit=circuit, oracle=oracle,
                               method_config=job.method_config, optim=job.run_optim(), stop=job.stop,
                               readings=job.readings, measure_cad=job.measure_cad, runs_root=root, progress=progress,
                               job_key=job.key)
    assert run is not None  # run_unlearning saves by default
    return run


def _run_here(works: Sequence[Workload], groups: Sequence[JobGroup], root: Path, on_run: RunCallback,
              report: Progress) -> None:
    """In this process, one after another, on the driver's loaded models (the base's own
    measurements are then computed once: :func:`workbench.core.memo.base_memo`)."""
    for i, work in enumerate(works):
        group = _group_of(work.job, groups)

        def sub(f: float, msg: str, i: int = i) -> None:
            report((i + f) / len(works), msg)

        on_run(work.job, execute(group.model, work, root, group.oracle, sub))


# --- worker processes ------------------------------------------------------------------------------

def _worker_init(threads: int) -> None:
    # N workers share the machine's cores: without this each would start one thread per core.
    torch.set_num_threads(threads)


def _worker_execute(work: Workload, root: str) -> str:
    """A worker process's job: load the model (load_model keeps it for the worker's next job),
    run, save; the run id goes back."""
    job = work.job
    oracle = load_model(job.oracle) if job.oracle else None
    return execute(load_model(job.model), work, root, oracle).id


def _run_in_processes(works: Sequence[Workload], root: Path, n: int, on_run: RunCallback,
                      report: Progress) -> None:
    """``n`` spawned worker processes (spawn, not fork: torch and a forked parent's threads do
    not mix). The first failure cancels what has not started and is raised; finished runs stay."""
    threads = max(1, (os.cpu_count() or 1) // n)
    pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(threads,))
    futures: dict[Future[str], Workload] = {pool.submit(_worker_execute, w, str(root)): w for w in works}
    try:
        _collect(futures, root, on_run, report, len(works))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _collect(futures: dict[Future[str], Workload], root: Path, on_run: RunCallback, report: Progress,
             total: int) -> None:
    remaining = set(futures)
    while remaining:
        finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
        for future in finished:
            run = load_run(future.result(), root=root)
            on_run(futures[future].job, run)
            report((total - len(remaining)) / total, f"finished {futures[future].job.label}")


# --- Ray -------------------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise WorkbenchError("--executor ray needs Ray: pip install 'mansu-workbench[ray]'") from exc
    return ray


def _ray_execute(work: Workload) -> tuple[str, dict[str, bytes]]:
    """A Ray task: run in a scratch root on whichever machine, send the run's files back, so
    the cluster needs no shared file system (only the workbench installed on every node)."""
    job = work.job
    oracle = load_model(job.oracle) if job.oracle else None
    with tempfile.TemporaryDirectory(prefix="workbench-ray-") as scratch:
        run = execute(load_model(job.model), work, scratch, oracle)
        return run.id, run_files(run)


def _run_on_ray(works: Sequence[Workload], root: Path, on_run: RunCallback, report: Progress) -> None:
    """One Ray task per job (one CPU each); runs are written into ``root`` here, as they arrive."""
    ray = _import_ray()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)
    task = ray.remote(num_cpus=1, max_retries=0)(_ray_execute)
    refs = {task.remote(w): w for w in works}
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                work = refs.pop(ref)
                run_id, files = ray.get(ref)
                on_run(work.job, import_run(run_id, files, root=root))
                report((len(works) - len(refs)) / len(works), f"finished {work.job.label}")
    finally:
        for ref in refs:  # interrupted or failed: nothing new starts
            ray.cancel(ref)
