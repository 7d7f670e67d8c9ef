"""(b) Null-space projection: forget directions that leave retain outputs unchanged to first order.

With ``C = K_R K_Rᵀ`` (``K_R`` = a linear map's retain-set inputs, ``[d_in, n_tokens]``) and
``U₀`` the eigenvectors whose eigenvalue is at most ``null_threshold · λ_max``,
``P = U₀ U₀ᵀ`` and ``D ← D P`` (``P D`` for GPT-2's Conv1D, whose weight is ``[in, out]``),
so ``D K_R ≈ 0``. Modules that read one tensor (a fused ``c_attn``, Llama's q/k/v, gate/up)
share one projector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch

from workbench.core.errors import WorkbenchError
from workbench.models.scoring import FactBatch, uncached
from workbench.models.update import Update

T = TypeVar("T")


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
    n_null = max(n_null, round(min_fraction * d))
    basis = evecs[:, :n_null]
    return (basis @ basis.T).float()


@dataclass(frozen=True, eq=False)  # holds a tensor: no elementwise ==
class HeldProjector:
    """A ``[d, d]`` projector as MANSU holds it between uses: its upper triangle (row by row,
    diagonal included) when the matrix is symmetric bit for bit, else the whole matrix.

    ``P = U₀ U₀ᵀ`` is symmetric, and the float64 product rounded to float32 has come out
    symmetric bit for bit on every input tried; each one is checked (:meth:`of`), so
    :meth:`matrix` gives back the very tensor :func:`null_space_projector` returned. Why:
    without a circuit the projectors of every decoder layer are held through every round
    (~0.4 GB on SmolLM2, ~1 GB for the scale bench's circuit); a triangle halves that."""

    stored: torch.Tensor  # [d (d + 1) / 2] when packed, else [d, d]
    size: int

    @classmethod
    def of(cls, projector: torch.Tensor) -> HeldProjector:
        if projector.ndim != 2 or projector.shape[0] != projector.shape[1]:
            raise WorkbenchError(f"a projector is square, got {tuple(projector.shape)}")
        if not torch.equal(projector, projector.T):
            return cls(projector, projector.shape[0])
        return cls(projector[_upper(projector.shape[0], projector.device)], projector.shape[0])

    @property
    def packed(self) -> bool:
        return self.stored.ndim == 1

    def matrix(self) -> torch.Tensor:
        """The ``[d, d]`` projector in float32 (a fresh tensor when packed or held in 16 bits):
        values placed and widened, no arithmetic."""
        if not self.packed:
            return self.stored.float()
        upper = _upper(self.size, self.stored.device)
        full = torch.zeros(self.size, self.size, dtype=torch.float32, device=self.stored.device)
        full.masked_scatter_(upper, self.stored.float())  # row-major, the order ``of`` read them in
        # the lower triangle mirrored in place, a block of rows at a time: row i's entries j < i
        # are the upper triangle's (j, i), which no block rewrites, so the matrix is the one
        # torch.where(upper, full, full.T) gave, without two more [d, d] tensors at once
        for start in range(0, self.size, MIRROR_ROWS):
            rows = slice(start, start + MIRROR_ROWS)
            full[rows] = torch.where(upper[rows], full[rows], full[:, rows].T)
        return full

    def rounded(self, dtype: torch.dtype) -> HeldProjector:
        """The same projector held in ``dtype`` (MANSU's ``state_precision="storage"``)."""
        return HeldProjector(self.stored.to(dtype), self.size)

    def trace(self) -> float:
        """``tr P``: the null space's dimension (P is idempotent)."""
        return float(torch.trace(self.matrix()))

    @property
    def nbytes(self) -> int:
        return self.stored.numel() * self.stored.element_size()


MIRROR_ROWS = 256
"""Rows of a packed projector mirrored at once (:meth:`HeldProjector.matrix`): a block's
temporary is ``MIRROR_ROWS × d`` floats (5.8 MB for a 5,632-wide input)."""


def _upper(d: int, device: torch.device) -> torch.Tensor:
    return torch.ones(d, d, dtype=torch.bool, device=device).triu_()


class _AllSeen(Exception):
    """Raised by the last input hook: the rest of the forward (the other blocks, the logits) is not needed."""


def visit_linear_inputs(work: torch.nn.Module, names: Iterable[str], batch: FactBatch,
                        visit: Callable[[str, torch.Tensor, torch.Tensor], None]) -> None:
    """``visit(module_name, x, real)`` as the forward reaches each module owning a weight in
    ``names``: ``x`` the module's input, ``real`` the ``[n, seq]`` mask of non-padding tokens
    (``x[real]`` is ``[n_real_tokens, d_in]``). The forward (no grad) stops once every owner ran,
    so a visitor that keeps only what it derives holds one input at a time."""
    modules = dict(work.named_modules())
    wanted = {n.rsplit(".", 1)[0] for n in names}
    seen: set[str] = set()
    positions = torch.arange(batch.ids.shape[1], device=batch.last.device)
    real = positions[None, :] <= batch.last[:, None]  # padding excluded
    handles = []
    for mod_name in wanted:
        def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], key: str = mod_name) -> None:
            visit(key, args[0], real)  # the very tensor: modules reading one input can tell
            seen.add(key)
            if len(seen) == len(wanted):
                raise _AllSeen
        handles.append(modules[mod_name].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            work(batch.ids, **uncached(work))
    except _AllSeen:
        pass
    finally:
        for h in handles:
            h.remove()


def each_linear_input(work: torch.nn.Module, names: Iterable[str], batch: FactBatch,
                      use: Callable[[torch.Tensor], T]) -> dict[str, T]:
    """``use(x)`` of the ``[n_real_tokens, d_in]`` input of each module owning a weight in
    ``names`` on ``batch``, one call per distinct input; the forward stops once every owner ran.

    Modules that read the same tensor one after the other (Llama's q/k/v, gate/up) share one
    call and its very result. Only the latest input is held, so memory is one input at a time
    (holding them all held every layer's activations: ~1 GB on SmolLM2 over every module).
    """
    names = list(names)
    done: dict[str, T] = {}
    latest: list[tuple[torch.Tensor, T]] = []  # the last input seen and its result

    def visit(key: str, x: torch.Tensor, real: torch.Tensor) -> None:
        if not latest or latest[0][0] is not x:
            latest[:] = [(x, use(x.detach()[real]))]
        done[key] = latest[0][1]

    visit_linear_inputs(work, names, batch, visit)
    return {n: done[n.rsplit(".", 1)[0]] for n in names}


def linear_inputs(work: torch.nn.Module, names: Iterable[str], batch: FactBatch) -> dict[str, torch.Tensor]:
    """``[n_real_tokens, d_in]`` inputs of the modules owning the weights ``names`` on ``batch``.

    Modules that read the same tensor (Llama's q/k/v projections, gate/up) get the very same
    returned tensor, so callers can compute one projector per distinct input. Every input is
    held at once: for inspection and the tests' references; MANSU itself streams them
    (:func:`projectors_for`, :func:`retain_output_change`), since over a whole model they were
    its memory peak.
    """
    return each_linear_input(work, names, batch, lambda x: x)


def project_update(delta: torch.Tensor, projector: torch.Tensor, *, conv1d: bool) -> torch.Tensor:
    """Project a weight change so that it leaves retain outputs unchanged to first order.

    ``nn.Linear`` weights are ``[out, in]`` (y = W x): ``ΔW P``. GPT-2 ``Conv1D`` weights are
    ``[in, out]`` (y = x W): ``P ΔW``.
    """
    return projector @ delta if conv1d else delta @ projector


def projectors_for(work: torch.nn.Module, names: list[str], batch: FactBatch, threshold: float,
                   min_fraction: float) -> dict[str, HeldProjector]:
    """One projector per weight in ``names``, computed once per distinct input tensor, as the
    forward reaches it (only the projectors are held, as triangles, not the inputs)."""
    return each_linear_input(work, names, batch,
                             lambda x: HeldProjector.of(null_space_projector(x, threshold, min_fraction)))


def retain_output_change(work: torch.nn.Module, update: Update, conv1d: dict[str, bool], batch: FactBatch) -> float:
    """‖ΔW K_R‖ / (‖ΔW‖·‖K_R‖) summed over modules: how far the final sparse edit is from the null space.

    Each module's terms are taken as the forward reaches its input, so one input is held at a
    time (holding every module's retain inputs was MANSU's memory peak on SmolLM2 without a
    circuit); they are summed in the update's order, as when all inputs were held."""
    if update.is_empty():
        return 0.0
    by_owner: dict[str, list[str]] = {}
    for n in update.deltas:
        by_owner.setdefault(n.rsplit(".", 1)[0], []).append(n)
    terms: dict[str, tuple[float, float]] = {}

    def visit(owner: str, x: torch.Tensor, real: torch.Tensor) -> None:
        k = x.detach()[real].float()  # activations in the storage dtype, deltas in float32
        for n in by_owner[owner]:
            d = update.deltas[n].to(k.device)  # an Update keeps its deltas on the CPU
            out = k @ d if conv1d.get(n) else k @ d.T
            terms[n] = (float(out.norm()), float(d.norm() * k.norm()))

    visit_linear_inputs(work, update.deltas, batch, visit)
    num = den = 0.0
    for n in update.deltas:
        num += terms[n][0]
        den += terms[n][1]
    return num / den if den else 0.0
