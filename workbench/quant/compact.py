"""A quantized copy that keeps most of its quantized weights as codes (issue 17).

:func:`~workbench.quant.model.quantized_copy` holds every fake-quantized weight as a tensor of
the model's dtype: a second model. MANSU's copy at Q(w+Δ) writes only its candidate tensors, so
:func:`compact_quantized_copy` keeps those as tensors and every other quantized Linear/Conv1D
weight as its codes (4-bit codes two per byte, 8-bit one per byte) and block scales, and
dequantizes a weight only while its module's forward runs. Dequantizing the same codes gives the
same tensor every time (the formula of :func:`~workbench.quant.codes.quantize_dequantize`), so
forwards, logits and gradients are bit-identical to the full copy's (tested); the price is one
dequantization per module per forward.

The dequantization runs inside the module's forward (:mod:`workbench.core.computed_weight`:
a weight held so is recomputed for the backward, not saved, and can take a gradient through a
placeholder parameter, bit for bit the tensor's).
:func:`write_quantized` gives a weight a new quantized value, as codes where it is held as codes:
MANSU without a circuit holds its whole model at Q(w+Δ) as codes, the weights it moves too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping

import torch
from torch import Tensor, nn

from workbench.core.computed_weight import WeightAtForward, install, installed
from workbench.core.errors import WorkbenchError
from workbench.core.sharing import sharing_copy
from workbench.quant.codes import QuantizedWeight, quantize_codes, quantize_dequantize
from workbench.quant.config import QuantConfig, _check_config
from workbench.quant.parameters import quantizable_parameters, single_use_linear_owners, transposed_parameters


def pack_codes(codes: Tensor, n_codes: int) -> Tensor:
    """4-bit codes two per byte (the earlier weight in the high nibble, as bnb packs them; an odd
    count padded with a 0 nibble); 8-bit codes as they are."""
    if n_codes > 16:
        return codes
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] << 4) | flat[1::2]


def unpack_codes(packed: Tensor, n_codes: int, numel: int) -> Tensor:
    """:func:`pack_codes` undone: ``numel`` uint8 codes."""
    if n_codes > 16:
        return packed
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:numel]


class CodesAtForward(WeightAtForward):
    """A weight held as its codes and block scales, dequantized by each forward of its module
    (:func:`~workbench.core.computed_weight.install`)."""

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__(weight.shape, weight.dtype, weight.codes.device)
        self.hold(weight)

    def hold(self, weight: QuantizedWeight) -> None:
        """Hold ``weight``'s codes and scales (a new value of the same weight)."""
        if weight.shape.numel() != self.shape.numel():
            raise WorkbenchError(f"codes for {weight.shape.numel()} weights, the module has {self.shape.numel()}")
        self.packed = pack_codes(weight.codes, weight.code_table.numel())
        self.weight = dataclasses.replace(weight, codes=weight.codes.new_empty(0))  # scales and layout only

    def value(self) -> Tensor:
        codes = unpack_codes(self.packed, self.weight.code_table.numel(), self.shape.numel())
        return dataclasses.replace(self.weight, codes=codes).dequantize()

    def nbytes(self) -> int:
        w = self.weight
        return self.packed.nbytes + w.absmax.nbytes + w.absmax_exact.nbytes + w.code_table.nbytes


def compact_quantized_copy(model: nn.Module, cfg: QuantConfig, *, materialized: Collection[str],
                           weights: Mapping[str, Tensor] | None = None) -> nn.Module:
    """:func:`~workbench.quant.model.quantized_copy` holding as codes every quantized weight that is
    not in ``materialized`` and belongs to one Linear/Conv1D module alone (the rest as tensors).

    ``materialized``: the weights the caller writes into from the start; the others are read
    only by their own module's forward (a compact weight's parameter is a placeholder without
    storage between forwards, which can take a gradient; :func:`write_quantized` gives it new codes).
    ``weights``: values to quantize in place of ``model``'s own quantized weights of those names
    (same shapes), each read once as the copy is built, so a lazy mapping holds one at a time.
    ``model`` is not modified.
    """
    if not isinstance(model, nn.Module):
        raise WorkbenchError(f"expected a torch.nn.Module, got {type(model).__name__}")
    cfg = _check_config(cfg)
    names = quantizable_parameters(model, cfg)
    # a weight of another module kind, or tied to a second module, is read outside one forward
    tensors = set(materialized) | (set(names) - set(single_use_linear_owners(model, names)))
    transposed = transposed_parameters(model)
    copy = sharing_copy(model)
    with torch.no_grad():
        for name in names:
            w = weights[name] if weights is not None and name in weights else model.get_parameter(name).detach()
            _check_same_shape(name, w, model.get_parameter(name))
            if name in tensors:  # as quantized_copy holds it
                copy.get_parameter(name).data = quantize_dequantize(w, cfg, transposed=name in transposed)
                continue
            owner = copy.get_submodule(name.rpartition(".")[0])
            install(owner, CodesAtForward(quantize_codes(w, cfg, transposed=name in transposed)))
    for p in copy.parameters():
        p.requires_grad_(False)
    return copy.eval()


def _check_same_shape(name: str, value: Tensor, parameter: Tensor) -> None:
    if value.shape != parameter.shape:
        raise WorkbenchError(f"a value of shape {tuple(value.shape)} for {name!r}, a weight of shape "
                             f"{tuple(parameter.shape)}")


def compact_bytes(model: nn.Module) -> int:
    """Bytes a compact copy holds as codes (0 for any other model)."""
    total = 0
    for m in model.modules():
        codes = installed(m)
        if isinstance(codes, CodesAtForward):
            total += codes.nbytes()
    return total


def write_quantized(model: nn.Module, name: str, weight: QuantizedWeight) -> None:
    """Set the weight ``name`` of a (compact or full) quantized copy to the quantized value
    ``weight``: a weight held as codes holds its new codes (still half a byte per 4-bit weight),
    a tensor gets ``weight.dequantize()`` copied in, which is the tensor
    :func:`~workbench.quant.codes.quantize_dequantize` gives (the same computation)."""
    owner = model.get_submodule(name.rpartition(".")[0])
    codes = installed(owner)
    if isinstance(codes, CodesAtForward) and name.rpartition(".")[2] == "weight":
        codes.hold(weight)
        return
    with torch.no_grad():
        model.get_parameter(name).copy_(weight.dequantize())
