"""The command-line face: ``workbench <command> ...``. Thin: every number comes from the core."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from workbench.errors import WorkbenchError

QUANT_CHOICES = ("nf4", "fp4", "int8", "none")


def _quant(args: argparse.Namespace):
    from workbench.quant import QuantConfig

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
    from workbench.facts import FactSplit, load_fact_file
    from workbench.splits import builtin_split

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
    from workbench.models import build_info, list_models
    from workbench.tables import text_table

    rows = []
    for m in list_models():
        info = build_info(m["name"]) if m["cached"] else {}
        rows.append({"model": m["name"], "cached": m["cached"], "build s": info.get("build_seconds"),
                     "params": info.get("n_params"), "path": m["path"]})
    print(text_table(rows))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from workbench.models import build_info, build_model

    path = build_model(args.name, force=args.force)
    info = build_info(args.name)
    print(f"{args.name}: {path} (built in {info.get('build_seconds', '?')} s)")
    return 0


def evaluation_rows(model, split, quants: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per (set, precision): top-1, multiple choice, mean answer probability."""
    from workbench.evaluation import evaluate_split

    rows = []
    for q in quants:
        label = "fp32" if q is None else q.label
        for set_name, s in evaluate_split(model, split, quant=q).items():
            rows.append({"set": set_name, "precision": label, "n": s.n, "top1": s.top1, "mc": s.mc, "p(answer)": s.mean_prob})
    return rows


def cmd_eval(args: argparse.Namespace) -> int:
    from workbench.facts import FactSplit, load_fact_file
    from workbench.models import load_model
    from workbench.tables import text_table

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
        print(json.dumps({"model": args.model, "split": split.name, "rows": rows}, indent=2))
    else:
        print(f"model {args.model} · split {split.name}")
        print(text_table(rows))
    return 0


def cmd_quant_report(args: argparse.Namespace) -> int:
    from workbench.models import load_model
    from workbench.quant import (
        bin_occupancy,
        compare_quantization,
        quantizable_parameters,
        transposed_parameters,
        weight_relative_error,
    )
    from workbench.tables import text_histogram, text_table
    from workbench.update import Update

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
    from workbench.models import DEFAULT_MODEL, load_model
    from workbench.quant import (
        QuantConfig,
        bin_occupancy,
        quantizable_parameters,
        transposed_parameters,
        weight_relative_error,
    )
    from workbench.splits import builtin_split
    from workbench.tables import text_histogram, text_table

    name = args.model or DEFAULT_MODEL
    t0 = time.perf_counter()
    print(f"== loading {name} (built and cached on first use)")
    model = load_model(name)
    split = builtin_split(model)
    print(f"   {time.perf_counter() - t0:.1f} s · split {split.name}: forget {len(split.forget)}, retain {len(split.retain)}")
    q = QuantConfig("nf4")
    print("== accuracy, full precision vs NF4 of the base")
    print(text_table(evaluation_rows(model, split, [None, q])))
    names = quantizable_parameters(model.hf, q)
    state = model.state()
    tr = transposed_parameters(model.hf)
    err = weight_relative_error(state, names, q, transposed=tr)
    print(f"== NF4 of {len(names)} weight matrices: relative error {err['overall']:.4f}")
    counts = bin_occupancy(state, names, q, transposed=tr)["overall"]
    print(text_histogram(list(counts), [f"code {i:>2}" for i in range(len(counts))]))
    print(f"== done in {time.perf_counter() - t0:.1f} s")
    return 0


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
