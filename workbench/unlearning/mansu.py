"""MANSU — Mechanistic-Aligned Null-Space Unlearning, as this workbench reads the paper.

The paper (Sadhu, Seth, Sankarapu, 2026) has no public code; this is our reading of its
abstract (REFERENCE.md §3), every component switchable for ablations:

(a) **circuit restriction** — only weights of circuit components may move
    (:func:`workbench.circuit.circuit_parameters`); among them the moved ones are chosen by
    forget saliency against retain Fisher.
(b) **null-space projection** — the forget direction of each linear map is projected onto
    the near-null space of its retain-set inputs: with ``C = K_R K_Rᵀ`` (``K_R`` = inputs
    ``[d_in, n_tokens]``) and ``U₀`` the eigenvectors whose eigenvalue is at most
    ``null_threshold · λ_max``, ``P = U₀ U₀ᵀ`` and ``D ← D P`` (``P D`` for GPT-2's Conv1D,
    whose weight is ``[in, out]``), so ``D K_R ≈ 0``. One projector per module serves a fused
    ``c_attn`` / ``query_key_value`` (its Q, K and V read the same input) and each of
    Llama's separate q/k/v projections (GQA changes nothing here: K and V read the same
    normalised residual as Q).
(c) **diagonal-Fisher retain bound** — ``F_i = E_retain[(∂ log p(y|x)/∂θ_i)²]``; to second
    order the retain KL of a change Δ is ``½ Σ F_i Δ_i²``. Saliency is ``|D_i| / √(F_i + λ)``
    and a candidate is only moved while the running bound stays within ``fisher_budget``.
(d) **quantization magnitude floor** — a moved weight is set to the *value of its
    neighbouring quantization code* in the direction of ``D`` (``code_steps`` codes away):
    ``w_i + Δ_i = code[c_i ± k] · absmax_b``. That is past the decision boundary by at least
    half a bin, so the quantized code changes by construction, and ``Q(w+Δ) = w+Δ`` on the
    moved weights. A block's absmax element is never moved (its block scale, and so every
    other code of the block, stays put); the real bitsandbytes quantizer verifies both.

The edit is built in rounds: each round takes the gradient of the forget loss at the
current after-model, projects it, ranks candidates and moves ``params_per_round`` new
weights by the floor rule. It stops when full-precision *and* quantized forget top-1 reach
``forget_target``, when the Fisher budget is spent, or after ``max_rounds``.

Without the floor (ablation) a selected weight moves by ``no_floor_step`` local bin widths
scaled by its relative saliency — a sparse but sub-bin update, the regime quantization erases.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from workbench.errors import WorkbenchError
from workbench.unlearning.batches import FactBatch, answer_logits
from workbench.unlearning.loop import Batches, UnlearningResult
from workbench.unlearning.losses import answer_logprob
from workbench.update import Update

if TYPE_CHECKING:
    from workbench.models import LoadedModel
    from workbench.nodes import Component
    from workbench.quant import QuantConfig

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class MansuConfig:
    """MANSU's switches and budgets (see the module docstring for each component).

    Attributes:
        use_circuit, use_projection, use_fisher, use_floor: the four components.
        params_per_round: weights moved per round; ``None`` = ``round_fraction`` of the
            candidate weights, clipped to [32, 512].
        round_fraction: see ``params_per_round``.
        retain_guard: largest allowed drop of full-precision retain top-1 (on up to 256
            retain facts) after a round; a round that exceeds it is undone and the round
            size halved (at the smallest size, its moves are never tried again). A round
            that leaves retain within half the guard lets the next round grow by half, up
            to ``max_round_growth`` × the initial size. The Fisher bound is second-order and underestimates the damage of
            bin-sized moves (measured on SmolLM2: bound 0.03 nats, real retain KL 4.5), so
            the guard measures instead of trusting it. ``None`` switches it off.
        guard_patience: stop after this many rounds undone at the smallest round size,
            counted over the whole run. Not consecutively: on SmolLM2 passing and undone
            rounds alternate (each pass lets the round grow, the next is undone), and a
            consecutive count never stopped a run that made almost no progress.
        max_rounds: round budget.
        forget_target: stop when fp and quantized forget top-1 are both <= this.
        null_threshold: relative eigenvalue threshold of the near-null space.
        min_null_fraction: keep at least this fraction of input directions as "null" (the
            smallest-eigenvalue ones) when the threshold leaves fewer.
        fisher_budget: ε on ½ Σ F_i Δ_i² (nats); ``None`` = no cap (saliency still uses F).
        fisher_samples: retain examples for the Fisher estimate.
        fisher_damping: λ in the saliency, relative to the mean retain cost of the candidates.
        retain_first_order: with ``use_fisher``, a move's retain cost also counts the
            first-order loss of retain log-likelihood, ``max(0, −∇log p_retain · step)``;
            bin-sized moves are far outside the region where the second-order Fisher term
            alone is accurate.
        max_round_growth: cap on round-size growth (see ``retain_guard``).
        quantized_direction: the forget direction averages the gradients at ``w+Δ`` and at
            the deployed ``Q(w+Δ)``. MANSU's moves survive rounding by construction, but the
            quantized base is a different starting point (REFERENCE.md §6: the PTQ gap is
            mostly this "base shift"), so the quantized model is steered explicitly.
        code_steps: codes moved per weight (floor rule).
        no_floor_step: sub-bin step (in bin widths) when the floor is off.
        retain_batch: retain examples for the projector's activations (all if larger).
    """

    use_circuit: bool = True
    use_projection: bool = True
    use_fisher: bool = True
    use_floor: bool = True
    params_per_round: int | None = None
    round_fraction: float = 0.002
    retain_guard: float | None = 0.02
    max_rounds: int = 60
    forget_target: float = 0.1
    null_threshold: float = 1e-2
    min_null_fraction: float = 0.25
    fisher_budget: float | None = 0.05
    fisher_samples: int = 64
    fisher_damping: float = 0.1
    retain_first_order: bool = True
    max_round_growth: float = 4.0
    guard_patience: int = 5
    quantized_direction: bool = True
    code_steps: int = 2
    no_floor_step: float = 0.2
    retain_batch: int = 256

    def __post_init__(self) -> None:
        if (self.params_per_round is not None and self.params_per_round < 1) or self.max_rounds < 1:
            raise WorkbenchError("params_per_round and max_rounds must be >= 1")
        if not 0.0 < self.round_fraction <= 1.0:
            raise WorkbenchError(f"round_fraction must be in (0, 1], got {self.round_fraction}")
        if not 0.0 <= self.forget_target <= 1.0:
            raise WorkbenchError(f"forget_target must be in [0, 1], got {self.forget_target}")
        if not 0.0 < self.null_threshold < 1.0:
            raise WorkbenchError(f"null_threshold must be in (0, 1), got {self.null_threshold}")
        if not 0.0 <= self.min_null_fraction <= 1.0:
            raise WorkbenchError(f"min_null_fraction must be in [0, 1], got {self.min_null_fraction}")
        if self.fisher_budget is not None and not self.fisher_budget > 0:
            raise WorkbenchError(f"fisher_budget must be > 0 or None, got {self.fisher_budget}")
        if self.code_steps < 1:
            raise WorkbenchError(f"code_steps must be >= 1, got {self.code_steps}")
        if self.fisher_samples < 1:
            raise WorkbenchError("fisher_samples must be >= 1")
        if self.guard_patience < 1:
            raise WorkbenchError(f"guard_patience must be >= 1, got {self.guard_patience}")
        if self.max_round_growth < 1.0:
            raise WorkbenchError(f"max_round_growth must be >= 1, got {self.max_round_growth}")

    @property
    def label(self) -> str:
        off = [n for n, on in (("circuit", self.use_circuit), ("projection", self.use_projection),
                               ("fisher", self.use_fisher), ("floor", self.use_floor)) if not on]
        return "mansu" + "".join(f"-no_{n}" for n in off)


# --- (b) null-space projection ---------------------------------------------------------


def null_space_projector(inputs: torch.Tensor, threshold: float = 1e-2, min_fraction: float = 0.0) -> torch.Tensor:
    """Projector onto the near-null space of ``inputs``' second moment.

    Args:
        inputs: ``[n_tokens, d]`` activations (rows are the retain inputs k_j).
        threshold: eigenvalues of ``C = Σ k_j k_jᵀ`` at most ``threshold · λ_max`` count as null.
        min_fraction: at least this fraction of the ``d`` directions is kept (smallest first).

    Returns:
        ``P`` ``[d, d]``, symmetric, idempotent; ``P k ≈ 0`` for retain inputs k.
    """
    if inputs.ndim != 2 or inputs.shape[0] == 0:
        raise WorkbenchError(f"null_space_projector needs [n_tokens, d] inputs, got {tuple(inputs.shape)}")
    x = inputs.double()
    cov = x.T @ x
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    d = cov.shape[0]
    n_null = int((evals <= threshold * evals[-1].clamp_min(1e-30)).sum())
    n_null = max(n_null, int(round(min_fraction * d)))
    basis = evecs[:, :n_null]
    return (basis @ basis.T).float()


def _linear_inputs(work: torch.nn.Module, names: Iterable[str], batch: FactBatch) -> dict[str, torch.Tensor]:
    """``[n_real_tokens, d_in]`` inputs of the modules owning the weights ``names`` on ``batch``.

    Modules that read the same tensor (Llama's q/k/v projections, gate/up) get the very same
    returned tensor, so callers can compute one projector per distinct input.
    """
    modules = dict(work.named_modules())
    owners = {n: n.rsplit(".", 1)[0] for n in names}
    captured: dict[str, list[torch.Tensor]] = {m: [] for m in set(owners.values())}
    # id → (the input itself, its real-token rows); holding the input keeps its id unique
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    positions = torch.arange(batch.ids.shape[1], device=batch.last.device)
    real = positions[None, :] <= batch.last[:, None]  # padding excluded
    handles = []
    for mod_name in captured:
        def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], key: str = mod_name) -> None:
            x = args[0]
            if id(x) not in seen:
                seen[id(x)] = (x, x.detach()[real])
            captured[key].append(seen[id(x)][1])
        handles.append(modules[mod_name].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            work(batch.ids)
    finally:
        for h in handles:
            h.remove()
    # one forward, so one captured input per module (kept as is: shared inputs stay shared)
    by_module = {m: xs[0] if len(xs) == 1 else torch.cat(xs) for m, xs in captured.items()}
    return {n: by_module[owners[n]] for n in names}


def _is_conv1d(work: torch.nn.Module, name: str) -> bool:
    module = dict(work.named_modules())[name.rsplit(".", 1)[0]]
    return type(module).__name__ == "Conv1D"


def project_update(delta: torch.Tensor, projector: torch.Tensor, *, conv1d: bool) -> torch.Tensor:
    """Project a weight change so that it leaves retain outputs unchanged to first order.

    ``nn.Linear`` weights are ``[out, in]`` (y = W x): ``ΔW P``. GPT-2 ``Conv1D`` weights are
    ``[in, out]`` (y = x W): ``P ΔW``.
    """
    return projector @ delta if conv1d else delta @ projector


# --- (c) diagonal Fisher -----------------------------------------------------------------


def diagonal_fisher(work: torch.nn.Module, names: list[str], batch: FactBatch, samples: int) -> dict[str, torch.Tensor]:
    """``E[(∂ log p(y|x)/∂θ)²]`` over the first ``samples`` retain facts (all if fewer).

    The empirical Fisher with the true answers (the facts the model knows). The square must
    be of a *per-example* gradient, as the definition requires. For the weight of an
    ``nn.Linear`` or GPT-2 ``Conv1D`` used once per forward, the per-example gradient is
    ``Σ_t g_{b,t} x_{b,t}ᵀ`` (output gradient times input, summed over the example's tokens),
    so one batched forward/backward gives every example's gradient; examples do not
    interact in a causal LM, and padding after an example's last token gets no gradient.
    Any other weight (embeddings, shared tensors) takes one backward per example
    (:func:`diagonal_fisher_per_example`, the reference the batched path is tested against).
    """
    count = min(samples, len(batch))
    if count == 0:
        raise WorkbenchError("the diagonal Fisher needs at least one retain example")
    rows = batch.subset(torch.arange(count))
    owners = _single_use_linear_owners(work, names)
    rest = [n for n in names if n not in owners]
    fisher = diagonal_fisher_per_example(work, rest, rows, count) if rest else {}
    if owners:
        fisher.update(_batched_linear_fisher(work, owners, rows))
    return {n: fisher[n] for n in names}


def diagonal_fisher_per_example(work: torch.nn.Module, names: list[str], batch: FactBatch, samples: int) -> dict[str, torch.Tensor]:
    """:func:`diagonal_fisher` by one backward pass per example: slow, for any parameter."""
    params = dict(work.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    fisher = {n: torch.zeros_like(params[n]) for n in names}
    count = min(samples, len(batch))
    try:
        for i in range(count):
            row = batch.subset(torch.tensor([i]))
            logp = answer_logprob(answer_logits(work, row), row.answers)[0]
            grads = torch.autograd.grad(logp, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    fisher[n] += g.detach() ** 2
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return {n: f / count for n, f in fisher.items()}


def _single_use_linear_owners(work: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Module]:
    """``name → module`` for the named weights owned by a Linear/Conv1D and shared with no other module."""
    from workbench.quant import _conv1d_class

    conv1d = _conv1d_class()
    uses: dict[int, int] = {}
    for m in work.modules():
        for p in m.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    modules = dict(work.named_modules())
    owners = {}
    for n in names:
        owner, _, attr = n.rpartition(".")
        module = modules.get(owner)
        if attr != "weight" or module is None or uses.get(id(module.weight), 0) != 1:
            continue
        if isinstance(module, torch.nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
            owners[n] = module
    return owners


def _batched_linear_fisher(
    work: torch.nn.Module, owners: dict[str, torch.nn.Module], batch: FactBatch, chunk: int = 16
) -> dict[str, torch.Tensor]:
    """Per-example squared gradients of Linear/Conv1D weights, one forward/backward per ``chunk`` examples.

    Memory: one ``[chunk, out, in]`` per-example gradient at a time.
    """
    from workbench.quant import _conv1d_class

    conv1d = _conv1d_class()
    fisher = {n: torch.zeros_like(m.weight) for n, m in owners.items()}
    params = list(work.parameters())
    flags = [p.requires_grad for p in params]
    # Only the moved weights need grad: that puts their modules' outputs in the graph.
    wanted = {id(m.weight) for m in owners.values()}
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def capture(key: str) -> Callable[..., None]:
        def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if key in inputs:
                raise WorkbenchError(f"{key}: its module ran twice in one forward; this Fisher needs one use")
            inputs[key], outputs[key] = args[0].detach(), out
        return hook

    handles = [m.register_forward_hook(capture(n)) for n, m in owners.items()]
    try:
        for p in params:
            p.requires_grad_(id(p) in wanted)
        for start in range(0, len(batch), chunk):
            part = batch.subset(torch.arange(start, min(start + chunk, len(batch))))
            inputs.clear()
            outputs.clear()
            logp = answer_logprob(answer_logits(work, part), part.answers).sum()
            keys = list(outputs)
            # Row b of the gradient of Σ_b log p_b at a module's output is example b's own.
            grads = torch.autograd.grad(logp, [outputs[k] for k in keys], allow_unused=True)
            for k, g in zip(keys, grads):
                if g is None:
                    continue
                x, g = inputs[k].float(), g.float()
                if conv1d is not None and isinstance(owners[k], conv1d):  # weight [in, out]
                    per_example = torch.einsum("bti,bto->bio", x, g)
                else:  # nn.Linear weight [out, in]
                    per_example = torch.einsum("bto,bti->boi", g, x)
                fisher[k] += (per_example**2).sum(0).to(fisher[k].dtype)
    finally:
        for h in handles:
            h.remove()
        inputs.clear()
        outputs.clear()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return {n: f / len(batch) for n, f in fisher.items()}


def fisher_bound(fisher: dict[str, torch.Tensor], update: Update) -> float:
    """Second-order retain KL estimate ½ Σ F_i Δ_i² of an update."""
    return float(sum(0.5 * (fisher[n] * d**2).sum() for n, d in update.deltas.items() if n in fisher))


# --- (d) quantization grid ---------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Grid:
    """Per weight of one tensor (flattened in the weight's own layout): where it sits on the grid.

    Attributes:
        code: ``[numel]`` int16, its code index (as bitsandbytes numbers the codes).
        rank: ``[numel]`` int16, position of its code in ascending code-value order.
        absmax: ``[numel]`` exact absmax of its block (what bnb divides by to pick codes).
        values: ``[n_codes]`` code values in ascending order.
        bin_width: ``[numel]`` local bin width (:class:`workbench.quant.BinGeometry`).
        is_block_max: ``[numel]`` moving it could change the block scale.
    """

    code: torch.Tensor
    rank: torch.Tensor
    absmax: torch.Tensor
    values: torch.Tensor
    bin_width: torch.Tensor
    is_block_max: torch.Tensor


def _grid(w: torch.Tensor, quant: QuantConfig, *, transposed: bool) -> _Grid:
    from workbench.quant import bin_geometry, code_order, code_table

    geo = bin_geometry(w, quant, transposed=transposed)
    values = code_table(quant)[code_order(quant)]
    return _Grid(
        # int16 codes (≤ 256 of them): 4 bytes per candidate weight instead of 16 as int64
        code=geo.code.reshape(-1).to(torch.int16), rank=geo.rank.reshape(-1).to(torch.int16),
        absmax=geo.absmax.reshape(-1).float(), values=values.float(),
        bin_width=geo.bin_width.reshape(-1).float(), is_block_max=geo.is_block_max.reshape(-1),
    )


def floor_targets(direction: torch.Tensor, grid: _Grid, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per weight (flat): the value of the code ``steps`` away in ``sign(direction)``, and validity.

    The target sits *on* a code value, half a bin or more past the decision boundary, so the
    real quantizer maps it to that code. Invalid where the direction is 0, the code would
    leave the table, or the weight is its block's absmax (moving it rescales the block).
    """
    sign = torch.sign(direction.reshape(-1)).long()
    target_rank = grid.rank.long() + steps * sign
    n = grid.values.numel()
    valid = (sign != 0) & (target_rank >= 0) & (target_rank < n) & ~grid.is_block_max
    target = grid.values[target_rank.clamp(0, n - 1)] * grid.absmax
    return target, valid


# --- the method ----------------------------------------------------------------------------


@dataclass
class _State:
    names: list[str]
    masks: dict[str, torch.Tensor]
    projectors: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    grids: dict[str, _Grid] = field(default_factory=dict)
    conv1d: dict[str, bool] = field(default_factory=dict)
    transposed: dict[str, bool] = field(default_factory=dict)


def mansu(
    model: LoadedModel,
    batches: Batches,
    *,
    circuit: Iterable[Component] | None,
    quant: QuantConfig,
    config: MansuConfig = MansuConfig(),
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> UnlearningResult:
    """Run MANSU on ``model`` for the forget/retain ``batches``; returns a sparse update."""
    from workbench.quant import quantizable_parameters, quantize_codes, quantize_dequantize

    start = time.perf_counter()
    timings = {"setup": 0.0, "gradients": 0.0, "selection": 0.0, "quantizer": 0.0, "evaluation": 0.0}
    report = progress or (lambda _f, _m: None)
    quantizable = quantizable_parameters(model.hf, quant)
    if config.use_circuit:
        from workbench.circuit import circuit_parameters

        components = list(circuit or [])
        if not components:
            raise WorkbenchError("MANSU with circuit restriction needs a non-empty circuit")
        masks = {n: m for n, m in circuit_parameters(model, components).items() if n in quantizable and bool(m.any())}
        if not masks:
            raise WorkbenchError("the circuit maps to no quantized weight (only embeddings?); add heads or MLPs")
    else:
        masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.hf.named_parameters() if n in quantizable}
    names = sorted(masks)
    work = copy.deepcopy(model.hf).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    state = _State(names=names, masks=masks)
    state.conv1d = {n: _is_conv1d(work, n) for n in names}

    report(0.02, "quantization grid of the moved modules")
    base = model.state()
    from workbench.quant import transposed_parameters

    transposed = transposed_parameters(model.hf)
    state.transposed = {n: n in transposed for n in names}
    for n in names:
        state.grids[n] = _grid(base[n], quant, transposed=state.transposed[n])

    retain_proj = batches.retain.sample(config.retain_batch, torch.Generator().manual_seed(0))
    if config.use_projection:
        report(0.05, "retain activations → null-space projectors")
        inputs = _linear_inputs(work, names, retain_proj)
        cache: dict[int, torch.Tensor] = {}  # one projector per distinct input tensor
        for n in names:
            key = id(inputs[n])
            if key not in cache:
                cache[key] = null_space_projector(inputs[n], config.null_threshold, config.min_null_fraction)
            state.projectors[n] = cache[key]
    if config.use_fisher:
        report(0.1, "retain Fisher")
        state.fisher = diagonal_fisher(work, names, batches.retain, config.fisher_samples)

    # Quantized base of the moved modules: Q(after) only differs from Q(base) where we move.
    deltas = {n: torch.zeros_like(base[n]) for n in names}
    moved = {n: torch.zeros(base[n].numel(), dtype=torch.bool, device=base[n].device) for n in names}
    params = dict(work.named_parameters())
    history: list[dict[str, float]] = []
    bound = 0.0
    reverted = 0
    stopped = "budget"
    rounds = 0
    qwork = _quantized_copy(model, quant)
    qparams = dict(qwork.named_parameters())
    n_candidates = int(sum(int(m.sum()) for m in masks.values()))
    per_round = config.params_per_round or min(512, max(32, int(config.round_fraction * n_candidates)))
    max_per_round = int(per_round * config.max_round_growth) if config.params_per_round is None else per_round
    blocked = 0
    reused_gradients = 0
    guard_batch = batches.retain.sample(256, torch.Generator().manual_seed(1))
    guard_base = _top1(work, guard_batch)
    guard_undone = 0
    # Which forget facts each model still answers: the forget gradient only runs over those
    # (forgotten facts contribute nothing to it), and each round's evaluation refreshes them.
    still = _correct(work, batches.forget)
    q_still = _correct(qwork, batches.forget) if config.quantized_direction else None

    timings["setup"] = time.perf_counter() - start
    # Gradients at the current weights; an undone round restores the weights exactly, so the
    # next round reuses them (on SmolLM2 most late rounds are undone).
    gradients: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None] | None = None
    for rounds in range(1, config.max_rounds + 1):
        if should_stop is not None and should_stop():
            stopped = "cancelled"
            rounds -= 1
            break
        tick = time.perf_counter()
        if gradients is None or not _REUSE_GRADIENTS:
            direction = _forget_direction(work, names, batches.forget, still)
            if q_still is not None:
                q_direction = _forget_direction(qwork, names, batches.forget, q_still)
                direction = {n: 0.5 * (direction[n] + q_direction[n]) for n in names}
            # a different retain sample from the guard's, so the guard stays an independent check
            retain_grad = (_retain_gradient(work, names, retain_proj)
                           if config.use_fisher and config.retain_first_order else None)
            gradients = (direction, retain_grad)
        else:
            reused_gradients += 1
        direction, retain_grad = gradients
        tick = _lap(timings, "gradients", tick)
        per_module: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # name, gain, cost, step
        for n in names:
            raw = direction[n] * masks[n]
            d = project_update(raw, state.projectors[n], conv1d=state.conv1d[n]) * masks[n] if config.use_projection else raw
            flat = d.reshape(-1)
            grid = state.grids[n]
            w_now = (base[n] + deltas[n]).reshape(-1)
            if config.use_floor:
                target, valid = floor_targets(flat, grid, config.code_steps)
                valid &= ~moved[n]
                step = target - base[n].reshape(-1)
            else:
                valid = (flat != 0) & ~grid.is_block_max
                width = grid.bin_width
                rel = flat.abs() / flat.abs().max().clamp_min(1e-30)
                step = torch.sign(flat) * config.no_floor_step * width * rel
                step = (w_now + step) - base[n].reshape(-1)
            valid &= masks[n].reshape(-1)
            if config.use_fisher:
                # Forget gain of the move itself (first order, unprojected gradient) against its
                # retain cost: curvature ½FΔ² plus, optionally, the first-order retain loss.
                move = step - deltas[n].reshape(-1)
                gain = (raw.reshape(-1) * move).clamp_min(0)
                cost = 0.5 * state.fisher[n].reshape(-1) * move**2
                if retain_grad is not None:
                    cost = cost + (-(retain_grad[n].reshape(-1) * move)).clamp_min(0)
            else:
                gain, cost = flat.abs(), torch.zeros_like(flat)
            gain = torch.where(valid, gain, torch.zeros_like(gain))
            per_module.append((n, gain, cost, step))
        damping = 0.0
        if config.use_fisher:
            live = [c[g > 0] for _n, g, c, _s in per_module]
            pooled = torch.cat(live) if live else torch.zeros(0)
            damping = config.fisher_damping * float(pooled.mean()) if pooled.numel() else 0.0
        candidates: list[tuple[float, str, int, float]] = []  # (saliency, name, flat index, delta)
        for n, gain, cost, step in per_module:
            sal = gain / (cost + damping + 1e-30) if config.use_fisher else gain
            k = min(per_round, int((gain > 0).sum()))
            if k == 0:
                continue
            top = torch.topk(sal, k)
            for sv, i in zip(top.values.tolist(), top.indices.tolist()):
                if sv > 0:
                    candidates.append((sv, n, i, float(step[i])))
        candidates.sort(key=lambda c: -c[0])
        chosen = 0
        touched: dict[str, list[int]] = {}
        previous: dict[str, list[float]] = {}  # pre-round deltas, to undo a round exactly
        round_cost = 0.0
        for _s, n, i, new_delta in candidates:
            if chosen >= per_round:
                break
            old = float(deltas[n].view(-1)[i])
            if config.use_fisher:
                cost = 0.5 * float(state.fisher[n].view(-1)[i]) * (new_delta**2 - old**2)
                if config.fisher_budget is not None and bound + cost > config.fisher_budget:
                    continue
                bound += cost
                round_cost += cost
            deltas[n].view(-1)[i] = new_delta
            moved[n][i] = True
            touched.setdefault(n, []).append(i)
            previous.setdefault(n, []).append(old)
            chosen += 1
        tick = _lap(timings, "selection", tick)
        if config.use_floor:
            # Verify with the real quantizer; a move whose code did not change (possible
            # only where bnb's own thresholds are not midpoints, e.g. int8 on CPU) is undone
            # and never tried again, so "every moved code changes" holds by construction.
            for n, idx in touched.items():
                codes = quantize_codes(base[n] + deltas[n], quant, transposed=state.transposed[n])
                new = codes.codes_like_weight().reshape(-1).long()
                index = torch.tensor(idx, device=deltas[n].device)
                stuck = index[new[index] == state.grids[n].code[index]]
                if stuck.numel():
                    deltas[n].view(-1)[stuck] = 0.0
                    masks[n].view(-1)[stuck] = False
                    moved[n][stuck] = False
                    reverted += int(stuck.numel())
                    chosen -= int(stuck.numel())
        if chosen == 0:
            stopped = "fisher budget" if config.use_fisher and config.fisher_budget is not None else "no candidates"
            break
        with torch.no_grad():
            for n in touched:  # the only modules whose deltas changed
                params[n].copy_(base[n] + deltas[n])
                qparams[n].copy_(quantize_dequantize(base[n] + deltas[n], quant, transposed=state.transposed[n]))
        tick = _lap(timings, "quantizer", tick)
        retain_drop = guard_base - _top1(work, guard_batch) if config.retain_guard is not None else 0.0
        if config.retain_guard is not None and retain_drop > config.retain_guard:
            # Undo the round (the Fisher bound let it through, the measurement does not).
            with torch.no_grad():
                for n, idx in touched.items():
                    index = torch.tensor(idx, device=deltas[n].device)
                    old_values = torch.tensor(previous[n], dtype=deltas[n].dtype, device=deltas[n].device)
                    deltas[n].view(-1)[index] = old_values
                    moved[n][index] = old_values != 0
                    params[n].copy_(base[n] + deltas[n])
                    qparams[n].copy_(quantize_dequantize(base[n] + deltas[n], quant, transposed=state.transposed[n]))
            guard_undone += 1
            bound -= round_cost
            if per_round <= 8:
                # Even the few most salient moves cost too much retain: never try them again.
                for n, idx in touched.items():
                    masks[n].view(-1)[torch.tensor(idx, device=masks[n].device)] = False
                blocked += 1
                if blocked >= config.guard_patience:
                    stopped = "retain guard"
                    break
            per_round = max(8, per_round // 2)
            _lap(timings, "evaluation", tick)
            continue
        gradients = None  # the weights moved
        if config.retain_guard is not None and retain_drop <= config.retain_guard / 2:
            per_round = min(max_per_round, int(per_round * 1.5) + 1)
        still = _correct(work, batches.forget)
        fp = float(still.float().mean())
        answered_q = _correct(qwork, batches.forget)
        q = float(answered_q.float().mean())
        q_still = answered_q if config.quantized_direction else None
        _lap(timings, "evaluation", tick)
        record = {"step": rounds, "forget_top1": fp, "forget_top1_q": q, "moved": float(sum(int(m.sum()) for m in moved.values())),
                  "fisher_bound": bound}
        history.append(record)
        report(min(0.99, 0.15 + 0.85 * rounds / config.max_rounds),
               f"MANSU round {rounds}: moved {int(record['moved'])}, forget top-1 {fp:.3f} (quantized {q:.3f})")
        if fp <= config.forget_target and q <= config.forget_target:
            stopped = "target"
            break

    update = Update({n: d for n, d in deltas.items() if bool((d != 0).any())},
                    {"method": config.label, "base_fingerprint": model.fingerprint})
    diagnostics: dict[str, Any] = {
        "fisher_bound": fisher_bound(state.fisher, update) if state.fisher else None,
        "fisher_budget": config.fisher_budget if config.use_fisher else None,
        "n_candidate_params": n_candidates,
        "params_per_round": per_round,
        "n_modules": len(names),
        "floor_reverted": reverted,
        "rounds_undone_by_retain_guard": guard_undone,
        "rounds_blocked_at_smallest_size": blocked,
        "rounds_reusing_gradients": reused_gradients,
        "seconds_by_phase": timings,
        "config": config.__dict__,
    }
    if state.projectors:
        dims = {n.rsplit(".", 1)[0]: int(round(float(torch.trace(p)))) for n, p in state.projectors.items()}
        diagnostics["null_space_dims"] = dims
        diagnostics["retain_output_change"] = retain_output_change(work, update, state, retain_proj)
    return UnlearningResult(update=update, method=config.label, steps=rounds, stopped=stopped,
                            seconds=time.perf_counter() - start, history=history, diagnostics=diagnostics)


def retain_output_change(work: torch.nn.Module, update: Update, state: _State, batch: FactBatch) -> float:
    """‖ΔW K_R‖ / (‖ΔW‖·‖K_R‖) summed over modules: how far the final sparse edit is from the null space."""
    if update.is_empty():
        return 0.0
    inputs = _linear_inputs(work, list(update.deltas), batch)
    num = den = 0.0
    for n, d in update.deltas.items():
        k = inputs[n]
        out = k @ d if state.conv1d.get(n) else k @ d.T
        num += float(out.norm())
        den += float(d.norm() * k.norm())
    return num / den if den else 0.0


def _answer_logprob_gradient(work: torch.nn.Module, names: list[str], batch: FactBatch) -> dict[str, torch.Tensor]:
    """∇ mean log p(answer) over ``batch`` w.r.t. the named parameters (zeros where unused)."""
    params = dict(work.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    try:
        logp = answer_logprob(answer_logits(work, batch), batch.answers)
        grads = torch.autograd.grad(logp.mean(), [params[n] for n in names], allow_unused=True)
    finally:
        for n in names:
            params[n].requires_grad_(False)
    return {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(names, grads)}


def _forget_direction(
    work: torch.nn.Module, names: list[str], forget: FactBatch, still: torch.Tensor
) -> dict[str, torch.Tensor]:
    """−∇ mean log p(answer) over the forget facts ``work`` still answers (``still``, ``[n]``
    bool, from :func:`_correct`; all facts once none is left), so already-forgotten facts stop
    pulling on the direction. Only those facts are run: the same gradient, for less work."""
    rows = forget.subset(still.nonzero().squeeze(-1)) if bool(still.any()) else forget
    return {n: -g for n, g in _answer_logprob_gradient(work, names, rows).items()}


def _retain_gradient(work: torch.nn.Module, names: list[str], retain: FactBatch) -> dict[str, torch.Tensor]:
    """∇ mean log p(answer) over the retain facts (a move along it keeps them; against it hurts)."""
    return _answer_logprob_gradient(work, names, retain)


_REUSE_GRADIENTS = True
"""Tests switch the reuse of gradients after an undone round off to check it changes nothing."""


def _lap(timings: dict[str, float], phase: str, since: float) -> float:
    """Add the time since ``since`` to ``timings[phase]``; return now."""
    now = time.perf_counter()
    timings[phase] += now - since
    return now


def _correct(module: torch.nn.Module, batch: FactBatch) -> torch.Tensor:
    """``[n]`` bool: the facts whose answer is ``module``'s top-1."""
    with torch.no_grad():
        return answer_logits(module, batch).argmax(-1) == batch.answers


def _top1(module: torch.nn.Module, batch: FactBatch) -> float:
    return float(_correct(module, batch).float().mean())


def _quantized_copy(model: LoadedModel, quant: QuantConfig) -> torch.nn.Module:
    from workbench.quant import fake_quantize_model

    q = fake_quantize_model(model.hf, quant)
    for p in q.parameters():
        p.requires_grad_(False)
    return q.eval()
