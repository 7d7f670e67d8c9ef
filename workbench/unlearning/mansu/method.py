"""The MANSU loop: setup, then rounds of (gradients → candidates → moves → check → keep or undo).

It stops when full-precision *and* quantized forget accuracy reach ``forget_target`` (top-1; on a
multiple-choice forget set, multiple-choice accuracy, never aiming below chance), when no
move fits the Fisher budget, when the retain guard's patience is spent, or after
``max_rounds``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields

from workbench.core.allocator import hand_back_freed_memory
from workbench.core.errors import WorkbenchError
from workbench.core.progress import silent
from workbench.models.update import Update
from workbench.unlearning.mansu.candidates import round_gradients, select_moves
from workbench.unlearning.mansu.config import MansuConfig
from workbench.unlearning.mansu.fisher import fisher_bound
from workbench.unlearning.mansu.projection import retain_output_change
from workbench.unlearning.mansu.rounds import (
    apply_round,
    evaluate_round,
    grow_round,
    guard_reading,
    on_guard_failure,
    snap_to_codes,
    take_moves,
    undo_round,
    verify_codes,
)
from workbench.unlearning.mansu.state import MansuState, setup_state, storage_dtypes
from workbench.unlearning.result import UnlearningResult, accuracy_text, already_at_target, nothing_to_unlearn
from workbench.unlearning.task import UnlearningTask

ADDED_LATER: dict[str, object] = {"rounds_undone_by_retain_guard": 0, "rounds_blocked_at_smallest_size": 0,
                                  "rounds_reusing_gradients": 0, "seconds_by_phase": {}, "snapped": 0,
                                  "snap_dropped": 0, "blocks_recomputed": False}
"""Diagnostics MANSU gained after its runs were first saved, with their value in an older run."""


@dataclass(frozen=True)
class MansuDiagnostics:
    """What a MANSU run reports beyond its update (``metrics.json``: ``diagnostics``).

    Attributes:
        fisher_bound: ½ Σ F Δ² of the final update (``None`` without the Fisher).
        fisher_budget: the budget it ran under (``None`` without the Fisher or without a cap).
        n_candidate_params: weights that were allowed to move.
        params_per_round: the round size at the end.
        n_modules: candidate weight tensors.
        floor_reverted: moves undone because their code did not change.
        snapped, snap_dropped: with the final snap, moves put onto a code and moves dropped.
        rounds_undone_by_retain_guard, rounds_blocked_at_smallest_size, rounds_reusing_gradients: counters.
        seconds_by_phase: time per phase (:data:`~workbench.unlearning.mansu.state.PHASES`).
        blocks_recomputed: the gradients recomputed the blocks in their backward (same numbers,
            less memory, more time: :class:`~workbench.unlearning.mansu.state.GradientMemory`).
        config: the configuration, as a dict.
        null_space_dims: per module, the null space's dimension (with projection).
        retain_output_change: ‖ΔW K_R‖ / (‖ΔW‖·‖K_R‖) of the final edit (with projection).
    """

    fisher_bound: float | None
    fisher_budget: float | None
    n_candidate_params: int
    params_per_round: int
    n_modules: int
    floor_reverted: int
    snapped: int
    snap_dropped: int
    rounds_undone_by_retain_guard: int
    rounds_blocked_at_smallest_size: int
    rounds_reusing_gradients: int
    seconds_by_phase: dict[str, float]
    blocks_recomputed: bool
    config: dict[str, object]
    null_space_dims: dict[str, int] | None = None
    retain_output_change: float | None = None

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        for key in ("null_space_dims", "retain_output_change"):
            if out[key] is None:
                del out[key]  # only with projection, as metrics.json has always had them
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> MansuDiagnostics:
        """Read back :meth:`to_dict` (a saved run's ``diagnostics``). Counters added after
        runs were first saved read as what those runs did: nothing (:data:`ADDED_LATER`)."""
        names = {f.name for f in fields(cls)}
        data = {**ADDED_LATER, **data}
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in data)
        unknown = sorted(set(data) - names)
        if missing or unknown:
            problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unknown {', '.join(unknown)}"] if unknown else [])
            raise WorkbenchError(f"not MANSU's diagnostics ({'; '.join(problems)})")
        return cls(**data)  # type: ignore[arg-type]  # values as to_dict wrote them


def mansu(task: UnlearningTask, config: MansuConfig | None = None) -> UnlearningResult:
    """Run MANSU on the task's model and forget/retain batches; returns a sparse update."""
    # "auto" state precision decided once, here, so the run's label and diagnostics say what ran
    config = (config or MansuConfig()).for_storage(storage_dtypes(task.model, task.quant))
    start = time.perf_counter()
    report = task.progress or silent
    state = setup_state(task.model, task.batches, task.circuit, task.quant, config, report)
    state.timings["setup"] = time.perf_counter() - start
    if already_at_target(task.batches, state.answers, config.forget_target, quantized=state.q_answers):
        return nothing_to_unlearn(task.model, config.label, start)
    rounds, stopped = 0, "budget"
    for rounds in range(1, config.max_rounds + 1):
        if task.should_stop is not None and task.should_stop():
            rounds, stopped = rounds - 1, "cancelled"
            break
        stop, record = run_round(state, task, config, rounds)
        fraction = min(0.99, 0.15 + 0.85 * rounds / config.max_rounds)
        if record is not None:
            task.publish(record)
            report(fraction, f"MANSU round {rounds}: moved {int(record['moved'])}, {_round_text(record)}")
        elif stop is None:  # undone by the retain guard, and its patience not spent
            report(fraction, f"MANSU round {rounds}: undone by the retain guard; the next round makes at most "
                             f"{state.per_round} moves")
        if stop is not None:
            stopped = stop
            break
    if config.snaps and stopped != "cancelled":
        snap_to_codes(state, task.quant, config)
        record = evaluate_round(state, task.batches, config, rounds)
        task.publish(record)
        report(0.99, f"MANSU snapped {state.snapped} moves onto codes (dropped {state.snap_dropped}): "
                     f"{_round_text(record)}")
    return _result(state, task, config, rounds, stopped, time.perf_counter() - start)


def _round_text(record: dict[str, float]) -> str:
    """A round's forget accuracy as the progress line shows it (the deciding one), and the retain
    accuracy the guard measured on its sample when the record has it."""
    name, key = ("MC", "forget_mc") if "forget_mc" in record else ("top-1", "forget_top1")
    text = accuracy_text(record, key, f"forget {name}")
    assert text is not None  # every kept round measures the forget set
    for label, retain in (("top-1", "retain_top1"), ("MC", "retain_mc")):
        if retain in record:
            text += f", {accuracy_text(record, retain, f'retain {label}')} on the guard's sample"
    return text


def run_round(state: MansuState, task: UnlearningTask, config: MansuConfig,
              rounds: int) -> tuple[str | None, dict[str, float] | None]:
    """One round. Returns why the run stops (``None``: go on) and the round's record (``None``
    when the round was undone or made no move)."""
    tick = time.perf_counter()
    if state.gradients is None or not config.reuse_gradients:
        hand_back_freed_memory()  # the last round's evaluation freed its batches: not kept for the backward
        state.gradients = round_gradients(state, task.batches, config)
    else:
        # An undone round restored the weights exactly, so its gradients still hold.
        state.reused_gradients += 1
    tick = state.lap("gradients", tick)
    hand_back_freed_memory()  # the backward's transients: not kept beside the scoring's
    done = take_moves(state, select_moves(state, state.gradients, config), config)
    tick = state.lap("selection", tick)
    if config.steps_on_grid:
        verify_codes(state, done, task.quant)
    if done.chosen == 0:
        # Nothing moved: because no move fit the Fisher budget, or because there was none to make
        # (every candidate used, blocked, or unable to change its code).
        return ("fisher budget" if done.over_budget else "no candidates"), None
    apply_round(state, done, task.quant)
    tick = state.lap("quantizer", tick)
    guard = guard_reading(state, config)
    if config.retain_guard is not None and guard.drop > config.retain_guard:
        # The Fisher bound let the round through; the measurement does not.
        undo_round(state, done, task.quant)
        if on_guard_failure(state, done, config):
            return "retain guard", None
        state.lap("evaluation", tick)
        return None, None
    state.gradients = None  # the weights moved
    grow_round(state, guard.drop, config)
    record = evaluate_round(state, task.batches, config, rounds, guard.record())
    state.lap("evaluation", tick)
    key, target = task.batches.record_key, task.batches.target(config.forget_target)
    reached = record[key] <= target and record[f"{key}_q"] <= target
    return ("target" if reached else None), record


def _result(state: MansuState, task: UnlearningTask, config: MansuConfig, rounds: int, stopped: str,
            seconds: float) -> UnlearningResult:
    # sparse, as the run holds them: the few thousand weights moved, not the tensors they sit in
    moved = {n: state.deltas.sparse(n) for n in state.deltas.written()}
    update = Update({n: d for n, d in moved.items() if bool((d.values != 0).any())},
                    {"method": config.label, "base_fingerprint": task.model.fingerprint})
    diagnostics = MansuDiagnostics(
        fisher_bound=fisher_bound(state.fisher, update) if state.fisher else None,
        fisher_budget=config.fisher_budget if config.use_fisher else None,
        n_candidate_params=state.n_candidates, params_per_round=state.per_round, n_modules=len(state.names),
        floor_reverted=state.floor_reverted, snapped=state.snapped, snap_dropped=state.snap_dropped,
        rounds_undone_by_retain_guard=state.guard_undone,
        rounds_blocked_at_smallest_size=state.blocked, rounds_reusing_gradients=state.reused_gradients,
        seconds_by_phase=state.timings, blocks_recomputed=state.recompute_blocks_of is not None, config=asdict(config),
        null_space_dims=({n.rsplit(".", 1)[0]: round(p.trace()) for n, p in state.projectors.items()}
                         if state.projectors else None),
        retain_output_change=(retain_output_change(state.work, update, state.conv1d, state.retain_sample)
                              if state.projectors else None),
    )
    return UnlearningResult(update=update, method=config.label, steps=rounds, stopped=stopped, seconds=seconds,
                            history=state.history, diagnostics=diagnostics.to_dict(),
                            seconds_by_phase=dict(state.timings))
