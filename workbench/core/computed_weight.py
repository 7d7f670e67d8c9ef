"""A module whose weight is computed as its forward runs instead of being held as a tensor (issue 17).

Two working models hold weights this way. The compact quantized copy
(:mod:`workbench.quant.compact`) holds a weight as its 4-bit codes and dequantizes it per
forward; MANSU's model at w+Δ, over every weight of a model, holds a weight a round wrote as
the base's tensor plus the delta it keeps anyway, summed per forward
(:class:`~workbench.models.update.SumAtForward`). Each forward sees the very tensor a held
weight would be (the same computation every time), so logits and gradients are bit-identical;
the price is one computation per module per forward.

Between forwards the module's weight parameter is a *placeholder*: the weight's shape on one
element of storage, so ``named_parameters()`` lists it and ``requires_grad_(True)`` on it makes
the backward write the weight's gradient into its ``.grad``, as it would for a held tensor.

With grad, autograd would keep every module's computed weight until the backward (a whole model
again, for the length of one backward). A ``saved_tensors_hooks`` pair inside the module's
forward saves a note of the weight instead (its view's size, stride and offset) and computes it
again when the backward needs it.

Code that reads ``module.weight`` itself instead of calling the module (TransformerLens' bridge)
would read the placeholder: :func:`answer_weight_reads` makes a private copy's modules answer
such reads with the computed weight.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class _SavedWeightView:
    """What the backward needs to rebuild a saved view of the computed weight."""

    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class WeightAtForward:
    """One module's forward with its weight computed for the call only; a subclass says how
    (:meth:`value`). :func:`install` puts it in place of the module's forward and weight."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = torch.Size(shape)
        # the weight's shape on one element of storage: named_parameters() and .grad see the weight
        empty = torch.zeros((), dtype=dtype, device=device).expand(self.shape)
        self.placeholder = nn.Parameter(empty, requires_grad=False)

    def value(self) -> Tensor:
        """The weight, computed (the same tensor on every call until the held value changes)."""
        raise NotImplementedError

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and self.placeholder.requires_grad:
            weight = _Computed.apply(self.placeholder, self)  # its gradient goes to the placeholder
        else:
            weight = self.value()
        # plain values: the hooks live as long as the graph, and must not keep ``weight`` alive
        device, storage = weight.device, weight.untyped_storage().data_ptr()

        def pack(t: Tensor) -> Any:
            # the weight, or a view of it (linear saves weight.t()): a note, not the tensor
            if t.device == device and t.untyped_storage().data_ptr() == storage:
                return _SavedWeightView(t.size(), t.stride(), int(t.storage_offset()))
            return t

        def unpack(saved: Any) -> Tensor:
            if isinstance(saved, _SavedWeightView):
                return self.value().as_strided(saved.size, saved.stride, saved.offset)
            return saved

        module._parameters["weight"] = weight  # type: ignore[assignment]  # a plain tensor for this call only
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                return type(module).forward(module, *args, **kwargs)  # the class's, not the installed one
        finally:
            module._parameters["weight"] = self.placeholder


class _Computed(torch.autograd.Function):
    """The computed weight as a function of the placeholder, so that autograd hands the weight's
    gradient to the placeholder's ``.grad`` unchanged. It saves nothing: the graph holds the
    weight only as :class:`WeightAtForward`'s note."""

    @staticmethod
    def forward(ctx: Any, placeholder: Tensor, at_forward: WeightAtForward) -> Tensor:
        # the placeholder is the graph's input only: its value is never read
        return at_forward.value()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _InstalledForward:
    """A module's forward through its :class:`WeightAtForward`, put in place of the class's.

    It holds the module weakly: a strong reference from the module's own attribute would be a
    reference cycle, and a copy holding such modules would stay resident after its last use until
    Python's cycle collector happened to run (on SmolLM2 a quantized variant's 57 MiB of codes
    each, several at once during a measurement). A deep copy of the module (a bridge's copy of
    the tree) gets a forward bound to the copy, sharing the same ``at_forward``."""

    def __init__(self, module: nn.Module, at_forward: WeightAtForward) -> None:
        self._module = weakref.ref(module)
        self.at_forward = at_forward  # read by installed()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self._module()
        assert module is not None, "a module's forward runs only while the module exists"
        return self.at_forward(module, *args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> _InstalledForward:
        # deepcopy registers a module's copy in ``memo`` before it copies the module's attributes
        module = self._module()
        return _InstalledForward(memo.get(id(module), module), self.at_forward)


def install(module: nn.Module, at_forward: WeightAtForward) -> None:
    """Make ``module``'s weight the placeholder and its forward ``at_forward``'s (an instance
    attribute shadows the class's method). For a module whose weight only its own forward reads."""
    module._parameters["weight"] = at_forward.placeholder
    module.forward = _InstalledForward(module, at_forward)  # type: ignore[method-assign]


def installed(module: nn.Module) -> WeightAtForward | None:
    """The :class:`WeightAtForward` computing ``module``'s weight, if any."""
    found = getattr(module.forward, "at_forward", None)
    return found if isinstance(found, WeightAtForward) else None


def answer_weight_reads(model: nn.Module) -> int:
    """Make every module of ``model`` that computes its weight answer a read of ``module.weight``
    from outside its forward with the computed weight instead of the placeholder; the number of
    such modules.

    For a private copy handed to code that reads weights itself: TransformerLens' bridge splits
    GPT-2's joint ``c_attn`` at boot and, with edges, computes each head's q/k/v from
    ``module.weight``; over placeholders every score was 0. Not for the workbench's own models:
    there ``module.weight`` must stay the placeholder ``Parameter`` (``get_parameter``,
    ``requires_grad_``, ``.grad`` go through it). Each read computes the weight anew (a
    transient the size of one weight, saved by the reader's graph if it takes a gradient)."""
    count = 0
    for module in model.modules():
        if installed(module) is not None and not isinstance(type(module).__dict__.get("weight"), property):
            module.__class__ = _answering_class(type(module))
            count += 1
    return count


@functools.cache
def _answering_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with a ``weight`` property (a class attribute is found before ``nn.Module.__getattr__``)."""

    def weight(self: nn.Module) -> Tensor:
        held = self._parameters["weight"]
        at_forward = installed(self)
        if at_forward is None or held is not at_forward.placeholder:
            return held  # type: ignore[return-value]  # inside its forward: the computed weight itself
        if torch.is_grad_enabled() and at_forward.placeholder.requires_grad:
            return _Computed.apply(at_forward.placeholder, at_forward)
        return at_forward.value()

    return type(cls.__name__, (cls,), {"weight": property(weight), "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})
