"""``models``, ``build`` and ``demo``: the built-in models, and a first look at one."""

from __future__ import annotations

import argparse
import time
from typing import Any

from workbench.faces.cli.common import Printer, add_json
from workbench.faces.cli.measure import accuracy_rows
from workbench.faces.tables import text_histogram, text_table
from workbench.models.builtin_splits import builtin_split
from workbench.models.builtins import DEFAULT_MODEL, build_info, build_model, list_models
from workbench.models.loading import load_model
from workbench.quant import (
    QuantConfig,
    bin_occupancy,
    weight_relative_error,
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list built-in models and whether they are cached")
    add_json(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("build", help="build (train or convert) a built-in model into the cache")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    add_json(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("demo", help="headless end-to-end run on the default model")
    p.add_argument("--model", help=f"default: {DEFAULT_MODEL}")
    add_json(p)
    p.set_defaults(func=cmd_demo)


def cmd_models(args: argparse.Namespace, out: Printer) -> int:
    rows = []
    for m in list_models():
        info = build_info(m["name"]) if m["cached"] else {}
        rows.append({"model": m["name"], "cached": m["cached"], "build s": info.get("build_seconds"),
                     "params": info.get("n_params"), "path": m["path"]})
    out.json(rows)
    out.line(text_table(rows))
    return 0


def cmd_build(args: argparse.Namespace, out: Printer) -> int:
    path = build_model(args.name, force=args.force)
    seconds = build_info(args.name).get("build_seconds")
    out.json({"model": args.name, "path": str(path), "build_seconds": seconds})
    out.line(f"{args.name}: {path} (built in {seconds if seconds is not None else '?'} s)")
    return 0


def cmd_demo(args: argparse.Namespace, out: Printer) -> int:
    """Headless end-to-end: build the default, evaluate full precision vs NF4, summarise bins."""

    name = args.model or DEFAULT_MODEL
    t0 = time.perf_counter()
    out.line(f"== loading {name} (built and cached on first use)")
    model = load_model(name)
    split = builtin_split(model)
    out.line(f"   {time.perf_counter() - t0:.1f} s · split {split.name}: forget {len(split.forget)}, "
             f"retain {len(split.retain)}")
    q = QuantConfig("nf4")
    out.line("== accuracy, full precision vs NF4 of the base")
    # Top-1 only: multiple choice over ~1000 SmolLM2 facts costs minutes (use `workbench eval`).
    rows = accuracy_rows(model, split, [None, q], multiple_choice=False)
    out.line(text_table(rows))
    names = model.adapter.quantizable(q)
    state, tr = model.state(), model.adapter.transposed
    err = weight_relative_error(state, names, q, transposed=tr)
    counts = [int(c) for c in bin_occupancy(state, names, q, transposed=tr)["overall"]]
    out.line(f"== NF4 of {len(names)} weight matrices: relative error {err['overall']:.4f}")
    out.line(text_histogram(counts, [f"code {i:>2}" for i in range(len(counts))]))
    seconds = time.perf_counter() - t0
    out.line(f"== done in {seconds:.1f} s")
    report: dict[str, Any] = {"model": name, "split": split.name, "n_forget": len(split.forget),
                              "n_retain": len(split.retain), "rows": rows, "n_modules": len(names),
                              "relative_error": err["overall"], "bin_occupancy": counts, "seconds": seconds}
    out.json(report)
    return 0
