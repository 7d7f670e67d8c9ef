"""``workbench bench``: speed and memory as ratios measured in one process (never timed assertions).

Five sections: ``attribution`` (below), ``quantization`` (:func:`bench_quantization`),
``unlearning`` (:func:`bench_unlearning`), whose peak memory is measured with
:class:`PeakMemory`, and ``memory`` and ``scale``, which run whole flows in child processes
(:mod:`workbench.faces.bench_memory`) and report peak RSS ÷ model bytes per phase.

Attribution, for each model, on one set of clean/corrupt pairs:

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

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from workbench.core.components import all_components
from workbench.core.errors import WorkbenchError
from workbench.core.progress import silent
from workbench.faces.bench_flow import FLOW_COLUMNS, bench_flow
from workbench.faces.bench_memory import (
    MEMORY_COLUMNS,
    allocator_note,
    budget_note,
    circuit_note,
    held_notes,
    libraries_note,
    memory_rows,
    passes_note,
    run_flow,
    run_libraries,
)
from workbench.interpretability.attribution import (
    AttributionConfig,
    PromptPairs,
    agreement,
    attribute,
    make_prompt_pairs,
)
from workbench.measurement.reference import tl_node_scores
from workbench.models.builtin_splits import builtin_split
from workbench.models.loaded import LoadedModel
from workbench.models.loading import load_model
from workbench.models.toy import toy_model
from workbench.quant import (
    QuantConfig,
    compare_quantization,
    quantize_dequantize,
)
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.readings import LoopReadings
from workbench.unlearning.registry import default_lr, unlearn
from workbench.unlearning.task import OptimConfig, StopRule

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
    return format_rows(rows, COLUMNS)


# --------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak resident memory (RSS) above the starting level while the ``with`` block runs.

    torch's CPU allocations bypass ``tracemalloc``, so RSS is the number that matters to a
    user; it is process-wide, hence the benchmarks run their steps one after another. Two
    things made a naive reading meaningless, and both are handled on entry:

    - memory freed by an earlier step stays resident in the C allocator and is reused
      without growing RSS, so the later step looked free: ``malloc_trim`` hands it back first;
    - a short-lived peak (one module's dequantized copy, ~1 ms) falls between samples: on
      Linux the kernel's own high-water mark ``VmHWM`` is reset (``/proc/self/clear_refs``)
      and read at exit. A sampling thread remains as the fallback elsewhere.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start_bytes = 0
        self.peak_bytes = 0
        self.exact = False
        """True when the peak came from the kernel's high-water mark (not only sampling)."""
        self._stop: Any = None
        self._thread: Any = None

    @staticmethod
    def rss_bytes() -> int:
        import os

        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: fall back to the (monotone) high-water mark
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @staticmethod
    def _high_water_bytes() -> int | None:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    @staticmethod
    def _reset_high_water() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    @staticmethod
    def _release_freed_memory() -> None:
        import ctypes
        import ctypes.util
        import gc

        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())

    def __enter__(self) -> PeakMemory:
        import threading

        self._release_freed_memory()
        self.exact = self._reset_high_water()
        self.start_bytes = self.peak_bytes = self.rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.rss_bytes())
        if self.exact:
            self.peak_bytes = max(self.peak_bytes, self._high_water_bytes() or 0)

    @property
    def peak_mb(self) -> float:
        """Peak extra RSS in MiB."""
        return (self.peak_bytes - self.start_bytes) / 2**20


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds, peak extra MiB, result) of one call."""
    with PeakMemory() as mem:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return seconds, mem.peak_mb, out


# --------------------------------------------------------------------------- quantization analysis


def bench_quantization(model: LoadedModel, *, density: float = 0.01, seed: int = 0) -> dict[str, Any]:
    """Our full before/after analysis (:func:`workbench.quant.compare_quantization`) ÷ one plain
    bitsandbytes quantize+dequantize pass over both weight sets (``w`` and ``w+Δ``).

    Δ is a random sparse update touching ``density`` of every quantized weight by about one
    bin, the shape of a MANSU update. Target: analysis/plain ≤ 2.
    """

    cfg = QuantConfig("nf4")
    state = model.state()
    names = model.adapter.quantizable(cfg)
    tr = model.adapter.transposed
    gen = torch.Generator().manual_seed(seed)
    delta = {}
    for n in names:
        w = state[n]
        mask = torch.rand(w.shape, generator=gen) < density
        delta[n] = mask * torch.randn(w.shape, generator=gen) * w.abs().mean() * 0.3

    def plain() -> None:
        for n in names:
            quantize_dequantize(state[n], cfg, transposed=n in tr)
            quantize_dequantize(state[n] + delta[n], cfg, transposed=n in tr)

    def ours() -> Any:
        return compare_quantization(state, delta, names, cfg, transposed=tr, progress=silent)

    plain()  # warm-up: bnb tables, allocator
    t_plain, m_plain, _ = _timed(plain)
    t_ours, m_ours, comparison = _timed(ours)
    n_weights = sum(state[n].numel() for n in names)
    return {
        "model": model.name, "weights": n_weights, "analysis_s": t_ours, "bnb_pass_s": t_plain,
        "analysis_over_bnb": t_ours / t_plain, "analysis_peak_mb": m_ours, "bnb_pass_peak_mb": m_plain,
        "largest_weight_mb": max(state[n].numel() for n in names) * 4 / 2**20,
        "codes_changed": comparison.overall.code_flips,
    }


# --------------------------------------------------------------------------- unlearning


def bench_unlearning(model: LoadedModel, *, steps: int = 5) -> dict[str, Any]:
    """MANSU ÷ GradDiff wall time at equal step counts (MANSU rounds = GradDiff steps), with
    and without MANSU's one-time setup; both methods' default runs to the shared forget
    target (each its own number of rounds/steps); and the saved update's size ÷ the model's
    size (float32 parameters); and what the gradient loop's default progress readings add to
    GradDiff's wall time. Targets: per step ≤ 2×, MANSU update ≤ 5% of the model."""
    import tempfile
    from pathlib import Path


    split = builtin_split(model)
    circuit = all_components(model.n_layers, model.n_heads, include_embed=False)
    silent = lambda fraction, message: None  # noqa: E731
    quant = QuantConfig("nf4")
    # One untimed step of each first: whichever ran first would otherwise also pay the
    # process's one-time costs (bitsandbytes' CPU backend, autograd's first graph).
    unlearn(model, split, method="mansu", quant=quant, circuit=circuit, progress=silent,
            method_config=MansuConfig(max_rounds=1, forget_target=0.0, retain_guard=None))
    # GradDiff's progress readings off: the bench times the method, and MANSU reads nothing extra
    quiet = LoopReadings(every=0)
    unlearn(model, split, method="graddiff", quant=quant, progress=silent, readings=quiet,
            optim=OptimConfig(lr=default_lr(model)), stop=StopRule(max_steps=1, forget_target=None))
    # forget_target 0 and no guard: both run exactly ``steps`` iterations
    t_mansu, m_mansu, mansu = _timed(lambda: unlearn(
        model, split, method="mansu", quant=quant, circuit=circuit, progress=silent,
        method_config=MansuConfig(max_rounds=steps, forget_target=0.0, retain_guard=None)))
    t_gd, m_gd, graddiff = _timed(lambda: unlearn(
        model, split, method="graddiff", quant=quant, progress=silent, readings=quiet,
        optim=OptimConfig(lr=default_lr(model)), stop=StopRule(max_steps=steps, forget_target=None)))
    # The loop's progress readings (every 10th step and the last: here one), as a run takes them by default
    t_gd_read, _, gd_read = _timed(lambda: unlearn(
        model, split, method="graddiff", quant=quant, progress=silent,
        optim=OptimConfig(lr=default_lr(model)), stop=StopRule(max_steps=steps, forget_target=None)))
    phases = dict(mansu.seconds_by_phase)
    # Equal step counts are not equal work done: to the same forget target (the shared
    # stopping rule of every comparison) MANSU needs fewer rounds than GradDiff needs steps.
    t_mansu_target, _, mansu_target = _timed(lambda: unlearn(
        model, split, method="mansu", quant=quant, circuit=circuit, progress=silent))
    t_gd_target, _, gd_target = _timed(lambda: unlearn(
        model, split, method="graddiff", quant=quant, progress=silent, optim=OptimConfig(lr=default_lr(model)),
        readings=quiet))
    model_bytes = sum(p.numel() * 4 for p in model.hf.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        size = {name: Path(r.update.save(Path(tmp) / f"{name}.safetensors")).stat().st_size
                for name, r in (("mansu", mansu), ("graddiff", graddiff))}
    return {
        "model": model.name, "steps": steps, "mansu_steps": mansu.steps, "graddiff_steps": graddiff.steps,
        "mansu_s": t_mansu, "graddiff_s": t_gd,
        "mansu_over_graddiff": (t_mansu / max(1, mansu.steps)) / (t_gd / max(1, graddiff.steps)),
        # without MANSU's one-time setup (grids, projectors, Fisher, quantized copy), which a
        # short benchmark cannot amortise: the cost of one more round vs one more step
        "mansu_round_over_graddiff_step": ((t_mansu - phases["setup"]) / max(1, mansu.steps))
        / (t_gd / max(1, graddiff.steps)),
        "mansu_seconds_by_phase": phases,
        "mansu_to_target_s": t_mansu_target, "graddiff_to_target_s": t_gd_target,
        "mansu_to_target_rounds": mansu_target.steps, "graddiff_to_target_steps": gd_target.steps,
        "mansu_to_target_stopped": mansu_target.stopped, "graddiff_to_target_stopped": gd_target.stopped,
        "to_target_mansu_over_graddiff": t_mansu_target / t_gd_target,
        "mansu_peak_mb": m_mansu, "graddiff_peak_mb": m_gd,
        # wall time with readings ÷ without: what the default readings add to a run of ``steps`` steps
        "graddiff_readings_over_plain": t_gd_read / t_gd,
        "graddiff_readings": sum("retain_top1_q" in r for r in gd_read.history),
        "mansu_params_changed": mansu.update.nnz(), "graddiff_params_changed": graddiff.update.nnz(),
        "mansu_update_over_model": size["mansu"] / model_bytes,
        "graddiff_update_over_model": size["graddiff"] / model_bytes,
        "model_mb": model_bytes / 2**20,
    }


QUANT_COLUMNS = (
    ("model", "model", "{}"), ("weights", "weights", "{:,}"), ("analysis_s", "ours s", "{:.2f}"),
    ("bnb_pass_s", "bnb pass s", "{:.2f}"), ("analysis_over_bnb", "ours/bnb", "{:.2f}"),
    ("analysis_peak_mb", "ours peak MiB", "{:.0f}"), ("bnb_pass_peak_mb", "bnb peak MiB", "{:.0f}"),
    ("largest_weight_mb", "largest weight MiB", "{:.1f}"),
)
UNLEARN_COLUMNS = (
    ("model", "model", "{}"), ("steps", "steps", "{}"), ("mansu_s", "MANSU s", "{:.2f}"),
    ("graddiff_s", "GradDiff s", "{:.2f}"), ("mansu_over_graddiff", "MANSU/GD per step", "{:.2f}"),
    ("mansu_round_over_graddiff_step", "same, w/o setup", "{:.2f}"),
    ("to_target_mansu_over_graddiff", "MANSU/GD to target", "{:.2f}"),
    ("mansu_update_over_model", "MANSU update/model", "{:.2%}"),
    ("graddiff_update_over_model", "GD update/model", "{:.2%}"),
    ("mansu_peak_mb", "MANSU peak MiB", "{:.0f}"), ("graddiff_peak_mb", "GD peak MiB", "{:.0f}"),
    ("graddiff_readings_over_plain", "GD readings/plain", "{:.2f}"),
)


def format_rows(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as a fixed-width text table."""
    header = [title for _key, title, _fmt in columns]
    body = []
    for row in rows:
        cells = []
        for key, _title, fmt in columns:
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



def _memory_section(model_name: str) -> list[dict[str, Any]]:
    """The ``memory`` section: the app's default flow, MANSU without a circuit, GradDiff's training
    loop (the gradient baselines' shared loop; no target: measured so the README can say what it
    takes), and MANSU's retain gradient on short and long prompts with the blocks kept and
    recomputed, each in a child process (:mod:`workbench.faces.bench_memory`). Targets: flow ≤ 3×
    the model, MANSU without a circuit ≤ 4 GB on SmolLM2."""
    print("== memory: peak RSS per phase / model bytes, one child process per flow (targets: app flow <= 3x, "
          "MANSU without a circuit <= 4 GB on SmolLM2)")
    print(budget_note())
    flows = ("flow", "mansu-no-circuit", "graddiff", "gradient")
    reports = [run_flow(flow, model_name) for flow in flows]
    # the app flow's floor: its libraries alone, right under its phases
    libraries = run_libraries(reports[0])
    rows = [*memory_rows(reports[0]), libraries, *(row for report in reports[1:] for row in memory_rows(report))]
    print(format_rows(rows, MEMORY_COLUMNS))
    for line in (allocator_note(rows), *held_notes(rows), libraries_note(libraries)):
        print(line)
    return rows


SECTIONS = ("attribution", "quantization", "unlearning", "memory", "scale")
"""What ``workbench bench`` runs by default."""
EXTRA_SECTIONS = ("flow",)
"""Run only when named: ``flow`` is the app's whole default flow twice (minutes on SmolLM2)."""


def run_bench(sections: Sequence[str] = (), *, quick: bool = False, flow_threads: int = 1,
              scale_state: str = "auto") -> dict[str, Any]:
    """``workbench bench``: run the named sections (all by default), print their tables as
    they finish, and return the whole report (JSON-ready: ``quick``, one list of rows per
    section, ``seconds``).

    The attribution section uses the trained ``facts`` model (``facts-tiny`` with ``--quick``)
    on its forget set, plus the default random 12-layer GPT-2-small-shaped model; the
    quantization section ``smollm2`` (``facts-tiny`` with ``--quick``); the unlearning
    section ``facts`` (``facts-tiny``); the memory section ``smollm2`` (``facts-tiny``); the
    scale section the 1B-class Llama (its reduced shape with ``--quick``), MANSU's state there in
    ``scale_state`` (:attr:`MansuConfig.state_precision`; ``"auto"``, the default, holds it in
    bfloat16 as the model is stored). Torch runs on one thread throughout
    (see above), except the flow section on ``flow_threads``.
    """
    chosen = list(sections) or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS + EXTRA_SECTIONS]
    if unknown:
        raise WorkbenchError(f"unknown bench section(s) {unknown}; choose from "
                             f"{', '.join(SECTIONS + EXTRA_SECTIONS)}")
    if not isinstance(flow_threads, int) or isinstance(flow_threads, bool) or flow_threads < 1:
        raise WorkbenchError(f"--threads must be a positive integer, got {flow_threads!r}")
    started = time.perf_counter()
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
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if "quantization" in chosen:
            row = bench_quantization(load_model("facts-tiny" if quick else "smollm2"))
            print("== quantization analysis: our before/after NF4 analysis / one bnb quantize+dequantize pass "
                  "over w and w+Δ (target <= 2)")
            print(format_rows([row], QUANT_COLUMNS))
            report["quantization"] = [row]
        if "unlearning" in chosen:
            row = bench_unlearning(load_model("facts-tiny" if quick else "facts"), steps=3 if quick else 5)
            print("== unlearning: MANSU / GradDiff wall time per step at equal steps (target <= 2), and to the "
                  "shared forget target; "
                  "saved update / model size (target <= 5% for MANSU)")
            print(format_rows([row], UNLEARN_COLUMNS))
            report["unlearning"] = [row]
    finally:
        torch.set_num_threads(saved)
    if "flow" in chosen:
        flow = bench_flow("facts-tiny" if quick else "smollm2", max_rounds=3 if quick else None,
                          threads=flow_threads)
        print("== the app's default flow, click by click: reference path / fast path, same process "
              f"(targets: MANSU >= 5x, setup <= 5 s, attribution <= 10 s, edit redraw < 1 s); metrics equal; "
              f"torch on {flow_threads} thread(s)")
        print(format_rows(flow.rows(), FLOW_COLUMNS))
        report["flow"] = flow.rows()

    if "memory" in chosen:
        report["memory"] = _memory_section("facts-tiny" if quick else "smollm2")
    if "scale" in chosen:
        print("== scale: a random 1B-class Llama in bfloat16, each phase's peak RSS / model bytes (target <= 3); "
              f"MANSU's state: {scale_state}")
        print(budget_note())
        size = "reduced" if quick else "full"
        scale = run_flow("scale", size, state_precision=scale_state)
        libraries = run_libraries(scale)
        rows = [*memory_rows(scale), libraries]
        # the app's default attribution (edges) on the same model: passes sized to memory, then 32 pairs at once
        rows += memory_rows(run_flow("scale-edges", size))
        print(format_rows(rows, MEMORY_COLUMNS))
        for line in (allocator_note(rows), circuit_note(rows), passes_note(rows), *held_notes(rows),
                     libraries_note(libraries)):
            if line:
                print(line)
        report["scale"] = rows
    report["seconds"] = time.perf_counter() - started
    print(f"bench: {report['seconds']:.0f} s in all")
    return report
