"""MANSU's switches and budgets: :class:`MansuConfig`."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch

from workbench.core.checks import Range, check_config
from workbench.core.errors import WorkbenchError

ForgetDirection = Literal["average", "full_precision", "quantized"]
"""Where a round takes the forget gradient: averaged over w+Δ and Q(w+Δ), or at one of them."""
FloorMode = Literal["each_round", "snap"]
"""The floor applied to every move of every round, or once, as a final snap after sub-bin rounds."""
CodeChoice = Literal["fixed", "best"]
"""Move every weight ``code_steps`` codes, or each by the 1..``max_code_steps`` codes that gain most per cost."""
GuardPrecision = Literal["full_precision", "both"]
"""The retain guard watches full-precision retain, or the larger of the fp and quantized drops."""
StatePrecision = Literal["auto", "float32", "storage"]
"""MANSU's per-candidate-weight state in float32, in the weights' storage dtype, or (``"auto"``)
in the storage dtype when that is 16-bit and float32 otherwise (see
:attr:`MansuConfig.state_precision`)."""


# The numeric settings' ranges; the upper bounds keep a typo from running for days.
_RANGES = {
    "params_per_round": Range(1, 10**8, integer=True, optional=True),
    "round_fraction": Range(0, 1, low_open=True),
    "retain_guard": Range(0, 1, optional=True),
    "max_rounds": Range(1, 10_000, integer=True),
    "forget_target": Range(0, 1),
    "null_threshold": Range(0, 1, low_open=True),
    "min_null_fraction": Range(0, 1),
    "fisher_budget": Range(0, 10**6, low_open=True, optional=True),
    "fisher_samples": Range(1, 100_000, integer=True),
    "fisher_damping": Range(0, 10**6),
    "max_round_growth": Range(1, 1000),
    "guard_patience": Range(1, 10_000, integer=True),
    "code_steps": Range(1, 255, integer=True),
    "no_floor_step": Range(0, 10, low_open=True),
    "retain_batch": Range(1, 100_000, integer=True),
    "snap_fraction": Range(0, 1.5, low_open=True),
    "max_code_steps": Range(1, 255, integer=True),
}


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
            to ``max_round_growth`` × the initial size. The Fisher bound is second-order and
            underestimates the damage of
            bin-sized moves (measured on SmolLM2: bound 0.03 nats, real retain KL 4.5), so
            the guard measures instead of trusting it. ``None`` switches it off.
        guard_patience: stop after this many rounds undone at the smallest round size,
            counted over the whole run. Not consecutively: on SmolLM2 passing and undone
            rounds alternate (each pass lets the round grow, the next is undone), and a
            consecutive count never stopped a run that made almost no progress.
        max_rounds: round budget.
        forget_target: stop when fp and quantized forget top-1 are both <= this (on a
            multiple-choice forget set: MC accuracy, and never below its chance level).
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
        code_steps: codes moved per weight (floor rule).
        no_floor_step: sub-bin step (in bin widths) when the floor is off.
        retain_batch: retain examples for the projector's activations (all if larger).
        name: the variant's name, shown in tables as ``mansu-<name>`` (empty: today's reading).
        forget_direction: see :data:`ForgetDirection`. Today's reading averages the gradients
            at ``w+Δ`` and at the deployed ``Q(w+Δ)``: MANSU's moves survive rounding by
            construction, but the quantized base is a different starting point
            (docs/SCIENCE.md §6: the PTQ gap is mostly this "base shift"), so the quantized
            model is steered explicitly.
        floor_mode: see :data:`FloorMode`. With ``"snap"`` the rounds take sub-bin steps (as
            without the floor); at the end every moved weight whose change reaches
            ``snap_fraction`` of its bin is set onto the neighbouring code in the direction of
            its change, and the smaller moves are dropped.
        snap_fraction: see ``floor_mode``.
        code_choice: see :data:`CodeChoice`; ``max_code_steps`` bounds ``"best"``.
        guard_precision: see :data:`GuardPrecision`.
        state_precision: see :data:`StatePrecision`. ``"float32"``: the retain Fisher, the averaged
            forget direction and the null-space projectors are held in float32 and the damping is
            the mean of one buffer holding every cost with a gain. ``"storage"``: the Fisher, the
            averaged direction and the projectors are rounded to the weights' storage dtype once
            computed (half their bytes for a 16-bit model), widened to float32 one tensor at a
            time where used, and the damping's mean is summed tensor by tensor in float64 instead
            of over that buffer (4 bytes per scored weight with a gain): the costs, directions and
            projections lose their bits below the storage dtype's precision, so a run's moves may
            differ. ``"auto"`` (the default) is ``"storage"`` for a model whose quantized weights
            are stored in 16 bits and ``"float32"`` otherwise (:meth:`for_storage`), so every
            float32 model runs as before; docs/results/smollm2_bf16.md holds the held-out check
            that decided it (16-bit state lost no report-card pass on three sets) and
            docs/results/bench.md what it saves. The deltas accumulate in float32 either way.
        reuse_gradients: after an undone round the weights are restored exactly, so the next
            round reuses that round's gradients instead of recomputing them (switch off only to
            check that it changes nothing).
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
    code_steps: int = 2
    no_floor_step: float = 0.2
    retain_batch: int = 256
    reuse_gradients: bool = True
    name: str = ""
    forget_direction: ForgetDirection = "average"
    floor_mode: FloorMode = "each_round"
    snap_fraction: float = 0.5
    code_choice: CodeChoice = "fixed"
    max_code_steps: int = 3
    guard_precision: GuardPrecision = "full_precision"
    state_precision: StatePrecision = "auto"

    def __post_init__(self) -> None:
        check_config(self, _RANGES)
        if self.null_threshold >= 1.0:
            raise WorkbenchError(f"MansuConfig.null_threshold must be below 1, got {self.null_threshold}")
        for field, allowed in (("forget_direction", ForgetDirection), ("floor_mode", FloorMode),
                               ("code_choice", CodeChoice), ("guard_precision", GuardPrecision),
                               ("state_precision", StatePrecision)):
            if getattr(self, field) not in get_args(allowed):
                raise WorkbenchError(f"{field} must be one of {', '.join(get_args(allowed))}, "
                                     f"got {getattr(self, field)!r}")

    @property
    def steps_on_grid(self) -> bool:
        """Every round's moves land on code values (the floor each round)."""
        return self.use_floor and self.floor_mode == "each_round"

    @property
    def snaps(self) -> bool:
        """The floor is one final snap after sub-bin rounds."""
        return self.use_floor and self.floor_mode == "snap"

    def for_storage(self, storage_dtypes: Collection[torch.dtype]) -> MansuConfig:
        """This configuration with ``"auto"`` state precision decided for weights stored in
        ``storage_dtypes`` (the model's quantized weights): ``"storage"`` when every one is a
        16-bit float, ``"float32"`` otherwise (a float32 model keeps its float32 state exactly).
        An explicit ``"float32"`` or ``"storage"`` is kept."""
        if self.state_precision != "auto":
            return self
        sixteen_bit = bool(storage_dtypes) and all(d.is_floating_point and d.itemsize == 2 for d in storage_dtypes)
        return replace(self, state_precision="storage" if sixteen_bit else "float32")

    @property
    def state_in_storage_dtype(self) -> bool:
        """Whether the Fisher, averaged direction and projectors are held in the storage dtype
        (``"storage"``). ``"auto"`` is decided per model first (:meth:`for_storage`; :func:`mansu`
        does it), so a step of the method never guesses it."""
        if self.state_precision == "auto":
            raise WorkbenchError("MansuConfig.state_precision 'auto' depends on the model's storage dtype: "
                                 "decide it with config.for_storage(...) first (mansu() does)")
        return self.state_precision == "storage"

    @property
    def label(self) -> str:
        off = [n for n, on in (("circuit", self.use_circuit), ("projection", self.use_projection),
                               ("fisher", self.use_fisher), ("floor", self.use_floor)) if not on]
        # a run with 16-bit state is another run's numbers: tables must tell the two apart
        state = "-state_storage" if self.state_precision == "storage" else ""
        return "mansu" + (f"-{self.name}" if self.name else "") + "".join(f"-no_{n}" for n in off) + state


def is_mansu_method(name: str) -> bool:
    """Whether a run's method name is MANSU, one of its readings or one of its ablations
    (:attr:`MansuConfig.label`: ``mansu``, ``mansu-snap``, ``mansu-no_floor``, ...)."""
    return name == "mansu" or name.startswith("mansu-")


MANSU_VARIANTS: dict[str, MansuConfig] = {
    "v1": MansuConfig(),
    "snap": MansuConfig(name="snap", floor_mode="snap", snap_fraction=0.5),
    "one_code": MansuConfig(name="one_code", code_steps=1, round_fraction=0.004),
    "guard_both": MansuConfig(name="guard_both", guard_precision="both", retain_guard=0.035),
    "q_direction": MansuConfig(name="q_direction", forget_direction="quantized"),
    "best_step": MansuConfig(name="best_step", code_choice="best"),
    # Added before the freeze (docs/results/mansu_study.md): q_direction forgot on SmolLM2 but
    # broke NF4 retain, which the full-precision guard does not watch; guard_both watches it.
    "q_guard": MansuConfig(name="q_guard", forget_direction="quantized", guard_precision="both",
                           retain_guard=0.035),
}
"""The readings of MANSU compared in docs/results/mansu_study.md, by name (``v1``: today's)."""
