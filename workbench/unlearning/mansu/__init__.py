"""MANSU — Mechanistic-Aligned Null-Space Unlearning, as this workbench reads the paper.

The paper (Sadhu, Seth, Sankarapu, 2026) has no public code; this is our reading of its
abstract (docs/SCIENCE.md), every component switchable for ablations:

(a) **circuit restriction** — only weights of circuit components may move
    (:func:`workbench.interpretability.parameters.circuit_parameters`); among them the moved ones are chosen by
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

The package follows those steps: :mod:`.config` (the switches), :mod:`.state` (setup, and
what rounds change), :mod:`.projection` (b), :mod:`.fisher` (c), :mod:`.grid` (d),
:mod:`.candidates` (gradients, scores, ranking), :mod:`.rounds` (budget, floor check,
apply/undo, retain guard) and :mod:`.method` (the loop).
"""

from __future__ import annotations

from workbench.unlearning.mansu.config import MansuConfig, is_mansu_method
from workbench.unlearning.mansu.method import MansuDiagnostics, mansu

__all__ = ["MansuConfig", "MansuDiagnostics", "is_mansu_method", "mansu"]
