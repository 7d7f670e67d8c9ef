"""Applying one round of moves, and undoing it: the Fisher budget, the floor's check with the
real quantizer, the retain guard and the round's evaluation.

Steps, in the order a round runs them: :func:`take_moves` (within the Fisher budget),
:func:`verify_codes` (floor on), :func:`apply_round`, :func:`guard_reading`, then either
:func:`undo_round` + :func:`on_guard_failure` or :func:`grow_round` + :func:`evaluate_round`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from workbench.core.computed_weight import install, installed
from workbench.data.facts import AnswerCriterion
from workbench.models.update import SumAtForward
from workbench.quant import QuantConfig, quantize_codes
from workbench.quant.compact import write_quantized
from workbench.unlearning.batches import Batches
from workbench.unlearning.mansu.candidates import Move
from workbench.unlearning.mansu.config import MansuConfig
from workbench.unlearning.mansu.grid import floor_targets
from workbench.unlearning.mansu.state import MansuState


@dataclass
class Round:
    """The moves one round made: per weight, the flat indices it touched and their previous deltas."""

    touched: dict[str, list[int]] = field(default_factory=dict)
    previous: dict[str, list[float]] = field(default_factory=dict)
    chosen: int = 0
    fisher_cost: float = 0.0
    over_budget: int = 0  # moves skipped because they did not fit the Fisher budget


def take_moves(state: MansuState, moves: list[Move], config: MansuConfig) -> Round:
    """Make the best moves, up to ``per_round``, skipping any that would take the running Fisher
    bound ``½ Σ F Δ²`` past ``fisher_budget`` (c). Records each move so it can be undone."""
    done = Round()
    for move in moves:
        if done.chosen >= state.per_round:
            break
        n, i = move.name, move.index
        state.deltas.touch(n)  # from the first move tried, skipped or not: the update's order
        old = state.deltas.at(n, i)
        if config.use_fisher:
            cost = 0.5 * float(state.fisher[n].view(-1)[i]) * (move.delta**2 - old**2)
            if config.fisher_budget is not None and state.bound + cost > config.fisher_budget:
                done.over_budget += 1
                continue
            state.bound += cost
            done.fisher_cost += cost
        state.deltas.set(n, [i], [move.delta])
        state.deltas.mark(n, [i])
        done.touched.setdefault(n, []).append(i)
        done.previous.setdefault(n, []).append(old)
        done.chosen += 1
    return done


def verify_codes(state: MansuState, done: Round, quant: QuantConfig) -> None:
    """Check every move with the real quantizer (d). A move whose code did not change (possible
    only where bnb's own thresholds are not midpoints, e.g. int8 on CPU) is undone and never
    tried again, so "every moved code changes" holds by construction."""
    for n, idx in done.touched.items():
        codes = quantize_codes(state.deltas.after(n), quant, transposed=state.transposed[n])
        new = codes.codes_like_weight().reshape(-1).long()
        index = torch.tensor(idx, dtype=torch.long, device=new.device)
        stuck = index[new[index] == state.grids[n].code[index]]
        if stuck.numel():
            state.deltas.set(n, stuck.tolist(), [0.0] * stuck.numel())
            state.masks.write(n).view(-1)[stuck] = False
            state.deltas.mark(n, stuck.tolist(), False)
            state.floor_reverted += int(stuck.numel())
            done.chosen -= int(stuck.numel())


def apply_round(state: MansuState, done: Round, quant: QuantConfig) -> None:
    """Write w+Δ into the working model and Q(w+Δ) into the quantized one, for the touched weights."""
    params = dict(state.work.named_parameters())
    state.answers.changing(done.touched)  # before the write: the caches must not replay across it
    state.q_answers.changing(done.touched)
    with torch.no_grad():
        for n in done.touched:
            after = state.deltas.after(n)  # w+Δ as stored (rounded to a 16-bit dtype)
            if n in state.summed:
                _hold_sum(state, n)
            else:
                if n not in state.owned:
                    # ``work`` shares the base's tensor until now: writing into it would edit the base
                    params[n].data = params[n].data.clone()
                    state.owned.add(n)
                params[n].copy_(after)
            write_quantized(state.qwork, n, quantize_codes(after, quant, transposed=state.transposed[n]))


def _hold_sum(state: MansuState, name: str) -> None:
    """Have ``work`` compute the weight ``name`` as base + delta in its forward (the same tensor
    as ``stored_sum``), installed at its first write (:func:`~.state.summed_at_forward`)."""
    owner = state.work.get_submodule(name.rpartition(".")[0])
    held = installed(owner)
    # A snapshot: every change of the deltas that moves a weight is followed by apply_round,
    # before any forward (verify_codes alone, when all of a round's moves stuck, restores zeros).
    delta = state.deltas.sparse(name)
    if isinstance(held, SumAtForward):
        held.hold(state.base[name], delta)
    else:
        install(owner, SumAtForward(state.base[name], delta))


@dataclass(frozen=True)
class GuardReading:
    """What the retain guard measured after a round: the drop it judges the round by, and the
    retain accuracy on its sample the drop came from (``retain_q`` only when it watches both
    precisions; both ``None`` when the guard is off and measured nothing)."""

    drop: float
    retain: float | None = None
    retain_q: float | None = None
    criterion: AnswerCriterion = "top1"  # the guard sample's: top-1, or multiple choice ("mc")

    def record(self) -> dict[str, float]:
        """The reading as round-record entries: ``retain_top1`` (or ``retain_mc``), ``_q`` quantized."""
        out = {} if self.retain is None else {f"retain_{self.criterion}": self.retain}
        if self.retain_q is not None:
            out[f"retain_{self.criterion}_q"] = self.retain_q
        return out


def guard_reading(state: MansuState, config: MansuConfig) -> GuardReading:
    """The retain guard's measurement: drop of the retain accuracy (top-1; multiple-choice accuracy
    on a multiple-choice retain set) on its retain sample since the base, in full
    precision (or the larger of the fp and quantized drops, with ``guard_precision="both"``); 0 when off."""
    if config.retain_guard is None:
        return GuardReading(0.0)
    fp, criterion = state.guard_batch.accuracy(state.answers), state.guard_batch.criterion
    if config.guard_precision == "both" and state.guard_base_q is not None:
        q = state.guard_batch.accuracy(state.q_answers)
        return GuardReading(max(state.guard_base - fp, state.guard_base_q - q), fp, q, criterion)
    return GuardReading(state.guard_base - fp, fp, criterion=criterion)


def undo_round(state: MansuState, done: Round, quant: QuantConfig) -> None:
    """Restore the deltas (and both working models) exactly as they were before the round."""
    for n, idx in done.touched.items():
        old = done.previous[n]  # float32 values (read from the deltas)
        state.deltas.set(n, idx, old)
        state.deltas.mark(n, idx, [v != 0 for v in old])
    apply_round(state, done, quant)
    state.bound -= done.fisher_cost


def on_guard_failure(state: MansuState, done: Round, config: MansuConfig) -> bool:
    """After an undone round: halve the round size, and at the smallest size block its moves for
    good (even the few most salient cost too much retain). True when the guard's patience is spent."""
    state.guard_undone += 1
    exhausted = False
    if state.per_round <= 8:
        for n, idx in done.touched.items():
            mask = state.masks.write(n)
            mask.view(-1)[torch.tensor(idx, dtype=torch.long, device=mask.device)] = False
        state.blocked += 1
        exhausted = state.blocked >= config.guard_patience
    if not exhausted:
        state.per_round = max(8, state.per_round // 2)
    return exhausted


def grow_round(state: MansuState, drop: float, config: MansuConfig) -> None:
    """A round that left retain within half the guard lets the next one grow by half."""
    if config.retain_guard is not None and drop <= config.retain_guard / 2:
        state.per_round = min(state.max_per_round, int(state.per_round * 1.5) + 1)


def snap_to_codes(state: MansuState, quant: QuantConfig, config: MansuConfig) -> None:
    """The final snap (``floor_mode="snap"``): every moved weight whose change reaches
    ``snap_fraction`` of its bin goes onto the code next to its base code in the direction of
    its change (so its code changes and Q(w+Δ) = w+Δ there); the smaller moves are dropped."""
    snapped, written = Round(), Round()
    for n in state.deltas.moved_names():  # a tensor never written has no move to snap
        delta, moved = state.deltas[n].view(-1), state.deltas.moved(n)
        grid = state.grids[n]
        target, valid = floor_targets(delta, grid, 1)
        keep = moved & valid & (delta.abs() >= config.snap_fraction * grid.bin_width)
        state.snap_dropped += int((moved & ~keep).sum())
        written.touched[n] = moved.nonzero().squeeze(-1).tolist()  # snapped or dropped
        snapped.touched[n] = keep.nonzero().squeeze(-1).tolist()  # the moves the quantizer must confirm
        snapped.chosen += len(snapped.touched[n])
        kept = keep.nonzero().squeeze(-1)
        state.deltas.replace(n, kept, (target - state.base[n].view(-1))[kept])
        state.deltas.mark_only(n, kept.tolist())
    verify_codes(state, snapped, quant)
    state.snapped = snapped.chosen
    apply_round(state, written, quant)


def evaluate_round(state: MansuState, batches: Batches, config: MansuConfig, rounds: int,
                   retain: Mapping[str, float] | None = None) -> dict[str, float]:
    """Forget accuracy of w+Δ and Q(w+Δ) after a kept round (refreshing which facts each still
    answers), by the run's criterion: first-token top-1 (``forget_top1``/``forget_top1_q``), and
    on a multiple-choice forget set also ``forget_mc``/``forget_mc_q``, which decide; ``retain``:
    the round's retain entries (:meth:`GuardReading.record`), measured by the guard already."""
    state.still = batches.forget_answered(state.answers)
    answered_q = batches.forget_answered(state.q_answers)
    state.q_still = answered_q if config.forget_direction != "full_precision" else None
    record = {"step": rounds, "moved": float(state.n_moved()), "fisher_bound": state.bound}
    fp, q = float(state.still.float().mean()), float(answered_q.float().mean())
    if batches.choices is not None:
        record["forget_mc"], record["forget_mc_q"] = fp, q
        fp, q = state.answers.top1(batches.forget), state.q_answers.top1(batches.forget)
    record["forget_top1"], record["forget_top1_q"] = fp, q
    record.update(retain or {})
    state.history.append(record)
    return record
