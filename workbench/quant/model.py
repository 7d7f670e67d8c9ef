"""Fake-quantized copies of whole states and models.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

import torch
from torch import Tensor, nn

from workbench.core.errors import WorkbenchError
from workbench.core.progress import Progress, each
from workbench.core.sharing import sharing_copy
from workbench.quant.bnb import _check_weight
from workbench.quant.codes import _qdq
from workbench.quant.config import QuantConfig, _check_config
from workbench.quant.parameters import _check_names, _check_transposed, quantizable_parameters, transposed_parameters


def fake_quantize_state(
    state: Mapping[str, Tensor],
    names: Iterable[str],
    cfg: QuantConfig,
    *,
    transposed: Collection[str] = (),
    progress: Progress | None = None,
) -> dict[str, Tensor]:
    """A new state dict whose ``names`` entries are fake-quantized.

    Other entries are the input's own tensor objects (not copies: do not modify them in
    place). The input dict and its tensors are never modified.

    Args:
        state: parameter name -> tensor.
        names: entries to quantize (e.g. :func:`quantizable_parameters`).
        cfg: the quantizer.
        transposed: names whose blocks run along ``w.T`` (:func:`transposed_parameters`);
            names not in ``names`` are ignored.
        progress: optional ``(fraction, message)`` callback; otherwise a tqdm bar.
    """
    cfg = _check_config(cfg)
    names = _check_names(state, names)
    tr = _check_transposed(transposed)
    out = dict(state)
    for name in each(names, f"{cfg.label} fake-quant", progress, unit="param"):
        w = _check_weight(state[name], f"parameter {name!r}")
        out[name] = _qdq(w, cfg, name in tr)
    return out


def fake_quantize_model(
    model: nn.Module, cfg: QuantConfig, *, progress: Progress | None = None
) -> nn.Module:
    """A copy of ``model`` whose :func:`quantizable_parameters` are fake-quantized.

    Conv1D weights are quantized transposed, like transformers' bnb loader. ``model`` is
    not modified. Only the quantized weights are new tensors: the others (embeddings,
    norms, biases) share ``model``'s storage (:func:`~workbench.core.sharing.sharing_copy`),
    so the copy is read-only. ``progress``: optional ``(fraction, message)`` callback, else a tqdm bar.
    """
    if not isinstance(model, nn.Module):
        raise WorkbenchError(f"expected a torch.nn.Module, got {type(model).__name__}")
    cfg = _check_config(cfg)
    copy = sharing_copy(model)
    names = quantizable_parameters(copy, cfg)
    tr = transposed_parameters(copy)
    with torch.no_grad():
        for name in each(names, f"{cfg.label} fake-quant", progress, unit="param"):
            p = copy.get_parameter(name)
            w = _check_weight(p.detach(), f"parameter {name!r}")
            p.data = _qdq(w, cfg, name in tr).to(p.dtype)
    return copy


def quantized_copy(model: nn.Module, cfg: QuantConfig, *, progress: Progress | None = None) -> nn.Module:
    """A frozen, eval-mode copy of ``model`` with its quantizable weights fake-quantized.

    The one way the workbench builds a quantized model to evaluate or differentiate through
    (``model`` itself is not modified); ``progress`` as in :func:`fake_quantize_model`.
    """
    copy = fake_quantize_model(model, cfg, progress=progress)
    for p in copy.parameters():
        p.requires_grad_(False)
    return copy.eval()
