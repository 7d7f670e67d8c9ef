"""MANSU's switches and budgets: :class:`MansuConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from workbench.core.errors import WorkbenchError


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
            quantized base is a different starting point (docs/SCIENCE.md: the PTQ gap is
            mostly this "base shift"), so the quantized model is steered explicitly.
        code_steps: codes moved per weight (floor rule).
        no_floor_step: sub-bin step (in bin widths) when the floor is off.
        retain_batch: retain examples for the projector's activations (all if larger).
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
    quantized_direction: bool = True
    code_steps: int = 2
    no_floor_step: float = 0.2
    retain_batch: int = 256
    reuse_gradients: bool = True

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
