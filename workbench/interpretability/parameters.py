"""From circuit components to the Hugging Face parameters they own.

:func:`circuit_parameters` maps components to boolean masks over Hugging Face parameters
(what MANSU may move), and :func:`parameter_slices` describes the same slices in words for the UI.

Parameter ownership (every family; the slices come from ``model.adapter``,
:mod:`workbench.models.adapter`):

- **Head** ``Lℓ.Hh``: the rows/columns of the query, key and value projections (weights
  and biases) that produce head *h*'s q/k/v, and the rows (Conv1D) / columns (Linear) of
  the output projection that read head *h*'s ``z``. The output projection's *bias* is
  shared by all heads of the layer and belongs to none of them (``include_shared_bias``
  adds it when any head of the layer is selected).
- **Fused projections**: the head's features inside GPT-2's ``c_attn`` (``[q | k | v]``),
  GPT-NeoX's ``query_key_value`` (interleaved per head) and Phi-3's ``qkv_proj``
  (``[q | k | v]`` with GQA widths); Phi-3's ``gate_up_proj`` is ``[gate | up]``.
- **Grouped-query attention** (``n_kv_heads < n_heads``): key/value head *j*
  serves query heads ``j*g … (j+1)*g-1`` with ``g = n_heads // n_kv_heads`` (as
  transformers' ``repeat_kv``). A shared key/value slice is included when *any* query
  head of its group is in the circuit, because a head cannot be changed without its
  keys and values; it is then shared with the group's other heads, which an update to it
  also affects.
- **MLP** ``Lℓ.MLP``: its input weights and biases (GPT-2 ``c_fc``; NeoX
  ``dense_h_to_4h``; gated families ``gate_proj`` and ``up_proj``, or Phi-3's fused
  ``gate_up_proj``) and output weights and bias (``c_proj``; ``dense_4h_to_h``;
  ``down_proj``). With ``neurons``, only the given neurons' rows/columns; the output bias
  is then shared by all neurons and left out.
- **Embed**: the token (and position) embedding matrices, only with ``include_embed``.
- **Norms are never included**: each layer norm's gain/bias scales the input (or, in
  Gemma 2/3 and OLMo-2, the output) of *every* head (or the MLP) of its layer at once, so
  it belongs to no single component; moving it would change components outside the
  circuit. The same holds for Qwen3/Gemma 3's per-head-shared ``q_norm``/``k_norm``.
  OLMo-2 normalises q and k over all heads jointly: a head's q/k slice is its own, but
  moving it rescales the layer's other heads too (its v and o slices are separable).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from workbench.core.components import Component, ComponentKind
from workbench.core.errors import WorkbenchError
from workbench.interpretability.circuit import _as_component, _check_fits, component_order
from workbench.models.adapter import FeatureSlice
from workbench.models.loaded import LoadedModel

Index = tuple[Any, ...]


@dataclass(frozen=True)
class ParamSlice:
    """One slice of one HF parameter owned by a component.

    Attributes:
        param: Hugging Face parameter name.
        index: the index into the parameter (slices / index lists per dimension).
        description: readable text, e.g. ``"[:, 32:48] query of head 2"``.
    """

    param: str
    index: Index
    description: str


def _span(start: int, length: int) -> slice:
    return slice(start, start + length)


def _fmt(index: Index) -> str:
    parts = []
    for ix in index:
        if isinstance(ix, slice):
            parts.append(":" if ix.start is None and ix.stop is None else f"{ix.start}:{ix.stop}")
        elif isinstance(ix, list):
            parts.append(_fmt_list(ix))
        else:
            parts.append(str(ix))
    return "[" + ", ".join(parts) + "]"


def _fmt_list(ix: list[int]) -> str:
    if len(ix) <= 6:
        return "{" + ", ".join(map(str, ix)) + "}"
    return "{" + ", ".join(map(str, ix[:3])) + f", … ({len(ix)} neurons)" + "}"


def _layer_params(model: LoadedModel) -> dict[str, torch.Tensor]:
    return dict(model.hf.named_parameters())


def _component_slices(
    model: LoadedModel,
    comp: Component,
    *,
    neurons: list[int] | None = None,
    include_embed: bool = False,
    include_shared_bias: bool = False,
) -> list[ParamSlice]:
    """The slices ``comp`` owns, read off the model's :class:`ModelAdapter` (no family branches here)."""
    adapter = model.adapter
    kind = comp.kind
    if kind is ComponentKind.LOGITS:
        return []
    if kind is ComponentKind.EMBED:
        whole = (slice(None), slice(None))
        return [ParamSlice(n, whole, f"{_fmt(whole)} whole embedding matrix")
                for n in adapter.embeddings] if include_embed else []
    layer = comp.block
    if kind is ComponentKind.HEAD:
        out = _feature_slices(adapter.head_slices(layer, comp.head_index))
        o = adapter.layers[layer].attention.o
        if include_shared_bias and o.bias_name is not None:
            out.append(ParamSlice(o.bias_name, (slice(None),),
                                  f"[:] output bias (shared by all heads of layer {layer})"))
        return out
    mlp_layout = adapter.layers[layer].mlp
    picked = None if neurons is None else tuple(_neuron_index(neurons, mlp_layout.d_mlp, comp))
    out = _feature_slices(mlp_layout.neuron_slices(picked))
    out_bias = mlp_layout.out.bias_name
    if neurons is None and out_bias is not None:  # shared by all neurons: only with the whole MLP
        out.append(ParamSlice(out_bias, (slice(None),), "[:] output bias"))
    return out


def _feature_slices(slices: Iterable[FeatureSlice]) -> list[ParamSlice]:
    """Weight (and, on the output side, bias) slices of each feature slice, in that order."""
    out: list[ParamSlice] = []
    for fs in slices:
        layout = " (Conv1D [in, out])" if fs.linear.transposed else ""
        index = fs.weight_index()
        out.append(ParamSlice(fs.linear.weight_name, index, f"{_fmt(index)} {fs.text}{layout}"))
        bias = fs.bias_index()
        if bias is not None and fs.linear.bias_name is not None:
            out.append(ParamSlice(fs.linear.bias_name, bias, f"{_fmt(bias)} {fs.text}, bias"))
    return out


def _neuron_index(neurons: list[int] | None, d_mlp: int, comp: Component) -> Any:
    if neurons is None:
        return slice(None)
    out = []
    for n in neurons:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < d_mlp:
            raise WorkbenchError(f"{comp.name}: neuron {n!r} is out of range (the MLP has {d_mlp} neurons)")
        out.append(n)
    return sorted(set(out))


def _validate(model: LoadedModel, components: Iterable[Component | str]) -> list[Component]:
    comps = []
    for item in components:
        comp = _as_component(item)
        _check_fits(comp, model.n_layers, model.n_heads, f"model {model.name!r}: ")
        comps.append(comp)
    return sorted(set(comps), key=lambda c: component_order(c))


def circuit_parameters(
    model: LoadedModel,
    components: Iterable[Component | str],
    *,
    include_embed: bool = False,
    neurons: Mapping[int, Iterable[int]] | None = None,
    include_shared_bias: bool = False,
) -> dict[str, torch.Tensor]:
    """Boolean masks over HF parameters: True where a parameter belongs to a given component.

    Args:
        model: the model whose parameters are masked (shapes and architecture).
        components: heads, MLPs, optionally ``EMBED`` (names or :class:`Component`);
            ``LOGITS`` owns no parameters and is ignored. E.g. ``circuit.selected``.
        include_embed: map ``EMBED`` to the whole embedding matrices (off: ignored).
        neurons: ``{layer: [neuron, ...]}`` restricts the MLP of that layer to those
            neurons' rows/columns (its output bias, shared by all neurons, is then left
            out). The MLP itself must be among ``components``.
        include_shared_bias: also mask each attention layer's output bias when any of
            its heads is given (shared by all the layer's heads; off by default).

    Returns:
        ``{HF parameter name: torch.bool tensor of the parameter's shape}``, only for
        parameters with at least one True entry. See the module docstring for which
        slices each component owns (GQA and fused-QKV layouts included).
    """
    comps = _validate(model, components)
    neuron_map: dict[int, list[int]] = {}
    if neurons:
        mlps = {c.layer for c in comps if c.kind is ComponentKind.MLP}
        for layer, idx in neurons.items():
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise WorkbenchError(f"neurons: layer keys must be integers, got {layer!r}")
            if layer not in mlps:
                raise WorkbenchError(
                    f"neurons given for layer {layer}, but L{layer}.MLP is not among the components"
                )
            neuron_map[layer] = list(idx)
    params = _layer_params(model)
    masks: dict[str, torch.Tensor] = {}
    for comp in comps:
        for sl in _component_slices(
            model,
            comp,
            neurons=neuron_map.get(comp.layer) if comp.kind is ComponentKind.MLP else None,  # type: ignore[arg-type]
            include_embed=include_embed,
            include_shared_bias=include_shared_bias,
        ):
            if sl.param not in masks:
                masks[sl.param] = torch.zeros(params[sl.param].shape, dtype=torch.bool, device=params[sl.param].device)
            masks[sl.param][_torch_index(sl.index)] = True
    return {k: v for k, v in masks.items() if bool(v.any())}


def _torch_index(index: Index) -> tuple[Any, ...]:
    """Turn per-dimension lists into an open mesh so list x slice indexes a block."""
    lists = [i for i, ix in enumerate(index) if isinstance(ix, list)]
    if not lists:
        return index
    (dim,) = lists  # at most one neuron list per index
    out = list(index)
    out[dim] = torch.tensor(index[dim], dtype=torch.long)
    return tuple(out)


def parameter_slices(
    model: LoadedModel,
    component: Component | str,
    *,
    neurons: Iterable[int] | None = None,
    include_embed: bool = True,
    include_shared_bias: bool = False,
) -> list[tuple[str, str]]:
    """Human-readable ``(HF parameter name, slice description)`` pairs owned by one component.

    Same mapping as :func:`circuit_parameters` (here ``EMBED`` is described by default).
    """
    (comp,) = _validate(model, [component])
    slices = _component_slices(
        model,
        comp,
        neurons=list(neurons) if neurons is not None and comp.kind is ComponentKind.MLP else None,
        include_embed=include_embed,
        include_shared_bias=include_shared_bias,
    )
    return [(s.param, s.description) for s in slices]
