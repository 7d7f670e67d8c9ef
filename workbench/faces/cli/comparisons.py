"""``compare``, ``paper-table`` and ``ablate``: saved runs side by side, and the runs behind the tables."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from workbench.core.errors import WorkbenchError
from workbench.experiments.flow import oracle_for
from workbench.experiments.provenance import version_differences
from workbench.experiments.store import Run
from workbench.faces.cli.common import (
    Bar,
    Printer,
    add_data_args,
    add_executor_args,
    add_json,
    add_quant_args,
    add_readings_arg,
    add_runs_root,
    add_tracking_args,
    executor_from_args,
    load_split,
    quant_from_args,
    readings_from_args,
    tracker_from_args,
    tracking_callback,
)
from workbench.faces.compare import (
    ABLATIONS,
    ablation_findings,
    ablation_table,
    check_ablations,
    compare_table,
    comparison_markdown,
    load_runs,
    output_format,
    paper_table,
    run_labels,
    write_comparison,
)
from workbench.interpretability.circuit import Circuit
from workbench.models.loading import load_model
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.registry import METHODS
from workbench.unlearning.task import StopRule

TABLE_OUT_HELP = "write the table to FILE (.md, .csv, or .html with figures); default: markdown to stdout"


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare saved runs side by side (table and figures)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run ids (in --runs-root) or run directories")
    add_runs_root(p, "--root", what="where run ids are looked up")
    p.add_argument("--out", metavar="FILE", help=TABLE_OUT_HELP)
    p.add_argument("--all-quantizers", action="store_true",
                   help="also evaluate each run's after-model under NF4, FP4 and int8 (forget/retain top-1)")
    add_json(p)
    p.set_defaults(func=cmd_compare)
    _add_paper_table(sub)
    _add_ablate(sub)


def _add_table_run_args(p: argparse.ArgumentParser) -> None:
    """What paper-table and ablate share: model, data, quantizer, output and where runs go."""
    p.add_argument("--model", required=True)
    add_data_args(p)
    add_quant_args(p)
    p.add_argument("--out", metavar="FILE", help=TABLE_OUT_HELP)
    add_runs_root(p, what="where the runs are saved")
    p.add_argument("--no-cad", action="store_true", help="skip CAD (attribution before/after) for speed")
    p.add_argument("--no-oracle", action="store_true", help="skip the retrain oracle comparison")
    add_executor_args(p)
    add_tracking_args(p)
    add_json(p)


def _add_paper_table(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("paper-table", help="run MANSU and every baseline on one split with one budget; compare them")
    _add_table_run_args(p)
    p.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)} (default: all)")
    p.add_argument("--max-steps", type=int, default=100, help="gradient methods: step budget (shared)")
    p.add_argument("--forget-target", type=float, default=0.1,
                   help="shared stopping rule: forget top-1 <= this (multiple-choice forget sets: MC accuracy "
                        "<= max(this, chance))")
    p.add_argument("--all-quantizers", action="store_true", help="fill NF4/FP4/int8 columns for every run")
    add_readings_arg(p)
    p.set_defaults(func=cmd_paper_table)


def _add_ablate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="MANSU and MANSU with each component switched off alone; compare them")
    _add_table_run_args(p)
    p.add_argument("--ablations", help="comma-separated subset of: circuit, projection, fisher, floor (default: all)")
    p.add_argument("--circuit", help="circuit JSON shared by every run (default: attribute and take the top 10)")
    p.add_argument("--max-rounds", type=int, help="MANSU round budget for every run")
    p.add_argument("--retain-guard", type=float, help="MANSU retain guard for every run (default 0.02)")
    p.add_argument("--forget-target", type=float,
                   help="stop when fp and quantized forget top-1 <= this (default 0.1; multiple-choice forget "
                        "sets: MC accuracy, never below chance)")
    p.set_defaults(func=cmd_ablate)


def _methods_arg(value: str | None) -> list[str] | None:
    """``--methods a,b,c`` → a list, each checked against METHODS."""

    if not value:
        return None
    methods = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods:
        raise WorkbenchError(f"--methods {value!r} names no method; choose from {', '.join(METHODS)}")
    if unknown:
        raise WorkbenchError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return methods


def emit_table(out: Printer, rows: list[dict[str, Any]], runs: Sequence[Run], path: str | None,
          extra: dict[str, Any] | None = None) -> None:
    """The table: to ``path`` if given (else markdown on stdout), or JSON (rows, runs, file written)."""
    written = write_comparison(rows, path, runs) if path else None
    out.json({"rows": rows, "runs": [{"id": r.id, "path": str(r.path)} for r in runs],
              "out": str(written) if written else None, **(extra or {})})
    if written:
        out.line(f"comparison of {len(rows)} runs written to {written}")
    else:
        out.line(comparison_markdown(rows))


def cmd_compare(args: argparse.Namespace, out: Printer) -> int:
    if args.out:
        output_format(args.out)  # a bad extension fails before any work
    runs = load_runs(args.runs, root=args.runs_root)
    for line in version_differences([r.config for r in runs], run_labels(runs)):
        print(f"warning: the runs were made with different versions of {line}", file=sys.stderr)
    emit_table(out, compare_table(runs, all_quantizers=args.all_quantizers), runs, args.out)
    return 0


def cmd_paper_table(args: argparse.Namespace, out: Printer) -> int:
    if args.out:
        output_format(args.out)
    methods = _methods_arg(args.methods)
    stop = StopRule(max_steps=args.max_steps, forget_target=args.forget_target)
    q = quant_from_args(args, "paper-table")
    executor = executor_from_args(args)
    tracker = tracker_from_args(args)
    readings = readings_from_args(args)
    model = load_model(args.model)
    split = load_split(model, args)
    oracle = None if args.no_oracle else oracle_for(model, split)
    bar = Bar(f"paper table on {model.name}")
    try:
        runs = paper_table(model, methods=methods, split=split, stop=stop, quant=q, measure_cad=not args.no_cad,
                           oracle=oracle, runs_root=args.runs_root, progress=bar, executor=executor,
                           on_run=tracking_callback(tracker), readings=readings)
    finally:
        bar.close()
    out.line(f"{len(runs)} runs on {model.name} ({split.name}), saved under {runs[0].path.parent}")
    emit_table(out, compare_table(runs, all_quantizers=args.all_quantizers), runs, args.out)
    return 0


def cmd_ablate(args: argparse.Namespace, out: Printer) -> int:
    if args.out:
        output_format(args.out)
    ablations = check_ablations((args.ablations or ",".join(ABLATIONS)).split(","))  # before the model loads
    q = quant_from_args(args, "ablate")
    executor = executor_from_args(args)
    tracker = tracker_from_args(args)
    config = MansuConfig(**{k: v for k, v in {"max_rounds": args.max_rounds, "retain_guard": args.retain_guard,
                                                "forget_target": args.forget_target}.items() if v is not None})
    model = load_model(args.model)
    split = load_split(model, args)
    circuit = Circuit.load(args.circuit, model=model) if args.circuit else None
    oracle = None if args.no_oracle else oracle_for(model, split)
    bar = Bar(f"ablations on {model.name}")
    try:
        runs = ablation_table(model, ablations=ablations, config=config, split=split, quant=q, circuit=circuit,
                              measure_cad=not args.no_cad, oracle=oracle, runs_root=args.runs_root, progress=bar,
                              executor=executor, on_run=tracking_callback(tracker))
    finally:
        bar.close()
    rows = compare_table(runs)
    findings = ablation_findings(rows)
    out.line(f"{len(runs)} runs on {model.name} ({split.name}), saved under {runs[0].path.parent}")
    emit_table(out, rows, runs, args.out, {"findings": findings})
    out.line("\nwhat each component carries here (full MANSU vs the component switched off):")
    for line in findings:
        out.line(f"  {line}")
    return 0
