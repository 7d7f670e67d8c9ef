"""Wall-time benchmark of the attribution methods, in one process.

For each model, on one set of clean/corrupt pairs:

==================  ==========================================================================
column              meaning
==================  ==========================================================================
``exact/ours``      exact activation patching (one batched forward per node) ÷ our batched
                    attribution patching, both on the first ``exact_pairs`` pairs
``tl/ours``         TransformerLens' ``attribution_patch`` (its per-example loop) ÷ ours at
                    ``batch_size`` pairs per forward/backward, on all pairs
``ig/plain``        integrated gradients (``ig_steps``) ÷ plain attribution patching
``spearman_top20``  Spearman of ours vs exact over exact's 20 strongest nodes
``max|ours-tl|``    largest difference between our node scores and TransformerLens' (should be ~0)
==================  ==========================================================================

Timings are the best of ``repeats`` runs after a warm-up; the cheap methods are repeated,
exact patching and the TransformerLens loop run once. By default torch runs on one thread
during the benchmark (``threads=1``): on a shared 2-core machine multi-threaded BLAS spends
most of its time spinning, which makes ratios meaningless. Targets: exact/ours >= 50 on the
12-layer model, tl/ours >= 5 with max|ours-tl| ~ 0.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from workbench.attribution import AttributionConfig, PromptPairs, agreement, attribute, make_prompt_pairs
from workbench.nodes import EMBED, Component, head, mlp

if TYPE_CHECKING:
    from workbench.models import LoadedModel


COLUMNS = (
    ("model", "model", "{}"),
    ("layers", "L", "{}"),
    ("d_model", "d", "{}"),
    ("pairs", "pairs", "{}"),
    ("seq", "seq", "{}"),
    ("ours_s", "ours s", "{:.3f}"),
    ("exact_over_ours", "exact/ours", "{:.1f}"),
    ("tl_over_ours", "tl/ours", "{:.1f}"),
    ("ig_over_plain", "ig/plain", "{:.1f}"),
    ("spearman_top20", "spearman_top20", "{:.3f}"),
    ("max_abs_diff_tl", "max|ours-tl|", "{:.1e}"),
)
"""(row key, header, format) of :func:`format_table`."""


def toy_pairs(model: LoadedModel, n: int, seq: int, *, seed: int = 0) -> PromptPairs:
    """``n`` random word prompts of ``seq`` tokens; the corrupt prompt changes the word at position 1.

    Answers and corrupt answers are distinct random vocabulary words (ids of ``w0 … w99``).
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = torch.tensor([model.tokenizer.convert_tokens_to_ids(f"w{i}") for i in range(100)])
    words = torch.randint(0, 100, (n, seq), generator=gen)
    shift = torch.randint(1, 100, (n,), generator=gen)  # never 0: corrupt word and answer differ
    corrupt_words = words.clone()
    corrupt_words[:, 1] = (words[:, 1] + shift) % 100
    answer_words = torch.randint(0, 100, (n,), generator=gen)
    clean, corrupt = vocab[words], vocab[corrupt_words]
    answers, other = vocab[answer_words], vocab[(answer_words + shift) % 100]
    return PromptPairs.from_ids(clean, corrupt, answers, other)


def _best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _subset(pairs: PromptPairs, n: int) -> PromptPairs:
    g = pairs.groups[0]
    return PromptPairs.from_ids(g.clean[:n], g.corrupt[:n], g.answers[:n], g.corrupt_answers[:n])


def tl_node_scores(model: LoadedModel, pairs: PromptPairs) -> dict[Component, float]:
    """TransformerLens' ``attribution_patch`` per pair, summed over positions, averaged over pairs.

    TL scores ``Node(kind, position, layer, head)`` per position; the embed node is
    ``hook_embed`` only (ours adds ``hook_pos_embed``, whose clean-corrupt difference is
    zero for equal-length pairs). The bridge's parameters do not require grad, so a
    forward hook makes the embedding output a leaf that does — otherwise TL's backward
    has nothing to differentiate.
    """
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    bridge = model.bridge()
    totals: dict[Component, float] = {}

    def leaf(tensor: torch.Tensor, *, hook: Any) -> torch.Tensor:
        del hook
        return tensor.detach().requires_grad_(True)

    with bridge.hooks(fwd_hooks=[("hook_embed", leaf)]), warnings.catch_warnings():
        # TL's backward hooks warn that they fire on module outputs (inputs need no grad).
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for g in pairs.groups:
            for i in range(g.n):
                a, c = int(g.answers[i]), int(g.corrupt_answers[i])
                if pairs.metric == "logit_diff":
                    def metric(logits: torch.Tensor, a: int = a, c: int = c) -> torch.Tensor:
                        return logits[0, -1, a] - logits[0, -1, c]
                else:
                    def metric(logits: torch.Tensor, a: int = a) -> torch.Tensor:
                        return torch.log_softmax(logits[0, -1].float(), -1)[a]
                result = attribution_patch(bridge, g.clean[i : i + 1], g.corrupt[i : i + 1], metric)
                for node, score in result.node_scores.items():
                    if node.kind == "embed":
                        comp = EMBED
                    elif node.kind == "attn_head_out":
                        comp = head(node.layer, node.head)
                    else:
                        comp = mlp(node.layer)
                    totals[comp] = totals.get(comp, 0.0) + score
    return {c: s / pairs.n_pairs for c, s in totals.items()}


def bench_model(
    model: LoadedModel,
    pairs: PromptPairs,
    *,
    exact_pairs: int = 16,
    batch_size: int = 64,
    ig_steps: int = 8,
    repeats: int = 3,
) -> dict[str, Any]:
    """One row of the table (see the module docstring) for ``model`` on ``pairs``."""
    silent = lambda fraction, message: None  # noqa: E731
    small = _subset(pairs, exact_pairs) if len(pairs.groups) == 1 else pairs
    plain = AttributionConfig(method="atp", batch_size=batch_size, metric=pairs.metric)
    attribute(model, small, plain, progress=silent)  # warm-up
    t_ours_small, ours_small = _best_time(lambda: attribute(model, small, plain, progress=silent), repeats)
    t_exact, exact = _best_time(
        lambda: attribute(model, small, AttributionConfig(method="exact", batch_size=batch_size, metric=pairs.metric),
                          progress=silent),
        1,
    )
    t_ours, ours = _best_time(lambda: attribute(model, pairs, plain, progress=silent), repeats)
    t_tl, tl = _best_time(lambda: tl_node_scores(model, pairs), 1)
    ig_cfg = AttributionConfig(method="ig", ig_steps=ig_steps, batch_size=batch_size, metric=pairs.metric)
    t_ig, _ = _best_time(lambda: attribute(model, pairs, ig_cfg, progress=silent), 1)
    seq = max(g.seq for g in pairs.groups)
    return {
        "model": model.name,
        "layers": model.n_layers,
        "d_model": model.d_model,
        "pairs": pairs.n_pairs,
        "seq": seq,
        "ours_s": t_ours,
        "exact_s": t_exact,
        "exact_over_ours": t_exact / t_ours_small,
        "tl_s": t_tl,
        "tl_over_ours": t_tl / t_ours,
        "ig_s": t_ig,
        "ig_over_plain": t_ig / t_ours,
        "spearman_top20": agreement(ours_small, exact, top_k=20)["spearman_top_k"],
        "max_abs_diff_tl": max(abs(ours.scores[c] - tl[c]) for c in tl),
        "exact_pairs": small.n_pairs,
        "batch_size": batch_size,
        "ig_steps": ig_steps,
    }


def bench_attribution(
    quick: bool = False,
    *,
    models: Sequence[tuple[LoadedModel, Any]] | None = None,
    threads: int | None = 1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Benchmark rows (see the module docstring); print them with :func:`format_table`.

    Args:
        quick: small settings for tests (8 pairs of 6 tokens, one repeat); the 12-layer
            model keeps 12 layers and 12 heads but shrinks ``d_model`` to 48.
        models: ``(model, facts_or_pairs)`` to benchmark; by default a tiny random GPT-2
            and a 12-layer GPT-2-small-shaped random model (``d_model`` 768, 12 heads) on
            random word prompts. Facts are paired by :func:`make_prompt_pairs`.
        threads: torch threads during the benchmark (restored after); ``None`` = unchanged.
    """
    from workbench.models import toy_model

    n_pairs, exact_pairs, seq, repeats = (8, 4, 6, 1) if quick else (64, 16, 10, 3)
    if models is None:
        tiny = toy_model("gpt2", seed=seed)
        big = toy_model("gpt2", n_layers=12, d_model=48 if quick else 768, n_heads=12, seed=seed)
        models = [(tiny, toy_pairs(tiny, n_pairs, seq, seed=seed)), (big, toy_pairs(big, n_pairs, seq, seed=seed))]
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows = []
        for model, data in models:
            pairs = data if isinstance(data, PromptPairs) else make_prompt_pairs(model, list(data))
            rows.append(bench_model(model, pairs, exact_pairs=exact_pairs, batch_size=64, repeats=repeats,
                                    ig_steps=4 if quick else 8))
        return rows
    finally:
        torch.set_num_threads(saved)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table (columns of :data:`COLUMNS`)."""
    header = [title for _key, title, _fmt in COLUMNS]
    body = []
    for row in rows:
        cells = []
        for key, _title, fmt in COLUMNS:
            value = row.get(key, "")
            try:
                cells.append(fmt.format(value))
            except (ValueError, TypeError):
                cells.append(str(value))
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(format_table(bench_attribution(quick="--quick" in sys.argv)))


SECTIONS = ("attribution",)


def run_bench(sections: Sequence[str] = (), *, quick: bool = False, json_path: str | None = None) -> int:
    """``workbench bench``: run the named sections (all by default), print tables, optionally write JSON.

    The attribution section uses the trained ``facts`` model (``facts-tiny`` with ``--quick``)
    on its forget set, plus the default random 12-layer GPT-2-small-shaped model.
    """
    import json

    from workbench.errors import WorkbenchError
    from workbench.models import load_model, toy_model
    from workbench.splits import builtin_split

    chosen = list(sections) or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise WorkbenchError(f"unknown bench section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    report: dict[str, Any] = {"quick": quick}
    if "attribution" in chosen:
        facts_model = load_model("facts-tiny" if quick else "facts")
        forget = builtin_split(facts_model).forget
        big = toy_model("gpt2", n_layers=12, d_model=48 if quick else 768, n_heads=12)
        n_pairs, seq = (8, 6) if quick else (64, 10)
        rows = bench_attribution(quick, models=[(facts_model, forget), (big, toy_pairs(big, n_pairs, seq))])
        print("== attribution: wall-time ratios in one process (targets: exact/ours >= 50 on 12 layers, "
              "TL/ours >= 5 at batch 64)")
        print(format_table(rows))
        report["attribution"] = rows
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=2, default=float)
    return 0
