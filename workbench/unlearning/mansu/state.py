"""MANSU's state: what is fixed at setup (candidates, grids, projectors, Fisher) and what each
round changes (the deltas, the moved weights, the Fisher bound, the round size).

:func:`setup_state` builds it; the steps in :mod:`.candidates` and :mod:`.rounds` read and
update it; :mod:`.method` runs the rounds.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from collections.abc import Callable, ItemsView, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from workbench.core.allocator import hand_back_freed_memory
from workbench.core.components import Component
from workbench.core.errors import WorkbenchError
from workbench.core.memo import latest_memo
from workbench.core.progress import Progress
from workbench.core.sharing import sharing_copy
from workbench.interpretability.parameters import circuit_parameters
from workbench.models.adapter import ModelAdapter
from workbench.models.loaded import LoadedModel
from workbench.models.prefix import PrefixCache
from workbench.models.recompute import saved_bytes
from workbench.models.scoring import FactBatch, span_logits
from workbench.quant import PackedPlacement, QuantConfig, packed_placement, quantized_copy, unpack_placement
from workbench.quant.compact import compact_quantized_copy
from workbench.quant.parameters import single_use_linear_owners
from workbench.unlearning.batches import Batches, ScoredSet
from workbench.unlearning.mansu.config import MansuConfig, StatePrecision
from workbench.unlearning.mansu.deltas import SparseDeltas
from workbench.unlearning.mansu.fisher import FISHER_CHUNK, diagonal_fisher, fisher_rows, per_example_bytes
from workbench.unlearning.mansu.grid import Grid, placement_grid, weight_grid
from workbench.unlearning.mansu.projection import HeldProjector, projectors_for

T = TypeVar("T")

MANY_CANDIDATES_WEIGHTS = 16_000_000
"""Above this many weights in the candidate tensors (no circuit restriction: every weight of
the model) MANSU holds the model at Q(w+Δ) all as codes and sums written weights at forward
(:func:`many_candidates`)."""

GRID_KEEP_WEIGHTS = 16_000_000
"""Up to this many weights in the candidate tensors (a circuit's), their grids are kept for the
whole run, packed (codes and block absmaxes, about 1 byte per weight, unpacked per use by
look-ups); above it each grid is rebuilt from the base weights when a round needs it, which is
exact (the base does not change) and costs a pass of the quantizer per tensor twice a round
instead of a byte per weight. Keeping SmolLM2's 106M without a circuit was measured (one run each,
side by side): 5% less time (210 s against 221 s for a round) for 111 MiB more peak (3.94 GB
against 3.82 GB, next to that run's 4 GB target): not taken."""

COMPACT_QWORK_BYTES = 1 << 30
"""Above this many bytes of quantized weights outside the candidate tensors (a 1B model in
bfloat16, not SmolLM2 in float32), or above what the model's working budget leaves beside a
gradient step when that is smaller, MANSU's working models go compact (:func:`compact_working_models`):
the model at Q(w+Δ) holds every quantized weight as codes, half a byte per 4-bit weight,
dequantized by each module's forward (:func:`~workbench.quant.compact.compact_quantized_copy`:
the same logits and gradients; a round writes the candidates' new codes), and the model at w+Δ
sums each written weight at forward; below it, both hold tensors."""

GRADIENT_CHUNK = FISHER_CHUNK
"""Facts per forward/backward of a gradient (the Fisher's chunk, one number for both): activation memory grows
with the rows of one backward (on SmolLM2's short facts ~0.75 GB above the start for 16, ~20 MiB
per fact of it the saved activations; 7.7 GB for 256 in one pass), so larger batches are summed
in chunks; when a chunk's would still outweigh the working budget, the blocks are recomputed in
the backward (:class:`GradientMemory`)."""


def many_candidates(tensors: Mapping[str, torch.Tensor], names: list[str]) -> bool:
    """More than :data:`MANY_CANDIDATES_WEIGHTS` weights in the candidate tensors ``names`` (MANSU
    without a circuit): the model at Q(w+Δ) all codes, written weights summed at forward. Read at
    call time, so a test can lower the threshold."""
    return _weights(tensors, names) > MANY_CANDIDATES_WEIGHTS


def _weights(tensors: Mapping[str, torch.Tensor], names: list[str]) -> int:
    return sum(tensors[n].numel() for n in names)


PHASES = ("setup", "gradients", "selection", "quantizer", "evaluation")
"""Where a MANSU run's time goes, in the order of a round (``seconds_by_phase``)."""


@dataclass
class Gradients:
    """The gradients a round ranks candidates by (reused after an undone round).

    Attributes:
        forget: the forget direction per weight (−∇ log p(answer) over the facts still answered;
            or at Q(w+Δ), as ``forget_direction`` says).
        retain: ∇ log p(answer) over the projector's retain sample (``None`` when unused).

    Each in the storage dtype when that holds it exactly (a 16-bit model's gradient, half the
    bytes of float32 over every candidate weight), in float32 otherwise (the average of two
    directions); scoring widens one tensor at a time.
    """

    forget: dict[str, torch.Tensor]
    retain: dict[str, torch.Tensor] | None


class CandidateMasks:
    """Per candidate tensor, which of its weights may move: all of them until a round masks some.

    A mask is allocated at the first write (:meth:`write`): a run over every weight of the model
    holds masks only where a round masked something. ``written`` starts it with given masks (a
    circuit's). ``[name]`` reads (a fresh all-true mask when never written: do not write into
    what it returns); :meth:`items` and :meth:`values` list the written masks only.
    """

    def __init__(self, like: Mapping[str, torch.Tensor], written: Mapping[str, torch.Tensor] | None = None) -> None:
        self._like = like
        self._written: dict[str, torch.Tensor] = dict(written or {})

    def _filled(self, name: str) -> torch.Tensor:
        like = self._like[name]
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)

    def __getitem__(self, name: str) -> torch.Tensor:
        held = self._written.get(name)
        return held if held is not None else self._filled(name)

    def held(self, name: str) -> torch.Tensor | None:
        """The written mask of ``name``, or ``None`` while every weight of it may move (scoring
        then skips the mask: multiplying by an all-true mask changes no value)."""
        return self._written.get(name)

    def write(self, name: str) -> torch.Tensor:
        """The tensor to write into (allocated, filled, on the first call)."""
        if name not in self._written:
            self._written[name] = self._filled(name)
        return self._written[name]

    def names(self) -> list[str]:
        """Every tensor it covers, written or not, sorted."""
        return sorted(self._like)

    def items(self) -> ItemsView[str, torch.Tensor]:
        return self._written.items()

    def values(self) -> list[torch.Tensor]:
        return list(self._written.values())


class GridStore:
    """The quantization grid of each candidate tensor (:func:`weight_grid` of its base value).

    Up to :data:`GRID_KEEP_WEIGHTS` candidate weights each is kept packed (its codes and
    block absmaxes, about 1 byte per weight, :func:`~workbench.quant.packed_placement`) and
    unpacked from the base weight on each use (look-ups, no quantizer); otherwise rebuilt with
    the quantizer on each use. Either gives :func:`weight_grid`'s values (the base does not change).
    """

    def __init__(self, base: Mapping[str, torch.Tensor], names: list[str], quant: QuantConfig,
                 transposed: Mapping[str, bool]) -> None:
        self._base, self._quant, self._transposed = base, quant, transposed
        self._kept: dict[str, PackedPlacement] | None = None
        if _weights(base, names) <= GRID_KEEP_WEIGHTS:
            self._kept = {n: packed_placement(base[n], quant, transposed=transposed[n]) for n in names}

    def __getitem__(self, name: str) -> Grid:
        if self._kept is None:
            return weight_grid(self._base[name], self._quant, transposed=self._transposed[name])
        return placement_grid(unpack_placement(self._kept[name], self._base[name]), self._quant)

    def kept_bytes(self) -> int:
        """Bytes the kept grids hold (0 when rebuilt on each use)."""
        return sum(p.nbytes() for p in (self._kept or {}).values())

    @property
    def per_use(self) -> bool:
        """Grids rebuilt on each use (above :data:`GRID_KEEP_WEIGHTS`): scoring then sets MANSU's memory peak."""
        return self._kept is None


@dataclass
class MansuState:
    """Everything a MANSU run holds; see the module docstring.

    Fixed at setup: ``names`` (candidate weights, sorted), ``base`` (their base values),
    ``grids`` (:class:`GridStore`), ``transposed`` and ``conv1d`` (per weight), ``projectors``
    and ``fisher`` (empty when that component is off), ``work`` (the model at w+Δ: it shares
    the base's tensors until a round writes one, see ``owned``) and ``qwork`` (at Q(w+Δ); see
    :func:`quantized_working_copy`),
    ``answers`` and ``q_answers`` (their forwards on the batches every round runs again,
    through :class:`~workbench.models.prefix.PrefixCache`: the blocks before the first weight
    a round wrote run once per batch), ``retain_sample`` (for projectors and the retain
    gradient), ``guard_batch`` and ``guard_base`` (the retain guard's independent sample and
    its base accuracy; ``guard_base_q`` the same for Q(w), when the guard watches both
    precisions), ``n_candidates``, ``max_per_round``, ``storage_state`` (the Fisher, averaged
    forget direction and projectors held in the weights' storage dtype: the configuration's
    ``state_precision`` as :meth:`~.config.MansuConfig.for_storage` decides it for this model),
    ``working_budget`` (:meth:`~workbench.models.loaded.LoadedModel.working_budget_bytes`, which
    sets whether a round holds every candidate's score at once: :func:`~.candidates.select_moves`).

    Changed by rounds: ``masks`` (a move that cannot change its code, or that the guard
    blocked at the smallest round size, is masked out for good; :class:`CandidateMasks`),
    ``deltas`` (each moved weight's delta and flag, :class:`~.deltas.SparseDeltas`), ``owned`` (the tensors of ``work``
    given their own storage, at their first write; ``summed`` names the tensors that instead
    are computed as base + delta by each forward once written, see :func:`summed_at_forward`),
    ``bound`` (the running Fisher bound), ``per_round``, ``still`` and ``q_still`` (which forget
    facts w+Δ and Q(w+Δ) still answer), ``gradients``, the counters, ``timings`` and ``history``.
    """

    names: list[str]
    masks: CandidateMasks
    base: dict[str, torch.Tensor]
    grids: GridStore
    transposed: dict[str, bool]
    conv1d: dict[str, bool]
    work: torch.nn.Module
    qwork: torch.nn.Module
    answers: PrefixCache
    q_answers: PrefixCache
    retain_sample: FactBatch
    guard_batch: ScoredSet
    guard_base: float
    n_candidates: int
    per_round: int
    max_per_round: int
    deltas: SparseDeltas
    still: torch.Tensor
    q_still: torch.Tensor | None
    guard_base_q: float | None = None
    storage_state: bool = False
    working_budget: int = 0  # bytes: the model's working budget, read at setup (select_moves' choice)
    owned: set[str] = field(default_factory=set)
    summed: frozenset[str] = frozenset()
    projectors: dict[str, HeldProjector] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    recompute_blocks_of: ModelAdapter | None = None  # the adapter when the gradients recompute the blocks
    bound: float = 0.0
    gradients: Gradients | None = None
    floor_reverted: int = 0
    snapped: int = 0
    snap_dropped: int = 0
    guard_undone: int = 0
    blocked: int = 0
    reused_gradients: int = 0
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    history: list[dict[str, float]] = field(default_factory=list)

    def n_moved(self) -> int:
        return self.deltas.n_moved()

    def n_weights(self) -> int:
        """Weights in the candidate tensors (candidates or not)."""
        return int(sum(self.base[n].numel() for n in self.names))

    def lap(self, phase: str, since: float) -> float:
        """Add the time since ``since`` to ``phase``; return now (after the GPU's queued work)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.timings[phase] += now - since
        return now


def candidate_masks(model: LoadedModel, circuit: tuple[Component, ...] | None, quant: QuantConfig,
                    config: MansuConfig) -> CandidateMasks:
    """Which weights may move: the quantized weights of the circuit's components (a).

    Without circuit restriction, every quantized weight: all-true masks, allocated only for the
    tensors a round masks something in."""
    quantizable = model.adapter.quantizable(quant)
    params = {n: p.detach() for n, p in model.hf.named_parameters() if n in quantizable}
    if not config.use_circuit:
        return CandidateMasks(params)
    components = list(circuit or [])
    if not components:
        raise WorkbenchError("MANSU with circuit restriction needs a non-empty circuit")
    masks = {n: m for n, m in circuit_parameters(model, components).items() if n in quantizable and bool(m.any())}
    if not masks:
        raise WorkbenchError("the circuit maps to no quantized weight (only embeddings?); add heads or MLPs")
    # a tensor the circuit takes whole (an MLP's) needs no mask until a round masks something:
    # a byte per weight of every candidate MLP matrix otherwise (0.24 GB on the scale bench's circuit)
    partial = {n: m for n, m in masks.items() if not bool(m.all())}
    return CandidateMasks({n: params[n] for n in masks}, written=partial)


def round_sizes(n_candidates: int, config: MansuConfig) -> tuple[int, int]:
    """The first round's size and the largest a round may grow to."""
    per_round = config.params_per_round or min(512, max(32, int(config.round_fraction * n_candidates)))
    if config.params_per_round is not None:
        return per_round, per_round
    return per_round, int(per_round * config.max_round_growth)


SETUP_MEMO_ENTRIES = 16_000_000
"""The largest retain Fisher or set of projectors (in float32 entries) a process keeps for later
runs (:func:`retain_fisher`, :func:`null_space_projectors`)."""


def retain_fisher(model: LoadedModel, work: torch.nn.Module, names: list[str], retain: FactBatch,
                  samples: int, precision: StatePrecision = "float32",
                  chunk: int = GRADIENT_CHUNK) -> dict[str, torch.Tensor]:
    """The base's diagonal retain Fisher on the tensors ``names`` (``work`` still equals the base),
    in float32, or rounded to each weight's storage dtype (``precision``, see
    :attr:`MansuConfig.state_precision`), ``chunk`` facts per pass
    (:meth:`GradientMemory.facts_per_pass`).

    It depends on nothing a run changes, so the latest one is kept (:func:`~workbench.core.memo.latest_memo`):
    the next run on the same model, tensors, retain facts and sample count (an ablation table, a
    study, a second click on the same circuit) reuses it. Above :data:`SETUP_MEMO_ENTRIES` it is
    not kept (without a circuit it is 4 bytes per decoder weight)."""
    def compute() -> dict[str, torch.Tensor]:
        fisher = diagonal_fisher(work, names, retain, samples, transposed=model.adapter.transposed, chunk=chunk)
        if precision == "storage":
            for n in names:  # one float32 tensor let go at a time
                fisher[n] = fisher[n].to(work.get_parameter(n).dtype)
        return fisher

    entries = sum(work.get_parameter(n).numel() for n in names)
    return _setup_memo("fisher", model, work, names, (samples, _digest(retain), precision, chunk), entries, compute)


def null_space_projectors(model: LoadedModel, work: torch.nn.Module, names: list[str], sample: FactBatch,
                          config: MansuConfig) -> dict[str, HeldProjector]:
    """The null-space projectors of the base's retain activations for the weights ``names``,
    kept for later runs as :func:`retain_fisher` (``d_in²`` entries per weight, counted per weight
    although weights reading one input share one projector, and each is held as a triangle)."""
    def compute() -> dict[str, HeldProjector]:
        held = projectors_for(work, names, sample, config.null_threshold, config.min_null_fraction)
        return _rounded_projectors(work, held) if config.state_in_storage_dtype else held

    conv1d = model.adapter.transposed
    entries = sum(work.get_parameter(n).shape[0 if n in conv1d else -1] ** 2 for n in names)
    settings = (config.null_threshold, config.min_null_fraction, _digest(sample), config.state_precision)
    return _setup_memo("projectors", model, work, names, settings, entries, compute)


def _rounded_projectors(work: torch.nn.Module, held: dict[str, HeldProjector]) -> dict[str, HeldProjector]:
    """Each projector in its weight's storage dtype; weights reading one input still share one."""
    rounded: dict[int, HeldProjector] = {}
    out = {}
    for n, projector in held.items():
        if id(projector) not in rounded:
            rounded[id(projector)] = projector.rounded(work.get_parameter(n).dtype)
        out[n] = rounded[id(projector)]
    return out


def storage_dtypes(model: LoadedModel, quant: QuantConfig) -> set[torch.dtype]:
    """The dtypes ``model`` stores its quantized weights in: what decides ``"auto"`` state
    precision (:meth:`MansuConfig.for_storage`)."""
    state = model.state()
    return {state[n].dtype for n in model.adapter.quantizable(quant)}


def compact_working_models(model: LoadedModel, quant: QuantConfig, names: list[str], beside: int = 0) -> bool:
    """Whether MANSU's two working models hold what they can compactly: the model at Q(w+Δ) every
    quantized weight as codes (:func:`quantized_working_copy`), the model at w+Δ each written
    weight as base + delta computed in its module's forward (:func:`summed_at_forward`).

    Above :data:`MANY_CANDIDATES_WEIGHTS` candidate weights; or when the quantized weights outside
    the candidate tensors ``names``, as tensors, weigh more than :data:`COMPACT_QWORK_BYTES`, or
    more than the model's working budget (:meth:`~workbench.models.loaded.LoadedModel.working_budget_bytes`)
    leaves beside ``beside`` bytes: one gradient step's (:attr:`GradientMemory.step_bytes`), as
    the copies are held through every step of the run. Then the candidate tensors' copies, 8 bytes
    per float32 weight between the two models, are not kept either (SmolLM2's default circuit:
    ~90 MiB). The same logits and gradients either way (tested); a forward on codes took 1.7× as
    long on the 1B bench model in bfloat16, a few % longer on SmolLM2 in float32."""
    if many_candidates(model.state(), names):
        return True
    others = model.quantized_bytes(quant, excluding=names)
    return others > min(COMPACT_QWORK_BYTES, model.working_budget_bytes() - beside)


def quantized_working_copy(model: LoadedModel, quant: QuantConfig, compact: bool) -> torch.nn.Module:
    """The model at Q(w): every quantized weight as codes when ``compact``
    (:func:`compact_working_models`; rounds write new codes:
    :func:`~workbench.quant.compact.write_quantized`), as tensors otherwise."""
    if compact:
        return compact_quantized_copy(model.hf, quant, materialized=())
    return quantized_copy(model.hf, quant)


def summed_at_forward(work: torch.nn.Module, names: list[str], compact: bool) -> frozenset[str]:
    """The candidate tensors that ``work`` computes as w+Δ in their module's forward once a round
    writes them (:class:`~workbench.models.update.SumAtForward`), rather than holding a copy:
    when ``compact`` (:func:`compact_working_models`), every weight read by one Linear/Conv1D
    alone. The copy would cost 4 bytes per written float32 weight next to the delta MANSU keeps;
    the sum costs one addition per module per forward and gives the same tensor."""
    if not compact:
        return frozenset()
    return frozenset(single_use_linear_owners(work, names))


@dataclass(frozen=True)
class GradientMemory:
    """What one of MANSU's gradient chunks would save for its backward, against the working
    budget; over it, the gradients recompute the blocks in their backward
    (:func:`~workbench.models.recompute.blocks_recomputed`: the same gradients, one more forward
    per backward)."""

    saved: int  # bytes, :data:`GRADIENT_CHUNK` facts as long as the longest (estimated from one)
    budget: int  # bytes: :meth:`LoadedModel.working_budget_bytes` (as an attribution pass's)
    per_fact: int  # bytes one fact as long as the longest holds (the most over the batches)
    chunk_facts: int  # the facts of the chunk that would save ``saved`` (fewer in a small batch)

    @property
    def recompute(self) -> bool:
        return self.saved > self.budget

    @property
    def step_bytes(self) -> int:
        """What one gradient chunk holds beside the model: its saved activations, or, recomputing
        the blocks, the budget its passes are sized to."""
        return min(self.saved, self.budget)

    def facts_per_pass(self) -> int:
        """Facts per backward for a pass that cannot recompute its blocks (the Fisher's per-example
        gradients read every candidate module's input and output gradient): :data:`GRADIENT_CHUNK`,
        or as many facts as the budget holds when a chunk would hold more than it (at least one)."""
        if not self.recompute:
            return GRADIENT_CHUNK
        return max(1, min(GRADIENT_CHUNK, self.budget // self.per_fact))

    def fisher_message(self) -> str:
        n = self.facts_per_pass()
        return (f"retain Fisher {n} fact{'s' if n != 1 else ''} per pass: {self.chunk_facts} would save "
                f"{self.saved / 2**20:,.0f} MiB, over the {self.budget / 2**20:,.0f} MiB budget")

    def message(self) -> str:
        # first what and why, short enough for a progress bar; "same numbers" for the worried
        return (f"gradients recompute the blocks: {self.chunk_facts} facts would save {self.saved / 2**20:,.0f} MiB, "
                f"over the {self.budget / 2**20:,.0f} MiB budget (same numbers, one more forward)")


def gradient_memory(model: LoadedModel, work: torch.nn.Module, names: list[str],
                    batches: tuple[FactBatch, ...], extra_per_fact: int = 0) -> GradientMemory:
    """:class:`GradientMemory` of gradients over ``batches`` w.r.t. the candidate tensors ``names``:
    per batch, one forward of its longest fact with those tensors taking a gradient, as the
    rounds' gradients do (:func:`~workbench.models.recompute.saved_bytes`), plus
    ``extra_per_fact`` (what a fact holds besides: the Fisher's per-example gradient), times the
    facts of a chunk (:data:`GRADIENT_CHUNK`, or the batch's size if smaller); the most over the
    batches. The budget: :meth:`LoadedModel.working_budget_bytes`."""
    most = most_per_fact = 0
    facts = GRADIENT_CHUNK
    with taking_grad(work, names):
        for batch in batches:
            if len(batch) == 0:
                continue
            per_fact = saved_bytes(work, functools.partial(span_logits, work, batch.longest())) + extra_per_fact
            if min(len(batch), GRADIENT_CHUNK) * per_fact > most:
                facts = min(len(batch), GRADIENT_CHUNK)
                most = facts * per_fact
            most_per_fact = max(most_per_fact, per_fact)
    return GradientMemory(most, model.working_budget_bytes(), most_per_fact, facts)


@contextlib.contextmanager
def taking_grad(work: torch.nn.Module, names: list[str]) -> Iterator[None]:
    """The parameters ``names`` of ``work`` (a frozen working copy) take a gradient inside the
    ``with``; frozen again and their ``.grad`` dropped on exit."""
    params = [work.get_parameter(n) for n in names]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def _setup_memo(what: str, model: LoadedModel, work: torch.nn.Module, names: list[str], settings: tuple[object, ...],
                entries: int, compute: Callable[[], dict[str, T]]) -> dict[str, T]:
    """``compute()``, kept for the next run with the same model, device, tensors and ``settings``
    (the latest circuit's only, and only up to :data:`SETUP_MEMO_ENTRIES`)."""
    if entries > SETUP_MEMO_ENTRIES:
        return compute()
    device = str(work.get_parameter(names[0]).device)
    return latest_memo(f"mansu-{what}", (model.fingerprint, device, tuple(names), *settings), compute)


def _digest(batch: FactBatch) -> str:
    """The batch's tokens, answers and masks, hashed (part of :func:`_setup_memo`'s key)."""
    h = hashlib.sha256()
    for t in (batch.ids, batch.last, batch.targets, batch.mask):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def setup_state(model: LoadedModel, batches: Batches, circuit: tuple[Component, ...] | None, quant: QuantConfig,
                config: MansuConfig, report: Progress) -> MansuState:
    """Candidates, grids, projectors, Fisher, the two working models and the guard's baseline."""
    config = config.for_storage(storage_dtypes(model, quant))  # "auto" decided for this model
    steps = config.code_steps if config.code_choice == "fixed" else config.max_code_steps
    if config.steps_on_grid and steps >= quant.n_codes:
        raise WorkbenchError(f"code_steps {steps} moves past every code of the {quant.n_codes}-code {quant.label} "
                             f"quantizer; use at most {quant.n_codes - 1}")
    masks = candidate_masks(model, circuit, quant, config)
    names = masks.names()
    work = sharing_copy(model.hf).eval()  # its tensors get their own storage when first written
    # Conv1D (GPT-2) weights are [in, out]: the model's adapter says which ones are.
    transposed_names = model.adapter.transposed
    conv1d = {n: n in transposed_names for n in names}

    report(0.02, "quantization grid of the moved modules")
    base = model.state()
    transposed = dict(conv1d)
    grids = GridStore(base, names, quant, transposed)

    retain_sample = batches.retain.sample(config.retain_batch, torch.Generator().manual_seed(0))
    projectors: dict[str, HeldProjector] = {}
    if config.use_projection:
        report(0.05, "retain activations → null-space projectors")
        projectors = null_space_projectors(model, work, names, retain_sample, config)
    fisher: dict[str, torch.Tensor] = {}
    if config.use_fisher:
        # the projectors' (and the guard's setup) transients handed back: at a 128 MiB budget on
        # SmolLM2 the Fisher's passes peaked with 529 MiB in use and 815 MiB freed, still resident
        hand_back_freed_memory()
        # Its per-example gradients cannot recompute blocks (they read each module's input and
        # output gradient), so long facts take fewer per pass instead.
        fisher_memory = gradient_memory(model, work, names, (fisher_rows(batches.retain, config.fisher_samples),),
                                        per_example_bytes(work, names))
        report(0.1, fisher_memory.fisher_message() if fisher_memory.recompute else "retain Fisher")
        fisher = retain_fisher(model, work, names, batches.retain, config.fisher_samples,
                               "storage" if config.state_in_storage_dtype else "float32",
                               fisher_memory.facts_per_pass())

    memory = gradient_memory(model, work, names, (retain_sample, batches.forget))
    compact = compact_working_models(model, quant, names, beside=memory.step_bytes)
    qwork = quantized_working_copy(model, quant, compact)
    if memory.recompute:
        report(0.12, memory.message())
    n_candidates = int(sum(int(masks[n].sum()) for n in names))  # each all-true mask only for its count
    per_round, max_per_round = round_sizes(n_candidates, config)
    # The guard's retain sample differs from the projector's, so the guard stays an independent check.
    guard_batch = batches.retain_sample()
    # Rounds write only the weights they move (apply_round tells the caches): the blocks before
    # the first one written are the base's (Q(w)'s), so each batch runs them once.
    answers, q_answers = PrefixCache(work, model.adapter), PrefixCache(qwork, model.adapter)
    return MansuState(
        names=names, masks=masks, base=base, grids=grids, transposed=transposed, conv1d=conv1d, work=work,
        qwork=qwork, answers=answers, q_answers=q_answers, retain_sample=retain_sample, guard_batch=guard_batch,
        guard_base=guard_batch.accuracy(answers),
        guard_base_q=guard_batch.accuracy(q_answers) if config.guard_precision == "both" else None,
        n_candidates=n_candidates, per_round=per_round, max_per_round=max_per_round,
        storage_state=config.state_in_storage_dtype, working_budget=model.working_budget_bytes(),
        # float32 whatever the storage dtype: updates accumulate there (rounded only when written)
        deltas=SparseDeltas(base),
        # Which forget facts each model still answers: the forget gradient only runs over those
        # (forgotten facts contribute nothing to it), and each round's evaluation refreshes them.
        still=batches.forget_answered(answers),
        q_still=batches.forget_answered(q_answers) if config.forget_direction != "full_precision" else None,
        projectors=projectors, fisher=fisher, summed=summed_at_forward(work, names, compact),
        recompute_blocks_of=model.adapter if memory.recompute else None,
    )
