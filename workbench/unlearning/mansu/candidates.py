"""One round's candidates: the gradients, each weight's move, its forget gain and retain cost,
and the ranking by saliency (gain per cost).

Steps, in the order a round runs them: :func:`round_gradients`, then :func:`select_moves`:
:func:`score_module` for each candidate weight, :func:`rank_moves`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from workbench.core.allocator import hand_back_freed_memory
from workbench.models.adapter import ModelAdapter
from workbench.models.recompute import blocks_recomputed
from workbench.models.scoring import FactBatch, span_logits
from workbench.models.update import SparseDelta
from workbench.unlearning.batches import Batches
from workbench.unlearning.losses import answer_logprob
from workbench.unlearning.mansu.config import MansuConfig
from workbench.unlearning.mansu.grid import Grid, direction_sign, sign_targets
from workbench.unlearning.mansu.projection import project_update
from workbench.unlearning.mansu.state import GRADIENT_CHUNK, Gradients, MansuState, taking_grad


@dataclass(frozen=True)
class ModuleScores:
    """Per weight of one candidate tensor (flat): the move's forget ``gain`` (0 where the move is
    not allowed), its retain ``cost``, and ``step``, the delta the weight would have after it."""

    name: str
    gain: torch.Tensor
    cost: torch.Tensor
    step: torch.Tensor


@dataclass(frozen=True)
class Move:
    """One proposed move: make the delta of weight ``index`` (flat) of ``name`` equal ``delta``
    (:func:`~.rounds.take_moves`; ranked by ``saliency``)."""

    saliency: float
    name: str
    index: int
    delta: float


def answer_logprob_gradient(work: torch.nn.Module, names: list[str], batch: FactBatch,
                            chunk: int = GRADIENT_CHUNK,
                            span: Callable[[FactBatch], torch.Tensor] | None = None,
                            recompute_blocks_of: ModelAdapter | None = None) -> dict[str, torch.Tensor]:
    """∇ mean log p(answer) over ``batch`` w.r.t. the named parameters (zeros where unused).

    Up to ``chunk`` facts take one backward (the mean, as before chunking); more are summed
    chunk by chunk (each chunk's sum ÷ n), equal up to float summation order. log p(answer)
    sums over the answer's tokens, teacher-forced, padding masked. ``span``: the forward giving
    a chunk's span logits (default :func:`~workbench.models.scoring.span_logits` of ``work``;
    MANSU's retain gradient passes its prefix cache's). ``recompute_blocks_of``: ``work``'s adapter,
    to recompute its blocks in the backward rather than keep their activations (the same
    gradients, one more forward: :func:`~workbench.models.recompute.blocks_recomputed`).
    Uses and clears the named parameters' ``.grad``; every other parameter of ``work`` must not
    require grad (MANSU's working models are frozen copies).

    Returned in the parameters' storage dtype, as backward summed them: widening a 16-bit
    gradient to float32 is exact, so a caller widens one tensor when it computes with it
    (:func:`score_module`) instead of holding every gradient at twice its bytes."""
    params = dict(work.named_parameters())
    n = len(batch)
    recomputing = (blocks_recomputed(work, recompute_blocks_of) if recompute_blocks_of is not None
                   else contextlib.nullcontext())
    with taking_grad(work, names), recomputing:
        for start in range(0, n, chunk):
            rows = batch if n <= chunk else batch.subset(torch.arange(start, min(n, start + chunk)))
            logits = span(rows) if span is not None else span_logits(work, rows)
            logp = answer_logprob(logits, rows.targets, rows.mask)
            objective = logp.mean() if n <= chunk else logp.sum() / n
            # backward() adds each chunk into .grad in place, one weight at a time: the sum and
            # one weight's new gradient are held, not the sum and a whole second gradient
            objective.backward()
        total = [params[name].grad for name in names]  # read before taking_grad drops them
    return {name: (g if g is not None else torch.zeros_like(params[name])) for name, g in zip(names, total)}


def forget_direction(work: torch.nn.Module, names: list[str], forget: FactBatch, still: torch.Tensor,
                     recompute_blocks_of: ModelAdapter | None = None) -> dict[str, torch.Tensor]:
    """−∇ mean log p(answer) over the forget facts ``work`` still answers (``still``, ``[n]``
    bool; all facts once none is left), so already-forgotten facts stop pulling on the
    direction. Only those facts are run: the same gradient, for less work."""
    rows = forget.subset(still.nonzero().squeeze(-1)) if bool(still.any()) else forget
    gradient = answer_logprob_gradient(work, names, rows, recompute_blocks_of=recompute_blocks_of)
    return {n: g.neg_() for n, g in gradient.items()}  # in place: no second copy


def round_gradients(state: MansuState, batches: Batches, config: MansuConfig) -> Gradients:
    """The forget direction (at w+Δ, at Q(w+Δ) or their average, as ``forget_direction`` says:
    the quantized base is a different starting point, so the deployed model is steered
    explicitly) and, for the first-order retain cost, the retain gradient."""
    if config.forget_direction == "quantized":
        assert state.q_still is not None
        direction = forget_direction(state.qwork, state.names, batches.forget, state.q_still, state.recompute_blocks_of)
    else:
        direction = forget_direction(state.work, state.names, batches.forget, state.still, state.recompute_blocks_of)
    if config.forget_direction == "average":
        assert state.q_still is not None
        q_direction = forget_direction(state.qwork, state.names, batches.forget, state.q_still,
                                       state.recompute_blocks_of)
        for n in state.names:  # freeing each quantized one as it goes: ½(a + b) in float32, as before
            average = direction[n].float().add_(q_direction.pop(n)).mul_(0.5)
            # rounded to the storage dtype when the state is held there (a copy for 16 bits only)
            direction[n] = average.to(state.base[n].dtype) if state.storage_state else average
    retain = (answer_logprob_gradient(state.work, state.names, state.retain_sample, span=state.answers.span_logits,
                                      recompute_blocks_of=state.recompute_blocks_of)
              if config.use_fisher and config.retain_first_order else None)
    return Gradients(direction, retain)


SCORE_CHUNK = 1 << 20
"""Weights whose targets, gains and costs are computed at once (:func:`score_module`): their
elementwise temporaries are this many weights (4 MiB each in float32), not a whole tensor's."""


def score_module(state: MansuState, name: str, gradients: Gradients, config: MansuConfig) -> ModuleScores:
    """Each candidate weight of ``name``: where it would move, what that gains and what it costs.

    The move: with the floor (d) applied each round, onto the code ``code_steps`` away along
    the projected (b) direction (or, with ``code_choice="best"``, the 1..``max_code_steps``
    that gains most per cost); otherwise a sub-bin step of ``no_floor_step`` bin widths scaled
    by relative saliency. With the Fisher (c), the gain is the move's first-order forget gain
    (along the unprojected gradient) and the cost its curvature ``½FΔ²``, plus the
    first-order retain loss with ``retain_first_order``; without it, the gain is the projected
    direction's size.

    Memory: above :data:`SCORE_CACHE_WEIGHTS` this runs twice a round per candidate tensor and
    its temporaries set MANSU's peak (the scale bench's), so each step lets go of what the next
    does not read (the widened direction once projected, the projected one once its sign is
    taken, the grid once the targets are), and the elementwise steps run :data:`SCORE_CHUNK`
    weights at a time into the outputs; every value is the one the plain whole-tensor
    expressions gave (``tests/test_mansu.py`` holds them as the reference).
    """
    mask = state.masks.held(name)  # None: the circuit takes the whole tensor, no weight masked
    direction = gradients.forget[name]
    flat = (_projected(state, name, _masked_direction(direction, mask), mask) if config.use_projection
            else _masked_direction(direction, mask).reshape(-1))
    if config.steps_on_grid:
        sign = direction_sign(flat)
        if config.use_fisher:
            flat = None  # the Fisher's gain reads the unprojected direction: let go before the grid
        options = _grid_steps(state, name, sign, config)
        if state.grids.per_use:
            # the grid's build and the targets freed blocks under glibc's mmap threshold (its
            # int16 and bool tensors): handed back, not kept resident under the scoring's
            hand_back_freed_memory()
    else:
        options = [_sub_bin_step(state.grids[name], state.base[name], state.deltas[name].reshape(-1), flat, config)]
    scored = [_gain_and_cost(state, name, direction, mask, flat, step,
                             valid if mask is None else valid & mask.reshape(-1), gradients, config)
              for step, valid in options]
    return scored[0] if len(scored) == 1 else _best_per_weight(scored, config)


def _chunks(n: int) -> Iterator[slice]:
    return (slice(start, min(n, start + SCORE_CHUNK)) for start in range(0, n, SCORE_CHUNK))


def _masked_direction(direction: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The forget direction in float32 (scores and deltas live there, whatever the storage
    dtype), zero outside ``mask``. Read only: a float32 direction without a mask is returned
    as it is held."""
    if mask is None:
        return direction.float()
    return direction.to(torch.float32, copy=True).mul_(mask)


def _projected(state: MansuState, name: str, raw: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The direction projected onto the retain inputs' null space, zero outside ``mask``; flat.
    Whole-tensor (a matmul's bits may follow its shape)."""
    d = project_update(raw, state.projectors[name].matrix(), conv1d=state.conv1d[name])
    return (d if mask is None else d.mul_(mask)).reshape(-1)


def _grid_steps(state: MansuState, name: str, sign: torch.Tensor,
                config: MansuConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each option's delta (the weight put on the code ``k`` away, floor rule) and where it is
    allowed; the grid (rebuilt per use above :data:`~.state.GRID_KEEP_WEIGHTS`) is let go on
    return."""
    ks = [config.code_steps] if config.code_choice == "fixed" else range(1, config.max_code_steps + 1)
    grid = state.grids[name]
    if state.grids.per_use:
        hand_back_freed_memory()  # the build's temporaries: not kept resident under the targets'
    moved, base = state.deltas.moved(name), state.base[name].reshape(-1)
    options = []
    for k in ks:
        step = torch.empty(sign.shape, dtype=torch.float32, device=sign.device)
        valid = torch.empty(sign.shape, dtype=torch.bool, device=sign.device)
        for part in _chunks(sign.numel()):
            target, ok = sign_targets(sign[part], grid.part(part), k)
            step[part], valid[part] = target.sub_(base[part]), ok.logical_and_(~moved[part])  # target − w, float32
        options.append((step, valid))
    return options


def _sub_bin_step(grid: Grid, base: torch.Tensor, delta: torch.Tensor, flat: torch.Tensor,
                  config: MansuConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta after a further sub-bin step along ``flat`` (no floor), and where that is allowed."""
    valid = (flat != 0) & ~grid.is_block_max
    rel = flat.abs() / flat.abs().max().clamp_min(1e-30)
    step = torch.sign(flat) * config.no_floor_step * grid.bin_width * rel
    base = base.reshape(-1)
    return (base + delta + step) - base, valid  # the delta w+Δ would have, in w+Δ's rounding


def _gain_and_cost(state: MansuState, name: str, direction: torch.Tensor, mask: torch.Tensor | None,
                   flat: torch.Tensor | None, step: torch.Tensor, valid: torch.Tensor, gradients: Gradients,
                   config: MansuConfig) -> ModuleScores:
    if not config.use_fisher:
        assert flat is not None
        return ModuleScores(name, flat.abs().masked_fill_(~valid, 0.0), torch.zeros_like(flat), step)
    gain, cost = torch.empty_like(step), torch.empty_like(step)
    held = state.deltas.sparse(name)
    direction, fisher = direction.reshape(-1), state.fisher[name].reshape(-1)
    retain = gradients.retain[name].reshape(-1) if gradients.retain is not None else None
    for part in _chunks(step.numel()):
        move = _move(held, step, part)
        raw = _masked_direction(direction[part], None if mask is None else mask.reshape(-1)[part])
        gain[part] = (raw * move).clamp_min_(0).masked_fill_(~valid[part], 0.0)
        # ½F·move², as (0.5·F)·move² (a 16-bit Fisher widened exactly), in one buffer
        part_cost = fisher[part].to(torch.float32, copy=True).mul_(0.5).mul_(move**2)
        if retain is not None:
            # a 16-bit gradient times the float32 move is computed in float32 (exact widening)
            part_cost.add_((retain[part] * move).neg_().clamp_min_(0))
        cost[part] = part_cost
    return ModuleScores(name, gain, cost, step)


def _move(held: SparseDelta, step: torch.Tensor, part: slice) -> torch.Tensor:
    """``step − Δ`` over the flat range ``part``: what each weight would move by. The delta is
    zero but where a round set it, and ``x − 0.0`` is ``x`` to the bit (``-0.0`` included), so
    only those weights are subtracted: no dense delta."""
    move = step[part].clone()
    inside = (held.index >= part.start) & (held.index < part.stop)
    if bool(inside.any()):
        index = held.index[inside]
        move[index - part.start] = step[index] - held.values[inside]
    return move


def _best_per_weight(options: list[ModuleScores], config: MansuConfig) -> ModuleScores:
    """Per weight, the option with the largest gain per cost (the largest gain without the Fisher)."""
    gain = torch.stack([o.gain for o in options])
    cost = torch.stack([o.cost for o in options])
    saliency = gain / (cost + 1e-30) if config.use_fisher else gain
    best = saliency.argmax(0, keepdim=True)
    pick = lambda t: t.gather(0, best).squeeze(0)  # noqa: E731 - one gather, three tensors
    return ModuleScores(options[0].name, pick(gain), pick(cost), pick(torch.stack([o.step for o in options])))


def rank_moves(scores: list[ModuleScores], per_round: int, config: MansuConfig, *,
               storage_state: bool = False) -> list[Move]:
    """The ``per_round`` most salient moves of each module, pooled and sorted by saliency.

    Saliency is gain per cost (with the Fisher; damped by ``fisher_damping`` times the mean
    cost of the moves with a gain), else the gain itself. ``storage_state``: the run's
    (:attr:`MansuState.storage_state`), which sets how the damping's mean is summed.
    """
    damping = _damping(scores, sum(s.cost.numel() for s in scores), config, storage_state)
    moves = [move for s in scores for move in _module_moves(s, per_round, damping, config)]
    moves.sort(key=lambda m: -m.saliency)
    return moves


SCORE_CACHE_WEIGHTS = 16_000_000
"""Up to this many weights in the candidate tensors, and while their scores fit in the working
budget (:func:`holds_every_score`), a round scores every tensor once and holds all the scores
(:data:`SCORE_BYTES_PER_WEIGHT`) to rank them; otherwise (no circuit restriction, or a circuit
whose scores outweigh the budget) it scores each tensor twice, holding one tensor's scores at a
time (:func:`select_moves`)."""

SCORE_BYTES_PER_WEIGHT = 12
"""A candidate's gain, cost and step in float32 (fewer bytes in a 16-bit state: an estimate from above)."""


def holds_every_score(state: MansuState) -> bool:
    """Whether a round holds every candidate tensor's scores at once (one scoring per tensor)
    rather than scoring each twice: when there are at most :data:`SCORE_CACHE_WEIGHTS` weights
    and their scores fit in the working budget. SmolLM2's default circuit (13.3M weights, 152 MiB
    of scores) holds them under a budget of the model's bytes and scores twice under the default
    quarter of them (at 128 MiB the highest sample of MANSU's run was while holding them). The
    moves are the same either way (tested); the cost is a second scoring per round."""
    n = state.n_weights()
    return n <= SCORE_CACHE_WEIGHTS and n * SCORE_BYTES_PER_WEIGHT <= state.working_budget


def select_moves(state: MansuState, gradients: Gradients, config: MansuConfig) -> list[Move]:
    """:func:`rank_moves` over every candidate tensor's :func:`score_module`, in memory bounded
    by one tensor when the candidates are many: a first pass keeps only the costs that set the
    damping, a second scores each tensor again and keeps only its best moves (without the
    Fisher there is no damping: one pass). Every path gives the same moves: scoring is
    deterministic and the damping is the same mean of the same costs."""
    def scores() -> Iterator[ModuleScores]:
        return (score_module(state, n, gradients, config) for n in state.names)

    if config.use_fisher and holds_every_score(state):
        return rank_moves(list(scores()), state.per_round, config, storage_state=state.storage_state)
    damping = 0.0
    if config.use_fisher:  # first pass: only the costs the damping is the mean of
        damping = _damping(scores(), state.n_weights(), config, state.storage_state)
    moves: list[Move] = []
    for s in scores():
        moves += _module_moves(s, state.per_round, damping, config)
        del s  # else this tensor's scores are held while the next tensor is scored
    moves.sort(key=lambda m: -m.saliency)
    return moves


def _damping(scores: Iterable[ModuleScores], capacity: int, config: MansuConfig, storage_state: bool) -> float:
    """``fisher_damping`` × the mean cost of the moves with a gain (0 without the Fisher), over
    ``scores`` of ``capacity`` weights in all; with ``storage_state`` summed tensor by tensor."""
    if not config.use_fisher:
        return 0.0
    if storage_state:
        return config.fisher_damping * streamed_mean_cost(scores)
    pooled = live_costs(scores, capacity)
    return config.fisher_damping * float(pooled.mean()) if pooled.numel() else 0.0


def streamed_mean_cost(scores: Iterable[ModuleScores]) -> float:
    """The mean cost of the moves with a gain, summed tensor by tensor in float64: no buffer of
    every cost (:func:`live_costs`), the same mean up to its last bits (0 when none has a gain)."""
    total, count = 0.0, 0
    for s in scores:
        live = s.cost[s.gain > 0]
        total += float(live.sum(dtype=torch.float64))
        count += live.numel()
        del s, live  # not held while the next tensor is scored
    return total / count if count else 0.0


def live_costs(scores: Iterable[ModuleScores], capacity: int) -> torch.Tensor:
    """The costs of the moves with a gain, in ``scores``' order: the tensor ``torch.cat`` of
    each tensor's would be (so its mean is the same to the bit), written into one buffer of
    ``capacity`` entries (at least the scored weights) as each tensor is scored. The pieces and
    their concatenation held at once were twice the live costs. On the CPU only the filled
    pages become resident; a GPU's caching allocator reserves the whole buffer (unmeasured)."""
    buffer: torch.Tensor | None = None
    filled = 0
    for s in scores:
        if buffer is None:
            buffer = torch.empty(capacity, dtype=s.cost.dtype, device=s.cost.device)
        live = s.cost[s.gain > 0]
        buffer[filled:filled + live.numel()] = live
        filled += live.numel()
        del s, live  # not held while the next tensor is scored
    return torch.zeros(0) if buffer is None else buffer[:filled]


def _module_moves(s: ModuleScores, per_round: int, damping: float, config: MansuConfig) -> list[Move]:
    """One tensor's ``per_round`` most salient moves with a positive saliency."""
    saliency = s.gain / (s.cost + damping + 1e-30) if config.use_fisher else s.gain
    k = min(per_round, int((s.gain > 0).sum()))
    if k == 0:
        return []
    top = torch.topk(saliency, k)
    return [Move(value, s.name, i, float(s.step[i]))
            for value, i in zip(top.values.tolist(), top.indices.tolist()) if value > 0]
