"""A quantized copy that keeps most of its quantized weights as codes (issue 17).

:func:`~workbench.quant.model.quantized_copy` holds every fake-quantized weight as a tensor of
the model's dtype: a second model. MANSU's copy at Q(w+Δ) writes only its candidate tensors, so
:func:`compact_quantized_copy` keeps those as tensors and every other quantized Linear/Conv1D
weight as its codes (4-bit codes two per byte, 8-bit one per byte) and block scales, and
dequantizes a weight only while its module's forward runs. Dequantizing the same codes gives the
same tensor every time (the formula of :func:`~workbench.quant.codes.quantize_dequantize`), so
forwards, logits and gradients are bit-identical to the full copy's (tested); the price is one
dequantization per module per forward.

With grad, autograd would keep every module's dequantized weight until the backward (the whole
quantized model again, for the length of one backward). A ``saved_tensors_hooks`` pair inside
each module's forward saves a note of the weight instead (its view's size, stride and offset) and
dequantizes it again when the backward needs it.

A weight held as codes can also take a gradient: its parameter between forwards is a
placeholder with the weight's shape and no storage (one element, expanded), so
``requires_grad_(True)`` on it makes the backward write the weight's gradient into its
``.grad``, as it would for the tensor (bit for bit: the same forward, the same backward).
:func:`write_quantized` gives a weight a new quantized value, as codes where it is held as codes:
MANSU without a circuit holds its whole model at Q(w+Δ) as codes, the weights it moves too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

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


@dataclass(frozen=True, eq=False)  # holds tensors
class _SavedWeightView:
    """What the backward needs to rebuild a saved view of the dequantized weight."""

    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class CodesAtForward:
    """One module's forward with its weight dequantized from codes for the call only (installed as
    the module's ``forward``; the module's weight parameter is a placeholder between calls)."""

    def __init__(self, module: nn.Module, weight: QuantizedWeight) -> None:
        self.module_type = type(module)
        self.numel = weight.shape.numel()
        self.hold(weight)
        # the weight's shape on one element of storage: named_parameters() and .grad see the weight
        empty = torch.zeros((), dtype=weight.dtype, device=weight.codes.device).expand(weight.shape)
        self.placeholder = nn.Parameter(empty, requires_grad=False)

    def hold(self, weight: QuantizedWeight) -> None:
        """Hold ``weight``'s codes and scales (a new value of the same weight)."""
        if weight.shape.numel() != self.numel:
            raise WorkbenchError(f"codes for {weight.shape.numel()} weights, the module has {self.numel}")
        self.packed = pack_codes(weight.codes, weight.code_table.numel())
        self.weight = dataclasses.replace(weight, codes=weight.codes.new_empty(0))  # scales and layout only

    def dequantize(self) -> Tensor:
        codes = unpack_codes(self.packed, self.weight.code_table.numel(), self.numel)
        return dataclasses.replace(self.weight, codes=codes).dequantize()

    def nbytes(self) -> int:
        w = self.weight
        return self.packed.nbytes + w.absmax.nbytes + w.absmax_exact.nbytes + w.code_table.nbytes

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and self.placeholder.requires_grad:
            weight = _Dequantized.apply(self.placeholder, self)  # its gradient goes to the placeholder
        else:
            weight = self.dequantize()
        # plain values: the hooks live as long as the graph, and must not keep ``weight`` alive
        device, storage = weight.device, weight.untyped_storage().data_ptr()

        def pack(t: Tensor) -> Any:
            # the weight, or a view of it (linear saves weight.t()): a note, not the tensor
            if t.device == device and t.untyped_storage().data_ptr() == storage:
                return _SavedWeightView(t.size(), t.stride(), int(t.storage_offset()))
            return t

        def unpack(saved: Any) -> Tensor:
            if isinstance(saved, _SavedWeightView):
                return self.dequantize().as_strided(saved.size, saved.stride, saved.offset)
            return saved

        module._parameters["weight"] = weight  # type: ignore[assignment]  # a plain tensor for this call only
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                return self.module_type.forward(module, *args, **kwargs)
        finally:
            module._parameters["weight"] = self.placeholder


class _Dequantized(torch.autograd.Function):
    """The dequantized weight as a function of the placeholder, so that autograd hands the
    weight's gradient to the placeholder's ``.grad`` unchanged. It saves nothing: the graph
    holds the weight only as :class:`CodesAtForward`'s note."""

    @staticmethod
    def forward(ctx: Any, placeholder: Tensor, codes: CodesAtForward) -> Tensor:  # placeholder: the graph's input only
        return codes.dequantize()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def compact_quantized_copy(model: nn.Module, cfg: QuantConfig, *, materialized: Collection[str]) -> nn.Module:
    """:func:`~workbench.quant.model.quantized_copy` holding as codes every quantized weight that is
    not in ``materialized`` and belongs to one Linear/Conv1D module alone (the rest as tensors).

    ``materialized``: the weights the caller writes into from the start; the others are read
    only by their own module's forward (a compact weight's parameter is a placeholder without
    storage between forwards, which can take a gradient; :func:`write_quantized` gives it new codes).
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
            w = model.get_parameter(name).detach()
            if name in tensors:  # as quantized_copy holds it
                copy.get_parameter(name).data = quantize_dequantize(w, cfg, transposed=name in transposed)
                continue
            owner = copy.get_submodule(name.rpartition(".")[0])
            codes = CodesAtForward(owner, quantize_codes(w, cfg, transposed=name in transposed))
            owner._parameters["weight"] = codes.placeholder
            owner.forward = _bound(codes, owner)
    for p in copy.parameters():
        p.requires_grad_(False)
    return copy.eval()


def _bound(codes: CodesAtForward, module: nn.Module) -> Any:
    """``module.forward`` replaced (an instance attribute shadows the class's method)."""
    def forward(*args: Any, **kwargs: Any) -> Any:
        return codes(module, *args, **kwargs)
    forward.codes = codes  # type: ignore[attr-defined]  # read by compact_bytes
    return forward


def compact_bytes(model: nn.Module) -> int:
    """Bytes a compact copy holds as codes (0 for any other model)."""
    total = 0
    for m in model.modules():
        codes = getattr(m.forward, "codes", None)
        if isinstance(codes, CodesAtForward):
            total += codes.nbytes()
    return total



def write_quantized(model: nn.Module, name: str, weight: QuantizedWeight) -> None:
    """Set the weight ``name`` of a (compact or full) quantized copy to the quantized value
    ``weight``: a weight held as codes holds its new codes (still half a byte per 4-bit weight),
    a tensor gets ``weight.dequantize()`` copied in, which is the tensor
    :func:`~workbench.quant.codes.quantize_dequantize` gives (the same computation)."""
    owner = model.get_submodule(name.rpartition(".")[0])
    codes = getattr(owner.forward, "codes", None)
    if isinstance(codes, CodesAtForward) and name.rpartition(".")[2] == "weight":
        codes.hold(weight)
        return
    with torch.no_grad():
        model.get_parameter(name).copy_(weight.dequantize())
