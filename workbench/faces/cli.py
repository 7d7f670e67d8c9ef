"""The command-line face: ``workbench <command> ...``. Thin: every number comes from the core."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from workbench.core.errors import WorkbenchError
from workbench.data.facts import FactSplit
from workbench.data.files import load_fact_file
from workbench.experiments.flow import attribute_forget_set, oracle_for, run_unlearning
from workbench.experiments.probing import probe_rows, probe_run
from workbench.experiments.store import list_runs, load_run
from workbench.faces.bench import run_bench
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
    write_comparison,
)
from workbench.faces.tables import text_histogram, text_table
from workbench.interpretability.attribution import AttributionConfig, make_prompt_pairs
from workbench.interpretability.circuit import Circuit
from workbench.interpretability.faithfulness import faithfulness
from workbench.measurement.evaluation import evaluate_split
from workbench.measurement.metrics import Thresholds, report_card_rows, summary_lines
from workbench.measurement.results import RunMetrics
from workbench.models.builtin_splits import builtin_split
from workbench.models.builtins import DEFAULT_MODEL, build_info, build_model, list_models
from workbench.models.loading import load_model
from workbench.models.update import Update
from workbench.quant import (
    QuantConfig,
    bin_occupancy,
    compare_quantization,
    quantizable_parameters,
    transposed_parameters,
    weight_relative_error,
)
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.registry import METHODS, default_lr
from workbench.unlearning.task import OptimConfig, StopRule

QUANT_CHOICES = ("nf4", "fp4", "int8", "none")


def _quant(args: argparse.Namespace):

    if args.quant == "none":
        return None
    return QuantConfig(args.quant, blocksize=args.blocksize, double_quant=args.double_quant)


def _add_quant_args(p: argparse.ArgumentParser, default: str = "nf4") -> None:
    p.add_argument("--quant", choices=QUANT_CHOICES, default=default, help="quantizer (default %(default)s)")
    p.add_argument("--blocksize", type=int, default=64, help="quantization block size (default 64)")
    p.add_argument("--double-quant", action="store_true", help="also quantize the block scales (bnb compress_statistics)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--forget", help="forget-set fact file (JSONL or CSV); default: the model's built-in split")
    p.add_argument("--retain", help="retain-set fact file (JSONL or CSV)")
    p.add_argument("--forget-domain", help="built-in split: which domain to forget")


def load_split(model, args: argparse.Namespace):
    """The split the user asked for: fact files if given, else the built-in one."""

    forget_file = getattr(args, "forget", None)
    retain_file = getattr(args, "retain", None)
    if forget_file or retain_file:
        if not (forget_file and retain_file):
            raise WorkbenchError("give both --forget and --retain fact files (or neither for the built-in split)")
        kw = {"tokenizer": model.tokenizer, "max_context": model.n_ctx}
        forget = load_fact_file(forget_file, **kw)
        retain = load_fact_file(retain_file, **kw)
        return FactSplit(name="user", forget=forget, retain=retain, forget_paraphrase=(), retain_paraphrase=())
    return builtin_split(model, forget_domain=getattr(args, "forget_domain", None))


# --- commands ----------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:

    rows = []
    for m in list_models():
        info = build_info(m["name"]) if m["cached"] else {}
        rows.append({"model": m["name"], "cached": m["cached"], "build s": info.get("build_seconds"),
                     "params": info.get("n_params"), "path": m["path"]})
    print(text_table(rows))
    return 0


def cmd_build(args: argparse.Namespace) -> int:

    path = build_model(args.name, force=args.force)
    info = build_info(args.name)
    print(f"{args.name}: {path} (built in {info.get('build_seconds', '?')} s)")
    return 0


def evaluation_rows(model, split, quants: Sequence[Any], multiple_choice: bool = True) -> list[dict[str, Any]]:
    """One row per (set, precision): top-1, multiple choice, mean answer probability."""

    rows = []
    for q in quants:
        label = "fp32" if q is None else q.label
        for set_name, s in evaluate_split(model, split, quant=q, multiple_choice=multiple_choice).items():
            rows.append({"set": set_name, "precision": label, "n": s.n, "top1": s.top1, "mc": s.mc, "p(answer)": s.mean_prob})
    return rows


def cmd_eval(args: argparse.Namespace) -> int:

    model = load_model(args.model)
    if args.data:
        facts = load_fact_file(args.data, tokenizer=model.tokenizer, max_context=model.n_ctx)
        split = FactSplit(name=args.data, forget=facts, retain=(), forget_paraphrase=(), retain_paraphrase=())
    else:
        split = load_split(model, args)
    q = _quant(args)
    rows = evaluation_rows(model, split, [None] if q is None else [None, q])
    if args.data:
        for r in rows:
            r["set"] = "data"
    if args.json:
        # a score that does not exist (mc of cloze-only facts) is null: NaN is not JSON
        rows = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
        print(json.dumps({"model": args.model, "split": split.name, "rows": rows}, indent=2, allow_nan=False))
    else:
        print(f"model {args.model} · split {split.name}")
        print(text_table(rows))
    return 0


def cmd_quant_report(args: argparse.Namespace) -> int:

    model = load_model(args.model)
    q = _quant(args)
    if q is None:
        raise WorkbenchError("quant-report needs a quantizer: --quant nf4, fp4 or int8")
    names = quantizable_parameters(model.hf, q)
    state = model.state()
    tr = transposed_parameters(model.hf)
    err = weight_relative_error(state, names, q, transposed=tr)
    occupancy = bin_occupancy(state, names, q, transposed=tr)
    report: dict[str, Any] = {
        "model": args.model,
        "quant": q.to_dict(),
        "n_modules": len(names),
        "n_weights": int(sum(state[n].numel() for n in names)),
        "relative_error": err,
        "bin_occupancy_overall": [int(c) for c in occupancy["overall"]],
    }
    if args.update:
        update = Update.load(args.update)
        update.check_fits(model)
        deltas = {n: d for n, d in update.deltas.items() if n in names}
        comparison = compare_quantization(state, deltas, names, q, transposed=tr)
        report["comparison"] = comparison.to_dict()
    if args.json:
        print(json.dumps(report, indent=2, default=float))
        return 0
    print(f"model {args.model} · {q.label} · {report['n_modules']} modules · {report['n_weights']:,} weights")
    print(f"relative weight error ‖Q(w)−w‖/‖w‖ overall: {err['overall']:.4f}")
    counts = occupancy["overall"]
    print("bin occupancy (all quantized weights):")
    print(text_histogram(list(counts), [f"code {i:>2}" for i in range(len(counts))]))
    if "comparison" in report:
        c = report["comparison"]["overall"]
        print(text_table([{k: v for k, v in c.items() if not isinstance(v, (list, dict))}]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Headless end-to-end: build the default, evaluate full precision vs NF4, summarise bins."""

    name = args.model or DEFAULT_MODEL
    t0 = time.perf_counter()
    print(f"== loading {name} (built and cached on first use)")
    model = load_model(name)
    split = builtin_split(model)
    print(f"   {time.perf_counter() - t0:.1f} s · split {split.name}: forget {len(split.forget)}, retain {len(split.retain)}")
    q = QuantConfig("nf4")
    print("== accuracy, full precision vs NF4 of the base")
    # Top-1 only: multiple choice over ~1000 SmolLM2 facts costs minutes (use `workbench eval`).
    print(text_table(evaluation_rows(model, split, [None, q], multiple_choice=False)))
    names = quantizable_parameters(model.hf, q)
    state = model.state()
    tr = transposed_parameters(model.hf)
    err = weight_relative_error(state, names, q, transposed=tr)
    print(f"== NF4 of {len(names)} weight matrices: relative error {err['overall']:.4f}")
    counts = bin_occupancy(state, names, q, transposed=tr)["overall"]
    print(text_histogram(list(counts), [f"code {i:>2}" for i in range(len(counts))]))
    print(f"== done in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:

    model = load_model(args.model)
    split = load_split(model, args)
    config = AttributionConfig(method=args.method, ig_steps=args.ig_steps, metric=args.metric, edges=args.edges)
    attribution = attribute_forget_set(model, split, config)
    circuit = Circuit.from_attribution(attribution).select_top_k(args.top_k, include_embed=False)
    path = circuit.save(args.out)
    print(f"{attribution.n_pairs} prompt pairs · clean metric {attribution.clean_metric:.3f} · "
          f"corrupt {attribution.corrupt_metric:.3f} ({attribution.metric})")
    rows = [{"component": c.name, "score": s, "in circuit": c in circuit.selected} for c, s in attribution.top(max(args.top_k, 10))]
    print(text_table(rows))
    print(f"circuit with {len(circuit.selected)} components saved to {path}")
    return 0


def cmd_circuit_show(args: argparse.Namespace) -> int:

    circuit = Circuit.load(args.file)
    meta = circuit.metadata
    print(", ".join(f"{k}={v}" for k, v in meta.items() if v is not None))
    ranked = sorted(circuit.scores.items(), key=lambda kv: -abs(kv[1]))
    rows = [{"component": c.name, "score": s, "selected": c in circuit.selected} for c, s in ranked[: args.rows]]
    print(text_table(rows))
    print(f"{len(circuit.selected)} of {len(circuit.components)} components selected")
    return 0


def cmd_circuit_faithfulness(args: argparse.Namespace) -> int:

    model = load_model(args.model)
    circuit = Circuit.load(args.file, model=model)
    split = load_split(model, args)
    pairs = make_prompt_pairs(model, split.forget, metric=circuit.metric)
    f = faithfulness(circuit, model, pairs, ablation=args.ablation)
    print(f"circuit of {f.n_components} components, {args.ablation} ablation:")
    print(f"  recovered (everything outside ablated): {f.recovered:.3f}")
    print(f"  drop (circuit itself ablated):          {f.drop:.3f}")
    print(f"  metric clean {f.clean_metric:.3f} · corrupt {f.corrupt_metric:.3f}")
    return 0


def report_card_text(metrics: RunMetrics) -> str:
    """The four properties as a small table."""

    return text_table(report_card_rows(metrics))


def metrics_summary_text(metrics: RunMetrics) -> str:

    rows = [{"set": name, "base fp": acc.base_fp, "base Q": acc.base_q, "after fp": acc.after_fp,
             "Q(w)+Δ": acc.after_qbase_delta, "after Q": acc.after_q}
            for name, acc in (("forget", metrics.forget), ("retain", metrics.retain))]
    return "\n".join([text_table(rows), *summary_lines(metrics)])


class _Bar:
    """A ``progress(fraction, message)`` callback drawn as one tqdm bar on stderr."""

    def __init__(self, desc: str) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=1000, desc=desc, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}")

    def __call__(self, fraction: float, message: str) -> None:
        self._bar.n = int(1000 * min(1.0, max(0.0, fraction)))
        self._bar.set_postfix_str(message[:80], refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()



def cmd_unlearn(args: argparse.Namespace) -> int:

    model = load_model(args.model)
    split = load_split(model, args)
    circuit = Circuit.load(args.circuit, model=model) if args.circuit else None
    q = _quant(args)
    if q is None:
        raise WorkbenchError("unlearn needs a quantizer to measure against: --quant nf4, fp4 or int8")
    method_config = None
    optim = stop = None
    if args.method == "mansu":
        method_config = MansuConfig(
            use_circuit=not args.no_circuit, use_projection=not args.no_projection,
            use_fisher=not args.no_fisher, use_floor=not args.no_floor,
            params_per_round=args.params_per_round, max_rounds=args.max_rounds, forget_target=args.forget_target,
            fisher_budget=args.fisher_budget, code_steps=args.code_steps, retain_guard=args.retain_guard,
        )
    else:
        optim = OptimConfig(lr=args.lr or default_lr(model))
        stop = StopRule(max_steps=args.max_steps, forget_target=args.forget_target)
    oracle = None if args.no_oracle else oracle_for(model)
    bar = _Bar(f"{args.method} on {model.name}")
    try:
        result, metrics, run = run_unlearning(
            model, split, method=args.method, quant=q, circuit=circuit, method_config=method_config, optim=optim,
            stop=stop, thresholds=Thresholds(cad_min=args.cad_min), oracle=oracle, runs_root=args.out, progress=bar,
        )
    finally:
        bar.close()
    print(f"{metrics.method} on {model.name} ({split.name}): {result.steps} steps, stopped by {result.stopped}, "
          f"{metrics.seconds:.1f} s")
    print(metrics_summary_text(metrics))
    print(report_card_text(metrics))
    if run is not None:
        print(f"run saved: {run.path}")
    return 0


def cmd_runs_list(args: argparse.Namespace) -> int:

    rows = []
    for run in list_runs(root=args.root):
        m = run.metrics
        rows.append({"run": run.id, "method": m.method, "model": m.model, "forget fp": m.forget.after_fp,
                     "forget Q": m.forget.after_q, "ptq gap": m.ptq_gap, "passes": m.properties.passes(),
                     "seconds": m.seconds})
    print(text_table(rows) if rows else "no runs yet")
    return 0


def cmd_report(args: argparse.Namespace) -> int:

    run = load_run(args.run, root=args.root)
    if args.json:
        print(json.dumps(run.metrics.to_json(), indent=2))
        return 0
    m = run.metrics
    size = (run.path / "update.safetensors").stat().st_size
    print(f"run {run.id}: {m.method} on {m.model} ({m.split}), {m.seconds:.1f} s, update file {size:,} bytes")
    print(metrics_summary_text(m))
    print(report_card_text(m))
    return 0


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


def _emit_comparison(rows: list[dict[str, Any]], runs: list[Any], out: str | None) -> None:

    if out:
        path = write_comparison(rows, out, runs)
        print(f"comparison of {len(rows)} runs written to {path}")
    else:
        print(comparison_markdown(rows))


def cmd_compare(args: argparse.Namespace) -> int:

    if args.out:
        output_format(args.out)  # a bad extension fails before any work
    runs = load_runs(args.runs, root=args.root)
    rows = compare_table(runs, all_quantizers=args.all_quantizers)
    _emit_comparison(rows, runs, args.out)
    return 0


def cmd_paper_table(args: argparse.Namespace) -> int:

    if args.out:
        output_format(args.out)
    methods = _methods_arg(args.methods)
    stop = StopRule(max_steps=args.max_steps, forget_target=args.forget_target)
    q = _quant(args)
    if q is None:
        raise WorkbenchError("paper-table needs a quantizer: --quant nf4, fp4 or int8")
    model = load_model(args.model)
    split = load_split(model, args)
    oracle = None if args.no_oracle else oracle_for(model)
    bar = _Bar(f"paper table on {model.name}")
    try:
        runs = paper_table(model, methods=methods, split=split, stop=stop, quant=q, measure_cad=not args.no_cad,
                           oracle=oracle, runs_root=args.runs_root, progress=bar)
    finally:
        bar.close()
    rows = compare_table(runs, all_quantizers=args.all_quantizers)
    print(f"{len(runs)} runs on {model.name} ({split.name}), saved under {runs[0].path.parent}")
    _emit_comparison(rows, runs, args.out)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:

    if args.out:
        output_format(args.out)
    ablations = check_ablations((args.ablations or ",".join(ABLATIONS)).split(","))  # before the model loads
    q = _quant(args)
    if q is None:
        raise WorkbenchError("ablate needs a quantizer: --quant nf4, fp4 or int8")
    config = MansuConfig(**{k: v for k, v in {"max_rounds": args.max_rounds, "retain_guard": args.retain_guard,
                                                "forget_target": args.forget_target}.items() if v is not None})
    model = load_model(args.model)
    split = load_split(model, args)
    circuit = Circuit.load(args.circuit, model=model) if args.circuit else None
    oracle = None if args.no_oracle else oracle_for(model)
    bar = _Bar(f"ablations on {model.name}")
    try:
        runs = ablation_table(model, ablations=ablations, config=config, split=split, quant=q, circuit=circuit,
                              measure_cad=not args.no_cad, oracle=oracle, runs_root=args.runs_root, progress=bar)
    finally:
        bar.close()
    rows = compare_table(runs)
    print(f"{len(runs)} runs on {model.name} ({split.name}), saved under {runs[0].path.parent}")
    _emit_comparison(rows, runs, args.out)
    print("\nwhat each component carries here (full MANSU vs the component switched off):")
    for line in ablation_findings(rows):
        print(f"  {line}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:

    run = load_run(args.run, root=args.root)
    split = None
    if args.forget or args.retain:
        split = load_split(load_model(run.metrics.model), args)
    bar = _Bar(f"probes of {run.id}")
    try:
        result = probe_run(run, relearn_steps=args.relearn_steps, relearn_lr=args.relearn_lr, split=split, progress=bar)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"probes of run {run.id}: {result['method']} on {result['model']} ({result['split']}), {result['quant']}")
    print(text_table(probe_rows(result)))
    if result.get("membership_skipped"):
        print(f"membership inference skipped: {result['membership_skipped']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:

    return run_bench(sections=args.sections, quick=args.quick, json_path=args.json)


# --- entry point -------------------------------------------------------------------------

Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="MANSU workbench: circuit attribution, "
                                     "quantization-permanent unlearning and NF4 analysis")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list built-in models and whether they are cached")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("build", help="build (train or convert) a built-in model into the cache")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("eval", help="fact accuracy in full precision and quantized")
    p.add_argument("--model", required=True, help="facts, facts-tiny, smollm2, or a local HF directory")
    p.add_argument("--data", help="a fact file to evaluate instead of the built-in split")
    _add_data_args(p)
    _add_quant_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quant-report", help="quantization error, bin occupancy, and an update's code flips")
    p.add_argument("--model", required=True)
    p.add_argument("--update", help="an update.safetensors to analyse against the base")
    _add_quant_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quant_report)

    p = sub.add_parser("demo", help="headless end-to-end run on the default model")
    p.add_argument("--model", help="default: smollm2")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("attribute", help="attribute the forget-set behaviour to heads and MLPs; save a circuit")
    p.add_argument("--model", required=True)
    _add_data_args(p)
    p.add_argument("--method", choices=("atp", "ig", "exact"), default="atp")
    p.add_argument("--ig-steps", type=int, default=8)
    p.add_argument("--metric", choices=("logit_diff", "logprob"), default="logit_diff")
    p.add_argument("--edges", action="store_true", help="also score edges (EAP)")
    p.add_argument("--top-k", type=int, default=10, help="components selected into the circuit")
    p.add_argument("--out", default="circuit.json")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("circuit", help="inspect a saved circuit")
    csub = p.add_subparsers(dest="circuit_command", required=True)
    c = csub.add_parser("show", help="print a circuit's components and scores")
    c.add_argument("file")
    c.add_argument("--rows", type=int, default=20)
    c.set_defaults(func=cmd_circuit_show)
    c = csub.add_parser("faithfulness", help="how much of the behaviour the circuit alone carries")
    c.add_argument("file")
    c.add_argument("--model", required=True)
    _add_data_args(c)
    c.add_argument("--ablation", choices=("corrupt", "mean"), default="corrupt")
    c.set_defaults(func=cmd_circuit_faithfulness)


    p = sub.add_parser("unlearn", help="run MANSU or a baseline, measure it, save the run")
    p.add_argument("--model", required=True)
    _add_data_args(p)
    p.add_argument("--method", choices=METHODS, default="mansu")
    p.add_argument("--circuit", help="circuit JSON (default for MANSU: attribute and take the top 10)")
    _add_quant_args(p)
    p.add_argument("--out", help="runs directory (default ./runs or $WORKBENCH_RUNS)")
    p.add_argument("--forget-target", type=float, default=0.1, help="stop when forget top-1 <= this")
    p.add_argument("--max-steps", type=int, default=100, help="gradient methods: step budget")
    p.add_argument("--lr", type=float, help="gradient methods: Adam learning rate (default per model)")
    p.add_argument("--params-per-round", type=int, default=None,
                   help="MANSU: weights moved per round (default: 0.2%% of the circuit's weights, at least 32)")
    p.add_argument("--code-steps", type=int, default=2, help="MANSU floor: quantization codes each moved weight crosses")
    p.add_argument("--max-rounds", type=int, default=60, help="MANSU: round budget")
    p.add_argument("--fisher-budget", type=float, default=0.05, help="MANSU: ε on ½ΣFΔ² (nats)")
    p.add_argument("--retain-guard", type=float, default=0.02,
                   help="MANSU: undo a round that drops retain top-1 by more than this (default 0.02)")
    for flag in ("circuit", "projection", "fisher", "floor"):
        p.add_argument(f"--no-{flag}", action="store_true", help=f"MANSU ablation: switch off the {flag} component")
    p.add_argument("--cad-min", type=float, default=0.1, help="structural-erasure threshold τ on CAD")
    p.add_argument("--no-oracle", action="store_true", help="skip the retrain oracle comparison")
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser("runs", help="saved runs")
    rsub = p.add_subparsers(dest="runs_command", required=True)
    r = rsub.add_parser("list", help="list complete runs, newest first")
    r.add_argument("--root", help="runs directory")
    r.set_defaults(func=cmd_runs_list)

    p = sub.add_parser("report", help="a saved run's metrics and report card")
    p.add_argument("run")
    p.add_argument("--root", help="runs directory")
    p.add_argument("--json", action="store_true", help="print metrics.json")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="compare saved runs side by side (table and figures)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run ids")
    p.add_argument("--root", help="runs directory")
    p.add_argument("--out", help="write the table to FILE (.md, .csv, or .html with figures); default: markdown to stdout")
    p.add_argument("--all-quantizers", action="store_true",
                   help="also evaluate each run's after-model under NF4, FP4 and int8 (forget/retain top-1)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("paper-table", help="run MANSU and every baseline on one split with one budget; compare them")
    p.add_argument("--model", required=True)
    _add_data_args(p)
    _add_quant_args(p)
    p.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)} (default: all)")
    p.add_argument("--max-steps", type=int, default=100, help="gradient methods: step budget (shared)")
    p.add_argument("--forget-target", type=float, default=0.1, help="shared stopping rule: forget top-1 <= this")
    p.add_argument("--out", help="write the table to FILE (.md, .csv, .html); default: markdown to stdout")
    p.add_argument("--runs-root", help="where the runs are saved (default ./runs or $WORKBENCH_RUNS)")
    p.add_argument("--all-quantizers", action="store_true", help="fill NF4/FP4/int8 columns for every run")
    p.add_argument("--no-cad", action="store_true", help="skip CAD (attribution before/after) for speed")
    p.add_argument("--no-oracle", action="store_true", help="skip the retrain oracle comparison")
    p.set_defaults(func=cmd_paper_table)

    p = sub.add_parser("ablate", help="MANSU and MANSU with each component switched off alone; compare them")
    p.add_argument("--model", required=True)
    _add_data_args(p)
    _add_quant_args(p)
    p.add_argument("--ablations", help="comma-separated subset of: circuit, projection, fisher, floor (default: all)")
    p.add_argument("--circuit", help="circuit JSON shared by every run (default: attribute and take the top 10)")
    p.add_argument("--max-rounds", type=int, help="MANSU round budget for every run")
    p.add_argument("--retain-guard", type=float, help="MANSU retain guard for every run (default 0.02)")
    p.add_argument("--forget-target", type=float, help="stop when fp and quantized forget top-1 <= this (default 0.1)")
    p.add_argument("--out", help="write the table to FILE (.md, .csv, .html); default: markdown to stdout")
    p.add_argument("--runs-root", help="where the runs are saved (default ./runs or $WORKBENCH_RUNS)")
    p.add_argument("--no-cad", action="store_true", help="skip CAD (attribution before/after) for speed")
    p.add_argument("--no-oracle", action="store_true", help="skip the retrain oracle comparison")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("probe", help="robustness probes of a saved run: paraphrase, relearning attack, membership inference")
    p.add_argument("run")
    p.add_argument("--root", help="runs directory")
    _add_data_args(p)
    p.add_argument("--relearn-steps", type=int, default=10, help="relearning attack: fine-tuning steps")
    p.add_argument("--relearn-lr", type=float, help="relearning attack: Adam learning rate (default per model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("bench", help="speed and memory ratios, measured in one process")
    p.add_argument("sections", nargs="*", help="attribution, quantization, unlearning (default: all)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="also write the table as JSON to this file")
    p.set_defaults(func=cmd_bench)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Later steps of the data flow register their commands here (attribution, unlearning, ...).
_EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
