"""``eval``, ``quant-report`` and ``bench``: measuring a model, its quantization, and the workbench's speed."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact, FactSplit
from workbench.data.files import load_fact_file
from workbench.experiments.store import resolve_run
from workbench.faces.bench import run_bench
from workbench.faces.cli.common import (
    Printer,
    add_data_args,
    add_json,
    add_quant_args,
    add_runs_root,
    load_split,
    optional_quant,
    quant_from_args,
)
from workbench.faces.tables import text_histogram, text_table
from workbench.measurement.benchmarks import benchmark_scores, forget_quality, truth_ratios
from workbench.measurement.evaluation import evaluate_split
from workbench.models.loaded import LoadedModel
from workbench.models.loading import load_model
from workbench.models.update import Update
from workbench.quant import (
    QuantConfig,
    bin_occupancy,
    compare_quantization,
    weight_relative_error,
)
from workbench.unlearning.mansu.config import StatePrecision


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="fact accuracy in full precision and quantized")
    p.add_argument("--model", required=True, help="facts, facts-tiny, smollm2, or a local HF directory")
    p.add_argument("--data", help="a fact file to evaluate instead of the built-in split")
    add_data_args(p)
    p.add_argument("--runs", nargs="+", metavar="RUN", default=[],
                   help="also evaluate these saved runs' unlearned models on the data, beside the base")
    add_runs_root(p, what="where run ids given to --runs are looked up")
    p.add_argument("--oracle", metavar="MODEL",
                   help="a retrain oracle (model name or directory) for the forget quality of question-answer data")
    add_quant_args(p)
    add_json(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quant-report", help="quantization error, bin occupancy, and an update's code flips")
    p.add_argument("--model", required=True)
    p.add_argument("--update", metavar="UPDATE_OR_RUN",
                   help="an update.safetensors, or a run (id or directory), to analyse against the base")
    add_runs_root(p, what="where a run id given to --update is looked up")
    add_quant_args(p)
    add_json(p)
    p.set_defaults(func=cmd_quant_report)

    p = sub.add_parser("bench", help="speed and memory ratios, measured in one process")
    p.add_argument("sections", nargs="*", help="attribution, quantization, unlearning, memory, scale (default: "
                                               "these five); flow (the app's default flow, fast vs reference path)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads of the flow section (default 1: its ratios hold on a shared machine; "
                        "the app's own count, e.g. 2 here, for its seconds as a user waits them)")
    p.add_argument("--mansu-state", choices=get_args(StatePrecision), default="auto",
                   help="MANSU's per-weight state in the scale section: auto (default: the weights' storage "
                        "dtype, bfloat16 there), float32 (twice its bytes, other last bits) or storage")
    p.add_argument("--out", metavar="FILE", help="also write the report as JSON to FILE")
    add_json(p)
    p.set_defaults(func=cmd_bench)


def accuracy_rows(model: LoadedModel, split: FactSplit, quants: Sequence[QuantConfig | None],
                  multiple_choice: bool = True) -> list[dict[str, Any]]:
    """One row per (set, precision): first-token top-1, greedy exact match of the whole answer,
    answer log-probability (summed over its tokens), multiple choice, first-token probability."""

    rows = []
    for q in quants:
        label = "fp32" if q is None else q.label
        for set_name, s in evaluate_split(model, split, quant=q, multiple_choice=multiple_choice).items():
            rows.append({"set": set_name, "precision": label, "n": s.n, "top1": s.top1, "exact": s.exact,
                         "logprob": s.logprob, "mc": s.mc, "p(answer)": s.mean_prob})
    return rows


def benchmark_rows(model: LoadedModel, facts: Sequence[Fact], runs: Sequence[str], runs_root: str | None,
                   oracle: str | None, forget: bool = True) -> list[dict[str, Any]]:
    """The benchmark metrics of the base and of each run's unlearned model (docs/SCIENCE.md §9);
    forget quality only on a forget set (``forget``)."""
    models = {"base": model}
    for ref in runs:
        run = resolve_run(ref, root=runs_root)
        models[f"{run.metrics.method} ({run.id})"] = run.update().apply(model, f"{model.name}+{run.id}")
    qa = [f for f in facts if f.kind == "qa"]
    oracle_ratios = truth_ratios(load_model(oracle), qa) if oracle and qa else None
    reason = "" if oracle else "no retrain oracle given; pass --oracle MODEL"
    rows = []
    for label, m in models.items():
        scores = benchmark_scores(m, facts)
        row: dict[str, Any] = {"model": label, **scores.row()}
        if scores.qa is not None and forget:
            quality = forget_quality(scores.qa.truth_ratios, oracle_ratios, reason)
            row["qa forget quality"] = quality.pvalue if quality.pvalue is not None else quality.text()
        rows.append(row)
    return rows


def cmd_eval(args: argparse.Namespace, out: Printer) -> int:
    model = load_model(args.model)
    if args.data:
        facts = load_fact_file(args.data, tokenizer=model.tokenizer, max_context=model.n_ctx, format=args.data_format)
        split = FactSplit(name=args.data, forget=facts, retain=())
    else:
        split = load_split(model, args)
    q = optional_quant(args)
    rows = accuracy_rows(model, split, [None] if q is None else [None, q])
    if args.data:
        for r in rows:
            r["set"] = "data"
    sets = [split.forget, split.retain] if not args.data else [split.forget]
    shaped = [s for s in sets if any(f.kind != "cloze" for f in s)]
    if args.runs and not shaped:
        raise WorkbenchError("--runs compares benchmark metrics: give a multiple-choice, question-answer or text file")
    bench = {name: benchmark_rows(model, s, args.runs, args.runs_root, args.oracle, forget=name != "retain")
             for name, s in zip(("forget", "retain") if not args.data else ("data",), sets) if s in shaped}
    # a score that does not exist (mc of cloze-only facts) is null in the JSON: NaN is not JSON
    out.json({"model": args.model, "split": split.name, "rows": rows, "benchmarks": bench})
    out.line(f"model {args.model} · split {split.name}")
    out.line("top1 = first answer token is the argmax; exact = greedy decoding reproduces the whole answer; "
             "logprob = log p(answer) summed over its tokens")
    out.line(text_table(rows))
    for name, brows in bench.items():
        out.line(f"\nbenchmark metrics on {name} (docs/SCIENCE.md §9)")
        out.line(text_table(brows))
    return 0


def cmd_quant_report(args: argparse.Namespace, out: Printer) -> int:
    model = load_model(args.model)
    q = quant_from_args(args, "quant-report")
    names = model.adapter.quantizable(q)
    state, tr = model.state(), model.adapter.transposed
    err = weight_relative_error(state, names, q, transposed=tr)
    occupancy = [int(c) for c in bin_occupancy(state, names, q, transposed=tr)["overall"]]
    report: dict[str, Any] = {
        "model": args.model, "quant": q.to_dict(), "n_modules": len(names),
        "n_weights": int(sum(state[n].numel() for n in names)), "relative_error": err,
        "bin_occupancy_overall": occupancy,
    }
    if args.update:
        update = _update(args.update, args.runs_root)
        update.check_fits(model)
        deltas = update.only(names).deltas
        report["comparison"] = compare_quantization(state, deltas, names, q, transposed=tr).to_dict()
    out.json(report)
    out.line(f"model {args.model} · {q.label} · {report['n_modules']} modules · {report['n_weights']:,} weights")
    out.line(f"relative weight error ‖Q(w)−w‖/‖w‖ overall: {err['overall']:.4f}")
    out.line("bin occupancy (all quantized weights):")
    out.line(text_histogram(occupancy, [f"code {i:>2}" for i in range(len(occupancy))]))
    if "comparison" in report:
        c = report["comparison"]["overall"]
        out.line(text_table([{k: v for k, v in c.items() if not isinstance(v, (list, dict))}]))
    return 0


def _update(ref: str, runs_root: str | None) -> Update:
    """``--update``: an update file, or the update of a run (id or directory)."""
    if ref.endswith(".safetensors") or Path(ref).is_file():
        return Update.load(ref)
    return resolve_run(ref, root=runs_root).update()


def cmd_bench(args: argparse.Namespace, out: Printer) -> int:
    report = run_bench(sections=args.sections, quick=args.quick, flow_threads=args.threads,
                       scale_state=args.mansu_state)
    if args.out:
        try:
            Path(args.out).write_text(json.dumps(report, indent=2, default=float))
        except OSError as exc:
            raise WorkbenchError(f"cannot write the bench report to {args.out}: {exc.strerror}") from None
    out.json(report)
    return 0
