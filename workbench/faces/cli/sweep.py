"""``sweep CONFIG``: methods × forget domains × models × quantizers from a TOML file, as saved
runs that resume (finished jobs are skipped), on this machine or on Ray; then the table."""

from __future__ import annotations

import argparse

from workbench.experiments.sweep import run_jobs
from workbench.experiments.sweep_config import load_sweep_config, plan_sweep
from workbench.faces.cli.common import (
    Bar,
    Printer,
    add_executor_args,
    add_json,
    add_runs_root,
    add_tracking_args,
    executor_from_args,
    tracker_from_args,
    tracking_callback,
)
from workbench.faces.cli.comparisons import TABLE_OUT_HELP, emit_table
from workbench.faces.compare import output_format, sweep_table


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run methods × forget domains × models × quantizers from a TOML file "
                       "(resumable; --jobs N or --executor ray); compare them")
    p.add_argument("config", metavar="CONFIG", help="sweep file (TOML; see examples/sweep.toml)")
    p.add_argument("--out", metavar="FILE", help=TABLE_OUT_HELP)
    add_runs_root(p, what="where the runs are saved and finished jobs are looked up")
    add_executor_args(p)
    add_tracking_args(p)
    add_json(p)
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace, out: Printer) -> int:
    # everything that can be refused is checked before the first job: file, keys, output, executor, tracker
    config = load_sweep_config(args.config)
    if args.out:
        output_format(args.out)
    executor = executor_from_args(args)
    tracker = tracker_from_args(args)
    plan = plan_sweep(config)
    bar = Bar(f"sweep of {len(plan.jobs)} jobs")
    try:
        done = run_jobs(plan.jobs, plan.groups, runs_root=args.runs_root, executor=executor, progress=bar,
                        on_run=tracking_callback(tracker))
    finally:
        bar.close()
    out.line(f"{len(done.runs)} runs ({done.ran} run now, {done.skipped} finished before and skipped), "
             f"saved under {done.runs[0].path.parent}")
    emit_table(out, sweep_table(done.runs), done.runs, args.out, {"ran": done.ran, "skipped": done.skipped})
    return 0
