"""RMU — Representation Misdirection for Unlearning (Li et al., WMDP, 2024), docs/SCIENCE.md §4.

At one residual-stream layer ``L`` the trained model's activations on forget prompts are
pushed toward a fixed control vector ``c·u`` (``u`` a random unit vector, drawn once from a
seeded generator), while its activations on retain prompts are held at the frozen base's:

    loss = mean_real ‖h_L(x_f) − c·u‖² / d  +  α · mean_real ‖h_L(x_r) − h⁰_L(x_r)‖² / d

(:func:`workbench.unlearning.losses.rmu_forget` / ``rmu_retain``; "real" = non-padding
tokens, ``h⁰`` the frozen base). Activations are read as the Hugging Face body's
``output_hidden_states`` — ``hidden_states[L + 1]`` is the output of block ``L`` — so no hook
is ever attached to the base model, which stays untouched. Only blocks ``0..L`` can affect
``h_L``; their quantized weights are what RMU trains (the original trains the MLPs of
layers ``L-2..L``; here every quantized weight upstream of the steered layer may move).

Scale. The original uses ``c`` = 6.5 … 300 and ``α`` = 1200 on 7B models whose residual
norms differ from ours by orders of magnitude, so ``c`` is given relative to the base's
mean per-token residual norm on forget prompts at ``L`` (``steering_scale``): one default
then works for facts-tiny and SmolLM2 alike. The last block is never the default layer:
Hugging Face applies the final norm to the last hidden state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from workbench.core.checks import Range, check_config
from workbench.core.errors import WorkbenchError
from workbench.models.loaded import LoadedModel
from workbench.models.scoring import FactBatch, uncached
from workbench.unlearning import losses
from workbench.unlearning.loop import DeclaredObjective, run_gradient_method, trainable_names
from workbench.unlearning.result import UnlearningResult
from workbench.unlearning.task import UnlearningTask

_BLOCK_RE = re.compile(r"\.(?:h|layers)\.(\d+)\.")


@dataclass(frozen=True)
class RmuConfig:
    """RMU's hyper-parameters.

    Attributes:
        layer: block whose output is steered (0-based); ``None`` = the middle block
            ``(n_layers - 1) // 2``. Must not be the last block.
        steering_scale: ``c`` = this × the base's mean per-token residual norm at ``layer``
            on forget prompts.
        alpha: weight of the retain term.
        seed: seeds the random direction ``u``.
    """

    layer: int | None = None
    steering_scale: float = 4.0
    alpha: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_config(self, {"layer": Range(0, 10_000, integer=True, optional=True),
                            "steering_scale": Range(0, 10**6, low_open=True), "alpha": Range(0, 10**6),
                            "seed": Range(0, 2**63 - 1, integer=True)})


def rmu_layer(model: LoadedModel, config: RmuConfig) -> int:
    """The steered block, validated against the model's depth."""
    layer = (model.n_layers - 1) // 2 if config.layer is None else config.layer
    if not 0 <= layer < model.n_layers - 1:
        raise WorkbenchError(
            f"RMU layer {layer} is out of range for a {model.n_layers}-layer model: choose 0..{model.n_layers - 2} "
            "(the last block's hidden state carries the final norm)"
        )
    return layer


def hidden_at(module: torch.nn.Module, batch: FactBatch, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([n, seq, d]`` output of block ``layer``, ``[n, seq]`` real-token mask)."""
    body = getattr(module, "base_model", module)
    out = body(batch.ids, output_hidden_states=True, **uncached(body))
    acts = out.hidden_states[layer + 1]
    mask = torch.arange(batch.ids.shape[1], device=batch.last.device)[None, :] <= batch.last[:, None]
    return acts, mask


def control_vector(d: int, norm: float, seed: int) -> torch.Tensor:
    """``c·u``: a seeded random direction (uniform entries in [0, 1), as in the RMU code) scaled to ``norm``."""
    u = torch.rand(d, generator=torch.Generator().manual_seed(seed))
    return u / u.norm() * norm


def blocks_upto(names: list[str], layer: int) -> list[str]:
    """Names inside blocks ``0..layer`` (others cannot change the steered activations)."""
    out = []
    for n in names:
        m = _BLOCK_RE.search("." + n)
        if m is not None and int(m.group(1)) <= layer:
            out.append(n)
    return out


def rmu(task: UnlearningTask, config: RmuConfig | None = None) -> UnlearningResult:
    """Run RMU through the shared loop (same stopping rule as every gradient method)."""
    config = config or RmuConfig()
    model, batches, optim = task.model, task.batches, task.optim
    layer = rmu_layer(model, config)
    names = blocks_upto(trainable_names(model, optim.trainable), layer)
    if not names:
        raise WorkbenchError(f"RMU: no trainable weight in blocks 0..{layer}")
    with torch.no_grad():
        acts, mask = hidden_at(model.hf, batches.forget, layer)
        mean_norm = float(acts[mask].norm(dim=-1).mean())
    coeff = config.steering_scale * mean_norm
    control = control_vector(acts.shape[-1], coeff, config.seed)

    def objective(work: torch.nn.Module, fb: FactBatch, _ref_f: torch.Tensor | None, rb: FactBatch,
                  _ref_r: torch.Tensor | None) -> torch.Tensor:
        f_acts, f_mask = hidden_at(work, fb, layer)
        loss = losses.rmu_forget(f_acts, f_mask, control)
        if config.alpha > 0:
            r_acts, r_mask = hidden_at(work, rb, layer)
            with torch.no_grad():
                frozen, _ = hidden_at(model.hf, rb, layer)
            loss = loss + config.alpha * losses.rmu_retain(r_acts, frozen, r_mask)
        return loss

    declared = DeclaredObjective(objective, forget_reference=False, retain_reference=False)
    result = run_gradient_method(task, declared, method="rmu", names=names)
    result.diagnostics.update({"layer": layer, "steering_coeff": coeff, "base_forget_norm": mean_norm,
                               "config": config.__dict__})
    return result
