"""``unlearn``, ``runs list``, ``report`` and ``probe``: make a run, and read saved ones."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import get_args

from workbench.core.device import DTYPES
from workbench.experiments.export import export_lora_adapter, export_run
from workbench.experiments.flow import no_oracle_reason, oracle_for, run_base_model, run_unlearning
from workbench.experiments.probing import probe_rows, probe_run
from workbench.experiments.store import list_runs, resolve_run
from workbench.faces.cli.common import (
    Bar,
    Printer,
    add_data_args,
    add_json,
    add_quant_args,
    add_readings_arg,
    add_runs_root,
    add_tracking_args,
    load_split,
    quant_from_args,
    readings_from_args,
    tracker_from_args,
)
from workbench.faces.tables import text_table
from workbench.interpretability.circuit import Circuit
from workbench.measurement.metrics import Thresholds, report_card_rows, summary_lines
from workbench.measurement.results import PerVariant, RunMetrics
from workbench.models.loaded import LoadedModel
from workbench.models.loading import load_model
from workbench.unlearning.mansu.config import MANSU_VARIANTS, StatePrecision
from workbench.unlearning.registry import METHODS, MethodConfig, default_lr
from workbench.unlearning.task import OptimConfig, StopRule

RUN_HELP = "a run id (in --runs-root) or a run directory"


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_unlearn(sub)
    p = sub.add_parser("runs", help="saved runs")
    rsub = p.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    r = rsub.add_parser("list", help="list complete runs, newest first")
    add_runs_root(r, "--root")
    add_json(r)
    r.set_defaults(func=cmd_runs_list)

    p = sub.add_parser("report", help="a saved run's metrics and report card")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    add_runs_root(p, "--root")
    add_json(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("probe", help="robustness probes of a saved run: paraphrase, relearning attack, "
                       "membership inference")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    add_runs_root(p, "--root")
    add_data_args(p)
    p.add_argument("--relearn-steps", type=int, default=10, help="relearning attack: fine-tuning steps")
    p.add_argument("--relearn-lr", type=float, help="relearning attack: Adam learning rate (default per model)")
    add_json(p)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("export", help="write a run's unlearned model as a Hugging Face directory (or a LoRA run "
                       "as a PEFT adapter)")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="a new directory to write")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="storage dtype (default: the base model's)")
    p.add_argument("--adapter", action="store_true", help="LoRA runs: write the PEFT adapter instead of the model")
    add_runs_root(p)
    add_json(p)
    p.set_defaults(func=cmd_export)


def _add_unlearn(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("unlearn", help="run MANSU or a baseline, measure it, save the run")
    p.add_argument("--model", required=True)
    add_data_args(p)
    p.add_argument("--method", choices=METHODS, default="mansu")
    p.add_argument("--circuit", help="circuit JSON (default for MANSU: attribute and take the top 10)")
    add_quant_args(p)
    add_runs_root(p, "--out", what="where the run is saved")
    p.add_argument("--forget-target", type=float, default=0.1,
                   help="stop when forget top-1 <= this (multiple-choice forget sets: MC accuracy "
                        "<= max(this, chance))")
    p.add_argument("--max-steps", type=int, default=100, help="gradient methods: step budget")
    p.add_argument("--lr", type=float, help="gradient methods: Adam learning rate (default per model)")
    add_readings_arg(p)
    p.add_argument("--mansu-variant", choices=tuple(MANSU_VARIANTS), default="v1",
                   help="MANSU: which reading (docs/results/mansu_study.md; default v1); the flags below override it")
    p.add_argument("--params-per-round", type=int, default=None,
                   help="MANSU: weights moved per round (default: 0.2%% of the circuit's weights, at least 32)")
    p.add_argument("--code-steps", type=int, help="MANSU floor: quantization codes each moved weight crosses (2)")
    p.add_argument("--max-rounds", type=int, help="MANSU: round budget (60)")
    p.add_argument("--fisher-budget", type=float, help="MANSU: ε on ½ΣFΔ² in nats (0.05)")
    p.add_argument("--retain-guard", type=float,
                   help="MANSU: undo a round that drops retain top-1 by more than this (0.02)")
    for flag in ("circuit", "projection", "fisher", "floor"):
        p.add_argument(f"--no-{flag}", action="store_true", help=f"MANSU ablation: switch off the {flag} component")
    p.add_argument("--mansu-state", choices=get_args(StatePrecision),
                   help="MANSU: its Fisher, averaged forget direction and null-space projectors in float32 "
                        "or in the weights' storage dtype (half their memory on a bfloat16/float16 model; other "
                        "last bits, other moves); auto (the default): storage for a 16-bit model, else float32")
    p.add_argument("--cad-min", type=float, default=None,
                   help="structural-erasure threshold τ on CAD (default: calibrated on the retrain oracle "
                        "when the model has one, else 0.1)")
    p.add_argument("--no-oracle", action="store_true", help="skip the retrain oracle comparison")
    add_tracking_args(p)
    add_json(p)
    p.set_defaults(func=cmd_unlearn)


def _method_settings(args: argparse.Namespace, model: LoadedModel) -> tuple[MethodConfig | None, OptimConfig | None,
                                                                            StopRule | None]:
    """MANSU's config, or the gradient methods' optimiser and stopping rule, from the flags."""
    if args.method == "mansu":
        given = {"params_per_round": args.params_per_round, "max_rounds": args.max_rounds,
                 "fisher_budget": args.fisher_budget, "code_steps": args.code_steps, "retain_guard": args.retain_guard,
                 "state_precision": args.mansu_state}
        return replace(
            MANSU_VARIANTS[args.mansu_variant], use_circuit=not args.no_circuit, use_projection=not args.no_projection,
            use_fisher=not args.no_fisher, use_floor=not args.no_floor, forget_target=args.forget_target,
            **{k: v for k, v in given.items() if v is not None},
        ), None, None
    return None, OptimConfig(lr=args.lr or default_lr(model)), StopRule(max_steps=args.max_steps,
                                                                          forget_target=args.forget_target)


def cmd_unlearn(args: argparse.Namespace, out: Printer) -> int:
    tracker = tracker_from_args(args)  # a missing tracking library fails before the model loads
    readings = readings_from_args(args)  # and a bad --readings-every
    model = load_model(args.model)
    split = load_split(model, args)
    circuit = Circuit.load(args.circuit, model=model) if args.circuit else None
    q = quant_from_args(args, "unlearn")
    method_config, optim, stop = _method_settings(args, model)
    oracle = None if args.no_oracle else oracle_for(model, split)
    reason = None if args.no_oracle else no_oracle_reason(model, split)
    if reason is not None:
        out.line(reason)
    bar = Bar(f"{args.method} on {model.name}")
    try:
        result, metrics, run = run_unlearning(
            model, split, method=args.method, quant=q, circuit=circuit, method_config=method_config, optim=optim,
            stop=stop, readings=readings, thresholds=Thresholds(cad_min=args.cad_min),
            oracle=oracle, runs_root=args.runs_root, progress=bar,
        )
    finally:
        bar.close()
    assert run is not None  # run_unlearning saves by default
    if tracker is not None:
        tracker.log_run(run)
    out.json({"run_id": run.id, "path": str(run.path), "metrics": run.metrics.to_json()})
    out.line(f"{metrics.method} on {model.name} ({split.name}): {result.steps} steps, stopped by {result.stopped}, "
             f"{metrics.seconds:.1f} s")
    out.line(metrics_summary_text(metrics))
    out.line(text_table(report_card_rows(metrics)))
    out.line(f"run saved: {run.path}")
    return 0


def metrics_summary_text(metrics: RunMetrics) -> str:
    """The five variants' first-token top-1 on forget and retain (and, when measured, greedy exact
    match and answer log-probability), then the headline numbers in words."""
    tables: list[tuple[str, PerVariant]] = [("forget top-1", metrics.forget), ("retain top-1", metrics.retain)]
    for metric, scores in (("exact match", metrics.exact), ("answer log-prob", metrics.logprob)):
        if scores is not None:
            tables += [(f"forget {metric}", scores.forget), (f"retain {metric}", scores.retain)]
    rows = [{"set": name, "base fp": acc.base_fp, "base Q": acc.base_q, "after fp": acc.after_fp,
             "Q(w)+Δ": acc.after_qbase_delta, "after Q": acc.after_q} for name, acc in tables]
    return "\n".join([text_table(rows), *summary_lines(metrics)])


def cmd_runs_list(args: argparse.Namespace, out: Printer) -> int:
    rows = []
    for run in list_runs(root=args.runs_root):
        m = run.metrics
        rows.append({"run": run.id, "method": m.method, "model": m.model, "forget fp": m.forget.after_fp,
                     "forget Q": m.forget.after_q, "ptq gap": m.ptq_gap, "passes": m.properties.passes(),
                     "seconds": m.seconds, "path": str(run.path)})
    out.json(rows)
    out.line(text_table([{k: v for k, v in r.items() if k != "path"} for r in rows]) if rows else "no runs yet")
    return 0


def cmd_report(args: argparse.Namespace, out: Printer) -> int:
    run = resolve_run(args.run, root=args.runs_root)
    out.json(run.metrics.to_json())
    m = run.metrics
    size = (run.path / "update.safetensors").stat().st_size
    out.line(f"run {run.id}: {m.method} on {m.model} ({m.split}), {m.seconds:.1f} s, update file {size:,} bytes")
    out.line(metrics_summary_text(m))
    out.line(text_table(report_card_rows(m)))
    return 0


def cmd_probe(args: argparse.Namespace, out: Printer) -> int:
    run = resolve_run(args.run, root=args.runs_root)
    split = load_split(run_base_model(run), args) if args.forget or args.retain else None
    bar = Bar(f"probes of {run.id}")
    try:
        result = probe_run(run, relearn_steps=args.relearn_steps, relearn_lr=args.relearn_lr, split=split, progress=bar)
    finally:
        bar.close()
    out.json(result)
    out.line(f"probes of run {run.id}: {result['method']} on {result['model']} ({result['split']}), {result['quant']}")
    out.line(text_table(probe_rows(result)))
    if result.get("membership_skipped"):
        out.line(f"membership inference skipped: {result['membership_skipped']}")
    return 0


def cmd_export(args: argparse.Namespace, out: Printer) -> int:
    run = resolve_run(args.run, root=args.runs_root)
    if args.adapter:
        if args.dtype:
            out.line("note: --dtype is ignored for an adapter (its factors are float32)")
        export = export_lora_adapter(run, args.out)
    else:
        export = export_run(run, args.out, dtype=args.dtype)
    out.json({"path": str(export.path), "kind": export.kind, "dtype": export.dtype, "run_id": export.run_id})
    out.line(f"run {run.id} exported as a {export.kind} ({export.dtype}) to {export.path}")
    return 0
