"""(b) Null-space projection: forget directions that leave retain outputs unchanged to first order.

With ``C = K_R K_Rᵀ`` (``K_R`` = a linear map's retain-set inputs, ``[d_in, n_tokens]``) and
``U₀`` the eigenvectors whose eigenvalue is at most ``null_threshold · λ_max``,
``P = U₀ U₀ᵀ`` and ``D ← D P`` (``P D`` for GPT-2's Conv1D, whose weight is ``[in, out]``),
so ``D K_R ≈ 0``. Modules that read one tensor (a fused ``c_attn``, Llama's q/k/v, gate/up)
share one projector.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from workbench.core.errors import WorkbenchError
from workbench.models.scoring import FactBatch
from workbench.models.update import Update


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


def linear_inputs(work: torch.nn.Module, names: Iterable[str], batch: FactBatch) -> dict[str, torch.Tensor]:
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


def project_update(delta: torch.Tensor, projector: torch.Tensor, *, conv1d: bool) -> torch.Tensor:
    """Project a weight change so that it leaves retain outputs unchanged to first order.

    ``nn.Linear`` weights are ``[out, in]`` (y = W x): ``ΔW P``. GPT-2 ``Conv1D`` weights are
    ``[in, out]`` (y = x W): ``P ΔW``.
    """
    return projector @ delta if conv1d else delta @ projector


def projectors_for(work: torch.nn.Module, names: list[str], batch: FactBatch, threshold: float,
                   min_fraction: float) -> dict[str, torch.Tensor]:
    """One projector per weight in ``names``, computed once per distinct input tensor."""
    inputs = linear_inputs(work, names, batch)
    cache: dict[int, torch.Tensor] = {}
    out = {}
    for n in names:
        key = id(inputs[n])
        if key not in cache:
            cache[key] = null_space_projector(inputs[n], threshold, min_fraction)
        out[n] = cache[key]
    return out


def retain_output_change(work: torch.nn.Module, update: Update, conv1d: dict[str, bool], batch: FactBatch) -> float:
    """‖ΔW K_R‖ / (‖ΔW‖·‖K_R‖) summed over modules: how far the final sparse edit is from the null space."""
    if update.is_empty():
        return 0.0
    inputs = linear_inputs(work, list(update.deltas), batch)
    num = den = 0.0
    for n, d in update.deltas.items():
        k = inputs[n].float()  # activations in the storage dtype, deltas in float32
        out = k @ d if conv1d.get(n) else k @ d.T
        num += float(out.norm())
        den += float(d.norm() * k.norm())
    return num / den if den else 0.0
