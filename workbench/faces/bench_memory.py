"""``workbench bench memory``: peak resident memory ÷ model bytes, per phase, in a child process.

Each flow runs in its own Python process (this module run as a script), so flows never see
each other's allocations; inside it, before each phase the C allocator hands freed memory
back (``malloc_trim``) and the kernel's high-water mark is reset (``/proc/self/clear_refs``),
so a phase's peak is the most the process held *during that phase* — including what earlier
phases left alive, as in the app. The flow's peak is the largest phase peak (the reset
resets ``ru_maxrss`` too).

Flows:

- ``flow``: the app's default path through :class:`~workbench.faces.session.Session` —
  ``load`` (setup: load, built-in split, base accuracy full precision and quantized, and what
  the app's background start measures besides: ``SharedModels.prepare_base``),
  ``attribution`` (Run attribution), ``mansu`` (Run MANSU with its whole measurement, at most
  ``rounds`` rounds).
- ``mansu-no-circuit``: load, then MANSU over every quantized weight (``use_circuit=False``)
  for ``rounds`` rounds, without the measurement.
- ``graddiff``: load, then ``rounds`` steps of GradDiff (the gradient baselines' shared loop, at
  its defaults otherwise: a float32 copy of the model, Adam over every quantized weight), without
  the measurement. The loop's memory is the same at every step after the first, which makes
  Adam's moments.
- ``scale``: a randomly initialised Llama-shape model built in bfloat16 (:data:`SCALE_FULL`,
  nothing downloaded; ``model`` ``reduced`` for :data:`SCALE_REDUCED`), its word-level
  tokenizer, and facts whose answers are its own top-1: ``load`` (build), ``attribution``
  (32 forget facts), ``mansu`` (3 rounds in the top-10 circuit), ``measurement`` (NF4,
  everything ``metrics.json`` holds, CAD included).
- ``scale-edges``: the same model and facts, ``load``, then the forget facts attributed with
  edges (the app's default), in passes sized to memory (the default,
  ``attribution (edges, sized passes)``), then with all 32 pairs in one pass (every attribution's
  batch before the sizing, ``attribution (edges, 32 pairs per pass)``).
- ``gradient``: load, then MANSU's retain gradient (the candidate tensors: block 0's MLP, so
  the backward runs through every block, as in the app's default circuit) over 32 of the
  model's retain facts in chunks of 16, first as they are, then behind a shared context of
  :data:`LONG_CONTEXT_WORDS` words; each first as MANSU would run it (blocks recomputed in
  the backward or not, by :func:`~workbench.unlearning.mansu.state.gradient_memory`),
  then the other way. Each phase records ``recomputed`` and ``tokens_per_fact``; the two
  gradients of a set must be equal to the bit. Then MANSU's retain Fisher on the same facts,
  in as many facts per pass as MANSU would take (``facts_per_pass``), and, when fewer, in a whole
  chunk of 16; the two must agree to float rounding.

Each flow's report also lists the modules its process imported besides the workbench's own
(``libraries``, in import order); :func:`run_libraries` imports those alone in a fresh child and
reports its resident size: the floor the flow's phases stand on that the workbench's code does not
hold (on SmolLM2 the required stack, torch, transformers, bitsandbytes and TransformerLens with
what they import, is about the model's own size).

The child prints one JSON line; :func:`run_flow` starts it and parses that line. The script
only uses interfaces that predate issue 17, so the same file measures an older checkout
(``PYTHONPATH=<old checkout> python workbench/faces/bench_memory.py flow smollm2``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from workbench.core import allocator
from workbench.core.device import WORKING_MB_ENV, working_budget_setting
from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact, FactSplit
from workbench.experiments import flow as flow_module
from workbench.experiments.flow import attribute_forget_set, default_circuit
from workbench.faces.session import SHARED, Session
from workbench.interpretability import attribution as attribution_module
from workbench.interpretability.attribution import AttributionConfig
from workbench.measurement.metrics import measure_update
from workbench.models.loaded import MIN_WORKING_BYTES
from workbench.models.scoring import FactBatch, encode_prompts, last_token_logits
from workbench.models.toy import toy_model
from workbench.quant import QuantConfig
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.mansu import candidates as mansu_candidates
from workbench.unlearning.mansu import fisher as mansu_fisher
from workbench.unlearning.mansu import state as mansu_state
from workbench.unlearning.registry import unlearn
from workbench.unlearning.task import StopRule

FLOWS = ("flow", "mansu-no-circuit", "graddiff", "scale", "scale-edges", "gradient")
LONG_CONTEXT_WORDS = 200
"""The ``gradient`` flow's shared context before each long fact's prompt (a long document's question)."""
SCALE_FULL = {"layers": 22, "d_model": 2048, "heads": 32, "kv_heads": 4, "d_mlp": 5632, "vocab": 32000}
"""The scale bench's 1B-class Llama shape (TinyLlama-1.1B's): about 1.1B parameters, 2.2 GB in bfloat16."""
STATE_PRECISIONS = ("auto", "float32", "storage")
"""``MansuConfig.state_precision``'s values, spelled out: the child of an older checkout imports
this file, and its ``workbench`` has no such setting (a test checks the two agree)."""
SCALE_REDUCED = {"layers": 2, "d_model": 128, "heads": 8, "kv_heads": 2, "d_mlp": 352, "vocab": 2000}
"""The same shape scaled down, for the test suite."""


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _trim() -> None:
    import gc

    gc.collect()
    allocator.hand_back_freed_memory()  # jemalloc's purge and glibc's trim


def _allocator() -> str:
    """The malloc this process runs on (``jemalloc`` or ``system``), as the report records it."""
    # looked up, not imported by name: this file's child also runs on older checkouts, which lack it
    in_use = getattr(allocator, "allocator_in_use", None)
    return in_use() if in_use is not None else "unknown"


WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""Files whose mapped pages count as a model's weights in :func:`held_by_kind` (transformers reads a
safetensors checkpoint by mapping it: the loaded model's weights are then those file pages)."""


def held_by_kind(smaps: Iterable[str]) -> dict[str, int]:
    """Resident bytes of ``/proc/<pid>/smaps``'s lines by kind of mapping: ``weight_files`` (pages of
    mapped checkpoint files, :data:`WEIGHT_FILE_SUFFIXES`), ``other_files`` (every other file:
    shared libraries' code and data) and ``anonymous`` (the heap, stacks and anonymous mappings:
    Python's objects, the C allocators' memory, tensors the process made)."""
    held = {"weight_files": 0, "other_files": 0, "anonymous": 0}
    kind = "anonymous"
    for line in smaps:
        fields = line.split()
        if not fields:
            continue
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
            path = fields[5] if len(fields) > 5 else ""
            kind = ("weight_files" if path.endswith(WEIGHT_FILE_SUFFIXES)
                    else "other_files" if path.startswith("/") else "anonymous")
        elif fields[0] == "Rss:":
            held[kind] += int(fields[1]) * 1024
    return held


def _held_now() -> dict[str, int]:
    """:func:`held_by_kind` of this process (empty where there is no ``/proc/self/smaps``)."""
    try:
        with open("/proc/self/smaps") as fh:
            return held_by_kind(fh)
    except OSError:
        return {}


def _phase(rows: list[dict[str, Any]], name: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` as phase ``name``: its seconds, the process's peak RSS while it ran, and what the
    process held when it started (``start_rss_bytes``, and by kind: ``start_held``), which is what
    earlier phases left and the phase's peak stands on."""

    _trim()
    start_rss, start_held = _rss_bytes("VmRSS"), _held_now()
    exact = True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := current RSS
    except OSError:
        exact = False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _rss_bytes("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows.append({"phase": name, "seconds": seconds, "peak_rss_bytes": peak, "exact": exact,
                 "start_rss_bytes": start_rss, "start_held": start_held,
                 "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None})
    return out


def _model_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.hf.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _own_facts(model: Any, n: int, seed: int = 0) -> list[Any]:
    """``n`` word prompts whose answers are the model's own top-1 (so forget top-1 starts at 1)."""
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(0, 100, (n, 4), generator=gen).tolist()
    prompts = [" ".join(f"w{w}" for w in row) for row in words]
    ids, last, _ = encode_prompts(model.tokenizer, prompts)
    with torch.no_grad():
        top = last_token_logits(model.hf, ids, last).argmax(-1)
    return [Fact(p, model.tokenizer.convert_ids_to_tokens(int(t)), ()) for p, t in zip(prompts, top.tolist())]


def _scale_model(size: dict[str, int]) -> tuple[Any, FactSplit]:
    """The scale flows' model (a random Llama of shape ``size`` in bfloat16) and its split: 32 forget
    and 64 retain facts whose answers are its own top-1."""
    model = toy_model("llama", n_layers=size["layers"], d_model=size["d_model"], n_heads=size["heads"],
                      n_kv_heads=size["kv_heads"], d_mlp=size["d_mlp"], dtype=torch.bfloat16,
                      vocab=[f"w{i}" for i in range(size["vocab"] - 3)])  # + <unk>, <pad>, <eos>
    facts = _own_facts(model, 96)
    return model, FactSplit("scale", forget=tuple(facts[:32]), retain=tuple(facts[32:]))


def scale_edges_flow(rows: list[dict[str, Any]], size: dict[str, int]) -> Any:
    """The ``scale-edges`` flow's phases (module docstring); returns the model. Each attribution
    phase records the pairs of each pass it ran (:func:`_passes_of`)."""
    model, split = _phase(rows, "load", lambda: _scale_model(size))
    sized, whole = AttributionConfig(edges=True), AttributionConfig(edges=True, batch_size=32)
    phases = (("attribution (edges, sized passes)", sized), ("attribution (edges, 32 pairs per pass)", whole))
    for name, config in phases:
        _phase(rows, name, lambda config=config: attribute_forget_set(model, split, config))
        rows[-1]["pairs_per_pass"] = _passes_of(model, split, config)
    return model


def _gradient_facts(model: Any, split: FactSplit, context_words: int, n: int = 32) -> FactBatch:
    """``n`` retain facts, each prompt behind the same context of ``context_words`` words (the
    retain prompts' own words, repeated; fewer when the model's positions run out)."""
    words = " ".join(f.prompt for f in split.retain).split()
    words = (words * (context_words // max(1, len(words)) + 1))[:context_words]
    cfg = model.hf.config
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 30
    while True:
        facts = tuple(Fact(" ".join([*words, f.prompt]), f.answer, ()) for f in split.retain[:n])
        batch = FactBatch.from_facts(model.tokenizer, facts)
        if batch.ids.shape[1] <= positions or not words:
            return batch
        words = words[: len(words) * 3 // 4]


def gradient_flow(rows: list[dict[str, Any]], model: Any, split: FactSplit) -> None:
    """The ``gradient`` flow's phases after the load (module docstring)."""
    measure = getattr(mansu_state, "gradient_memory", None)
    if measure is None:
        raise SystemExit("this checkout cannot recompute blocks in MANSU's gradients")
    # the child's own model, frozen (its values untouched): a gradient takes only ``names``'
    work = model.hf.eval()
    for p in work.parameters():
        p.requires_grad_(False)
    first_block = f"{model.adapter.blocks}.0."
    names = [n for n, p in work.named_parameters() if n.startswith(first_block) and p.dim() == 2 and "mlp" in n]
    for label, context in (("32 facts", 0), ("32 long facts", LONG_CONTEXT_WORDS)):
        batch = _gradient_facts(model, split, context)
        chosen = measure(model, work, names, (batch,)).recompute
        gradients = []
        for recomputed in (chosen, not chosen):
            phase = f"gradient, {label}, blocks {'recomputed' if recomputed else 'kept'}" + (
                " (MANSU's choice)" if recomputed == chosen else "")
            adapter = model.adapter if recomputed else None
            gradients.append(_phase(rows, phase, lambda batch=batch, adapter=adapter: (
                mansu_candidates.answer_logprob_gradient(work, names, batch, recompute_blocks_of=adapter))))
            rows[-1]["recomputed"] = recomputed
            rows[-1]["tokens_per_fact"] = int(batch.ids.shape[1])
        if any(not torch.equal(gradients[0][n], gradients[1][n]) for n in names):
            raise SystemExit(f"recomputing the blocks changed the gradient ({label})")
        _fisher_phases(rows, model, work, names, batch, label)


def _fisher_phases(rows: list[dict[str, Any]], model: Any, work: torch.nn.Module, names: list[str],
                   batch: FactBatch, label: str) -> None:
    """MANSU's retain Fisher over ``batch``: as many facts per pass as MANSU would take, then (when
    that is fewer) a whole chunk; the two must agree to float rounding. Skipped by a checkout
    whose Fisher is not sized to memory."""
    per_example = getattr(mansu_fisher, "per_example_bytes", None)
    if per_example is None:
        return
    memory = mansu_state.gradient_memory(model, work, names, (batch,), per_example(work, names))
    chosen = memory.facts_per_pass()
    fishers = []
    for chunk in dict.fromkeys((chosen, mansu_state.GRADIENT_CHUNK)):
        phase = f"fisher, {label}, {chunk} facts per pass" + (" (MANSU's choice)" if chunk == chosen else "")
        fishers.append(_phase(rows, phase, lambda chunk=chunk: mansu_fisher.diagonal_fisher(
            work, names, batch, len(batch), transposed=model.adapter.transposed, chunk=chunk)))
        rows[-1].update(facts_per_pass=chunk, tokens_per_fact=int(batch.ids.shape[1]),
                        per_fact_bytes=memory.per_fact, budget_bytes=memory.budget)
    for n in names:  # float rounding, relative to the tensor's largest entry (near-zero entries)
        fisher, whole = fishers[0][n], fishers[-1][n]
        if not torch.allclose(fisher, whole, rtol=1e-4, atol=1e-6 * float(whole.abs().max())):
            raise SystemExit(f"the Fisher in {chosen} facts per pass differs from a whole chunk's ({label}, {n})")


def _passes_of(model: Any, split: FactSplit, config: AttributionConfig) -> list[int] | None:
    """The pairs of each pass the forget set's attribution runs with ``config``; ``None`` from a
    checkout without pass sizing (then every pass took 32 pairs)."""
    passes = getattr(attribution_module, "passes", None)
    pairs_of = getattr(flow_module, "forget_set_pairs", None)
    if passes is None or pairs_of is None:
        return None
    return passes(model, pairs_of(model, split, config), config)


def scale_flow(rows: list[dict[str, Any]], size: dict[str, int], state_precision: str = "auto") -> Any:
    """The ``scale`` flow's phases (module docstring); returns the model. The MANSU row also says
    what its circuit holds (components, candidate weights): MANSU's state is per candidate weight,
    in float32 or in bfloat16 (``state_precision``, :attr:`MansuConfig.state_precision`; ``"auto"``:
    the checkout's default, recorded as the run decided it)."""

    model, split = _phase(rows, "load", lambda: _scale_model(size))
    attribution = _phase(rows, "attribution", lambda: attribute_forget_set(model, split))
    circuit = sorted(default_circuit(attribution, top_k=10).selected)
    quant = QuantConfig("nf4")
    config = MansuConfig(max_rounds=3)
    if state_precision != "auto":  # only then: an older checkout's MansuConfig has no such field or value
        config = dataclasses.replace(config, state_precision=state_precision)
    result = _phase(rows, "mansu", lambda: unlearn(model, split, method="mansu", quant=quant, circuit=circuit,
                                                   method_config=config, progress=lambda f, m: None))
    rows[-1]["circuit"] = " ".join(str(c) for c in circuit)
    rows[-1]["candidate_weights"] = int(result.diagnostics["n_candidate_params"])
    rows[-1]["model_weights"] = sum(p.numel() for p in model.hf.parameters())
    # what the run held (an "auto" decided for the model's dtype; an older checkout records none)
    rows[-1]["state_precision"] = result.diagnostics.get("config", {}).get("state_precision", state_precision)
    _phase(rows, "measurement", lambda: measure_update(model, split, result.update, quant=quant, circuit=circuit))
    return model


def child(flow: str, model_name: str, rounds: int, state_precision: str = "auto") -> dict[str, Any]:
    """Run one flow in this process (see the module docstring); a JSON-ready report.
    ``state_precision``: MANSU's, in the scale flow only."""
    torch.set_num_threads(1)

    baseline = _rss_bytes("VmRSS")  # the interpreter and the workbench's imports
    rows: list[dict[str, Any]] = []
    if flow in ("scale", "scale-edges"):
        size = SCALE_REDUCED if model_name == "reduced" else SCALE_FULL
        model = scale_flow(rows, size, state_precision) if flow == "scale" else scale_edges_flow(rows, size)
        return _report(flow, model_name, _model_bytes(model), baseline, rows)
    with tempfile.TemporaryDirectory() as runs:
        session = Session(runs_root=runs)

        def load() -> None:
            session.setup(model_name)
            # and what the app's background start measures besides (a checkout before it has none)
            prepare = getattr(SHARED, "prepare_base", None)
            if flow == "flow" and prepare is not None and session.model is not None:
                prepare(session.model, session.split, session.quant)

        _phase(rows, "load", load)
        assert session.model is not None and session.split is not None and session.quant is not None
        model_bytes = _model_bytes(session.model)
        if flow == "flow":
            _phase(rows, "attribution", session.attribute)
            # ``rounds`` caps the run: memory per round is the same, the time is not
            _phase(rows, "mansu", lambda: session.unlearn("mansu", mansu={"max_rounds": rounds}))
        elif flow == "gradient":
            gradient_flow(rows, session.model, session.split)
        elif flow == "mansu-no-circuit":
            config = MansuConfig(use_circuit=False, max_rounds=rounds)
            model, split, quant = session.model, session.split, session.quant
            _phase(rows, "mansu", lambda: unlearn(model, split, method="mansu", quant=quant,
                                                  method_config=config, progress=lambda f, m: None))
        elif flow == "graddiff":
            model, split, quant = session.model, session.split, session.quant
            steps = StopRule(max_steps=rounds, forget_target=None)  # exactly ``rounds`` steps
            result = _phase(rows, "graddiff", lambda: unlearn(model, split, method="graddiff", quant=quant,
                                                              stop=steps, progress=lambda f, m: None))
            rows[-1].update(steps=result.steps, stopped=result.stopped)
        else:
            raise SystemExit(f"unknown flow {flow!r}; choose from {', '.join(FLOWS)}")
    return _report(flow, model_name, model_bytes, baseline, rows)


def _report(flow: str, model_name: str, model_bytes: int, baseline: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    for row in rows:
        row["peak_over_model"] = row["peak_rss_bytes"] / model_bytes
        row["above_imports_over_model"] = (row["peak_rss_bytes"] - baseline) / model_bytes
        row["above_start_over_model"] = (row["peak_rss_bytes"] - row["start_rss_bytes"]) / model_bytes
    return {"flow": flow, "model": model_name, "model_bytes": model_bytes, "imports_rss_bytes": baseline,
            "max_rss_bytes": max(row["peak_rss_bytes"] for row in rows), "phases": rows,
            "libraries": imported_libraries(), "allocator": _allocator()}


def imported_libraries() -> list[str]:
    """The modules this process has imported that are not the workbench's (nor the script run as
    ``__main__``), in the order their imports began."""
    return [name for name in sys.modules
            if name not in ("__main__", "__mp_main__") and name != "workbench" and not name.startswith("workbench.")]


LIBRARIES_PHASE = "its libraries alone"
"""The phase name of :func:`run_libraries`'s row in the memory tables."""


def run_libraries(report: dict[str, Any], *, pythonpath: str | None = None) -> dict[str, Any]:
    """Import the modules a flow's ``report`` lists under ``libraries`` in a fresh child process
    (:mod:`workbench.faces.bench_libraries`, which imports nothing of the workbench's); a row of
    the memory tables (:func:`memory_rows`' keys) for ``report``'s flow: its resident size after
    the imports as the peak, over ``report``'s model bytes, and the modules counted."""
    names = report.get("libraries")
    if names is None:
        raise WorkbenchError(f"the {report.get('flow')!r} report lists no libraries (a checkout before the list)")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(names, fh)
    try:
        out = _run_child(LIBRARIES_SCRIPT, [fh.name], pythonpath, "libraries")
    finally:
        os.unlink(fh.name)
    return {"flow": report["flow"], "phase": LIBRARIES_PHASE, "peak_rss_bytes": out["rss_bytes"],
            "peak_rss_mib": out["rss_bytes"] / 2**20, "peak_over_model": out["rss_bytes"] / report["model_bytes"],
            "model_bytes": report["model_bytes"], "modules": out["modules"], "failed": out["failed"]}


def libraries_note(row: dict[str, Any]) -> str:
    """:func:`run_libraries`' row as one line."""
    failed = f" ({row['failed']} of them failed to import alone)" if row["failed"] else ""
    return (f"{row['flow']}: the {row['modules']:,} modules it imported besides the workbench's{failed}, "
            f"imported alone in a fresh process, hold {row['peak_rss_mib']:,.0f} MiB, "
            f"{row['peak_over_model']:.2f}x the model: a floor under every phase that the workbench's "
            f"code does not hold")


def run_flow(flow: str, model_name: str, *, rounds: int = 3, pythonpath: str | None = None,
             state_precision: str = "auto") -> dict[str, Any]:
    """Run ``flow`` on ``model_name`` in a child process and return its report.

    ``pythonpath``: the checkout whose ``workbench`` the child imports (default: this one);
    ``state_precision``: MANSU's in the scale flow (:attr:`MansuConfig.state_precision`)."""
    if flow not in FLOWS:
        raise WorkbenchError(f"unknown memory flow {flow!r}; choose from {', '.join(FLOWS)}")
    if state_precision not in STATE_PRECISIONS:
        raise WorkbenchError(f"MANSU state precision must be one of {', '.join(STATE_PRECISIONS)}, "
                             f"got {state_precision!r}")
    extra = [state_precision] if state_precision != "auto" else []  # an older checkout takes three
    return _run_child(Path(__file__).resolve(), [flow, model_name, str(rounds), *extra], pythonpath,
                      f"{flow}, {model_name}")


LIBRARIES_SCRIPT = Path(__file__).resolve().with_name("bench_libraries.py")


def _run_child(script: Path, args: list[str], pythonpath: str | None, label: str) -> dict[str, Any]:
    """Run ``script`` with ``args`` on one torch thread, under the app's allocator (what the app's
    users get: :func:`~workbench.core.allocator.app_allocator_environment`); the JSON line it prints."""
    env = dict(allocator.app_allocator_environment(os.environ) or os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=pythonpath or str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, str(script), *args],
                          env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise WorkbenchError(f"memory bench child ({label}) failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


MEMORY_COLUMNS = (
    ("flow", "flow", "{}"), ("phase", "phase", "{}"), ("seconds", "s", "{:.1f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"), ("peak_over_model", "peak/model", "{:.2f}"),
    ("above_imports_over_model", "(peak-imports)/model", "{:.2f}"),
    ("start_rss_mib", "start MiB", "{:.0f}"), ("above_start_over_model", "(peak-start)/model", "{:.2f}"),
)
"""Columns of the memory tables: ``start`` is what the process held when the phase began (after
handing freed memory back): what the earlier phases left, which the phase's peak stands on."""


def budget_note() -> str:
    """The working budget the children size their work to (they inherit this process's
    environment), as one line; a malformed ``$WORKBENCH_WORKING_MB`` is refused before any child runs."""
    setting = working_budget_setting()
    if setting is None:
        least = MIN_WORKING_BYTES // 2**20
        return f"working budget: the default (a quarter of each model's bytes, at least {least} MiB)"
    return f"working budget: {setting // 2**20} MiB (${WORKING_MB_ENV})"


def circuit_note(rows: list[dict[str, Any]]) -> str | None:
    """What the MANSU phase's circuit held (the scale flow reports it), as one line."""
    row = next((r for r in rows if "candidate_weights" in r), None)
    if row is None:
        return None
    share = row["candidate_weights"] / row["model_weights"]
    state = "bfloat16" if row.get("state_precision") == "storage" else "float32"
    return (f"MANSU's circuit: {row['circuit']}: {row['candidate_weights']:,} candidate weights, "
            f"{share:.0%} of the model's (MANSU holds {state} state per candidate weight)")


def passes_note(rows: list[dict[str, Any]]) -> str | None:
    """The pairs per pass of each attribution phase that records them (the scale-edges flow), as one line."""
    said = [f"{row['phase']}: {_count(len(row['pairs_per_pass']), 'pass', 'passes')} of "
            f"{' + '.join(map(str, row['pairs_per_pass']))} pairs" for row in rows if row.get("pairs_per_pass")]
    return "; ".join(said) or None


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def memory_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per phase of a child's report."""
    return [{"flow": report["flow"], **row, "peak_rss_mib": row["peak_rss_bytes"] / 2**20,
             "start_rss_mib": row["start_rss_bytes"] / 2**20, "model_bytes": report["model_bytes"],
             "allocator": report.get("allocator", "unknown")}
            for row in report["phases"]]


def allocator_note(rows: list[dict[str, Any]]) -> str:
    """Which malloc the flows' processes ran on, as one line (their peaks depend on it)."""
    used = sorted({row["allocator"] for row in rows if "allocator" in row})
    return (f"memory allocator in the flows' processes: {', '.join(used) or 'unknown'} (the app's: jemalloc "
            f"where installed, else the C library's; ${allocator.MALLOC_ENV}=system chooses the C library's)")


def held_notes(rows: list[dict[str, Any]]) -> list[str]:
    """For each flow in ``rows``, what the process held when its last phase started, by kind
    (:func:`held_by_kind`), as one line: the floor that phase's peak stood on."""
    last = {row["flow"]: row for row in rows if row.get("start_held")}
    mib = 2**20
    return [f"{flow}: when \"{row['phase']}\" started the process held {row['start_rss_bytes'] / mib:,.0f} MiB, "
            f"{row['start_rss_bytes'] / row['model_bytes']:.2f}x the model: checkpoint files' pages "
            f"{row['start_held']['weight_files'] / mib:,.0f} MiB, other files' pages (libraries' code and data) "
            f"{row['start_held']['other_files'] / mib:,.0f} MiB, anonymous memory (heap, Python objects, "
            f"tensors) {row['start_held']['anonymous'] / mib:,.0f} MiB"
            for flow, row in last.items()]


if __name__ == "__main__":
    flow_arg, model_arg, rounds_arg = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3
    precision_arg = sys.argv[4] if len(sys.argv) > 4 else "auto"
    print(json.dumps(child(flow_arg, model_arg, rounds_arg, precision_arg)))
