"""``attribute`` and ``circuit show|faithfulness``: find the forget set's circuit and inspect it."""

from __future__ import annotations

import argparse
import dataclasses

from workbench.core.errors import WorkbenchError
from workbench.core.files import atomic_write_json
from workbench.experiments.flow import attribute_forget_set
from workbench.faces.cli.common import Printer, add_data_args, add_json, load_forget_split
from workbench.faces.tables import text_table
from workbench.interpretability.attribution import Attribution, AttributionConfig, make_prompt_pairs
from workbench.interpretability.circuit import Circuit
from workbench.interpretability.faithfulness import faithfulness, faithfulness_curve
from workbench.models.loading import load_model


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attribute", help="attribute the forget-set behaviour to heads and MLPs; save a circuit")
    p.add_argument("--model", required=True)
    add_data_args(p, forget_only=True)
    p.add_argument("--method", choices=("atp", "ig", "exact"), default="atp")
    p.add_argument("--ig-steps", type=int, default=8)
    p.add_argument("--metric", choices=("logit_diff", "logprob"), default="logit_diff")
    p.add_argument("--edges", action="store_true", help="also score edges (EAP)")
    p.add_argument("--baseline", choices=("paired", "mean", "resample"), default="paired",
                   help="what each fact is compared with: its counterfactual twin (default; facts without a "
                        "same-length twin get another fact, else the mean), the dataset-mean activations, or "
                        "another fact of the set")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="pairs per forward/backward (default: per length group, as many as fit in --pass-mb, "
                        "at most 32)")
    p.add_argument("--pass-mb", type=int, default=None, metavar="MB",
                   help="working memory one pass may take, estimated from above (default: a quarter of the model's "
                        "own size, at least 128)")
    p.add_argument("--fact", type=int, action="append", metavar="N",
                   help="also show fact N's own attribution (which heads and MLPs carry it); repeatable")
    p.add_argument("--per-fact", metavar="FILE",
                   help="write every fact's own scores to FILE (JSON: prompt, baseline, scores)")
    p.add_argument("--top-k", type=int, default=10, help="components selected into the circuit")
    p.add_argument("--out", default="circuit.json", help="where the circuit is saved (default %(default)s)")
    add_json(p)
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("circuit", help="inspect a saved circuit")
    csub = p.add_subparsers(dest="circuit_command", required=True, metavar="COMMAND")
    c = csub.add_parser("show", help="print a circuit's components and scores")
    c.add_argument("file")
    c.add_argument("--rows", type=int, default=20, help="components listed, by |score| (default 20)")
    add_json(c)
    c.set_defaults(func=cmd_circuit_show)
    c = csub.add_parser("faithfulness", help="how much of the behaviour the circuit alone carries")
    c.add_argument("file")
    c.add_argument("--model", required=True)
    add_data_args(c, forget_only=True)
    c.add_argument("--ablation", choices=("corrupt", "mean"), default="corrupt")
    c.add_argument("--metric", choices=("logit_diff", "logprob", "kl"), default=None,
                   help="default: the circuit's own metric; kl = minus KL(clean || ablated)")
    c.add_argument("--baseline", choices=("paired", "mean", "resample"), default="paired",
                   help="the pairs' baselines (as for attribute)")
    c.add_argument("--curve", type=int, metavar="N", default=0,
                   help="also the faithfulness of the top-k heads/MLPs for k = 1..N")
    add_json(c)
    c.set_defaults(func=cmd_circuit_faithfulness)


def cmd_attribute(args: argparse.Namespace, out: Printer) -> int:
    # the settings checked before the model loads: a typo should not wait for a 7B model
    if args.pass_mb is not None and args.pass_mb < 1:
        raise WorkbenchError(f"--pass-mb must be at least 1, got {args.pass_mb}")
    config = AttributionConfig(method=args.method, ig_steps=args.ig_steps, metric=args.metric, edges=args.edges,
                               baseline=args.baseline, batch_size=args.batch_size,
                               pass_bytes=None if args.pass_mb is None else args.pass_mb * 2**20)
    model = load_model(args.model)
    split = load_forget_split(model, args, "attribute")
    for n in args.fact or []:
        if not 0 <= n < len(split.forget):
            raise WorkbenchError(f"--fact {n}: the forget set has facts 0..{len(split.forget) - 1}")
    attribution = attribute_forget_set(model, split, config)
    circuit = Circuit.from_attribution(attribution).select_top_k(args.top_k, include_embed=False)
    path = circuit.save(args.out)
    rows = [{"component": c.name, "score": s, "in circuit": c in circuit.selected}
            for c, s in attribution.top(max(args.top_k, 10))]
    facts = {n: _fact_rows(attribution, n, max(args.top_k, 10)) for n in args.fact or []}
    if args.per_fact:
        _write_per_fact(attribution, args.per_fact)
    out.json({"model": args.model, "split": split.name, "n_pairs": attribution.n_pairs,
              "baseline": attribution.baseline, "pairing": dataclasses.asdict(attribution.pairing),
              "n_dropped": attribution.n_dropped,
              "metric": attribution.metric, "clean_metric": attribution.clean_metric,
              "corrupt_metric": attribution.corrupt_metric, "top": rows,
              "facts": {str(n): {"prompt": attribution.pair_prompts[n], "top": r} for n, r in facts.items()},
              "circuit": sorted(c.name for c in circuit.selected), "saved": str(path)})
    out.line(f"{attribution.n_pairs} prompt pairs · clean metric {attribution.clean_metric:.3f} · "
             f"corrupt {attribution.corrupt_metric:.3f} ({attribution.metric})")
    out.line(f"{attribution.baseline} baseline: {attribution.pairing.describe()}")
    out.line(text_table(rows))
    for n, fact_rows in facts.items():
        out.line(f"fact {n}: {attribution.pair_prompts[n]!r} ({attribution.pair_kinds[n]} baseline)")
        out.line(text_table(fact_rows))
    if args.per_fact:
        out.line(f"per-fact scores of {attribution.n_pairs} facts written to {args.per_fact}")
    out.line(f"circuit with {len(circuit.selected)} components saved to {path}")
    return 0


def _fact_rows(attribution: Attribution, n: int, k: int) -> list[dict[str, object]]:
    scores = attribution.for_fact(n)
    ranked = sorted(scores.items(), key=lambda kv: -abs(kv[1]))[:k]
    return [{"component": c.name, "score": s} for c, s in ranked]


def _write_per_fact(attribution: Attribution, path: str) -> None:
    rows = [{"fact": i, "prompt": p, "baseline": attribution.pair_kinds[i],
             "scores": {c.name: s for c, s in attribution.for_fact(i).items()}}
            for i, p in enumerate(attribution.pair_prompts)]
    atomic_write_json(path, {"model_fingerprint": attribution.model_fingerprint, "method": attribution.method,
                             "metric": attribution.metric, "baseline": attribution.baseline, "facts": rows})


def cmd_circuit_show(args: argparse.Namespace, out: Printer) -> int:
    circuit = Circuit.load(args.file)
    ranked = sorted(circuit.scores.items(), key=lambda kv: -abs(kv[1]))
    rows = [{"component": c.name, "score": s, "selected": c in circuit.selected} for c, s in ranked[: args.rows]]
    out.json({"file": args.file, "metadata": circuit.metadata, "components": rows,
              "n_selected": len(circuit.selected), "n_components": len(circuit.components)})
    out.line(", ".join(f"{k}={v}" for k, v in circuit.metadata.items() if v is not None))
    out.line(text_table(rows))
    out.line(f"{len(circuit.selected)} of {len(circuit.components)} components selected")
    return 0


def cmd_circuit_faithfulness(args: argparse.Namespace, out: Printer) -> int:
    model = load_model(args.model)
    circuit = Circuit.load(args.file, model=model)
    split = load_forget_split(model, args, "circuit faithfulness")
    pairs = make_prompt_pairs(model, split.forget, metric=circuit.metric, baseline=args.baseline)
    f = faithfulness(circuit, model, pairs, ablation=args.ablation, metric=args.metric)
    curve = (faithfulness_curve(circuit, model, pairs, max_k=args.curve, ablation=args.ablation, metric=args.metric)
             if args.curve else None)
    out.json({"file": args.file, "model": args.model, "ablation": args.ablation, "metric": f.metric,
              "n_components": f.n_components, "recovered": f.recovered, "drop": f.drop,
              "clean_metric": f.clean_metric, "corrupt_metric": f.corrupt_metric, "floor_metric": f.floor_metric,
              "pairing": dataclasses.asdict(pairs.pairing),
              "curve": curve.rows() if curve is not None else None})
    out.line(f"circuit of {f.n_components} components, {args.ablation} ablation:")
    out.line(f"  metric {f.metric}; the embedding and unembedding are always kept")
    out.line(f"  recovered (every other head/MLP ablated): {f.recovered:.3f}")
    out.line(f"  drop (circuit itself ablated):            {f.drop:.3f}")
    out.line(f"  metric clean {f.clean_metric:.3f} · all heads/MLPs ablated {f.floor_metric:.3f} · "
             f"corrupt {f.corrupt_metric:.3f}")
    out.line(f"  pairs: {pairs.pairing.describe()}")
    if curve is not None:
        out.line("faithfulness curve (top-k heads/MLPs by |score|):")
        out.line(text_table(curve.rows()))
    return 0
