"""From circuit components to the Hugging Face parameters they own.

:func:`circuit_parameters` maps components to boolean masks over Hugging Face parameters
(what MANSU may move), and :func:`parameter_slices` describes the same slices in words for the UI.

Parameter ownership (all three architectures):

- **Head** ``Lℓ.Hh``: the rows/columns of the query, key and value projections (weights
  and biases) that produce head *h*'s q/k/v, and the rows (Conv1D) / columns (Linear) of
  the output projection that read head *h*'s ``z``. The output projection's *bias* is
  shared by all heads of the layer and belongs to none of them (``include_shared_bias``
  adds it when any head of the layer is selected).
- **Grouped-query attention** (Llama with ``n_kv_heads < n_heads``): key/value head *j*
  serves query heads ``j*g … (j+1)*g-1`` with ``g = n_heads // n_kv_heads`` (as
  transformers' ``repeat_kv``). A shared key/value slice is included when *any* query
  head of its group is in the circuit, because a head cannot be changed without its
  keys and values; it is then shared with the group's other heads, which an update to it
  also affects.
- **MLP** ``Lℓ.MLP``: its input weights and biases (GPT-2 ``c_fc``; NeoX
  ``dense_h_to_4h``; Llama ``gate_proj`` and ``up_proj``) and output weights and bias
  (``c_proj``; ``dense_4h_to_h``; ``down_proj``). With ``neurons``, only the given
  neurons' rows/columns; the output bias is then shared by all neurons and left out.
- **Embed**: the token (and position) embedding matrices, only with ``include_embed``.
- **Layer norms are never included**: each layer norm's gain/bias scales the input of
  *every* head (or the MLP) of its layer at once, so it belongs to no single component;
  moving it would change components outside the circuit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from workbench.core.components import Component, ComponentKind
from workbench.core.errors import WorkbenchError
from workbench.interpretability.circuit import _as_component, _check_fits, component_order
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


def _mlp_size(params: dict[str, torch.Tensor], name: str, dim: int) -> int:
    return int(params[name].shape[dim])


def _component_slices(
    model: LoadedModel,
    comp: Component,
    *,
    neurons: list[int] | None = None,
    include_embed: bool = False,
    include_shared_bias: bool = False,
    params: dict[str, torch.Tensor] | None = None,
) -> list[ParamSlice]:
    params = params if params is not None else _layer_params(model)
    arch = model.architecture
    out: list[ParamSlice] = []

    def add(name: str, index: Index, text: str) -> None:
        if name in params:  # biases are optional in NeoX/Llama configs
            out.append(ParamSlice(name, index, f"{_fmt(index)} {text}"))

    ALL = slice(None)
    kind = comp.kind
    if kind is ComponentKind.LOGITS:
        return out
    if kind is ComponentKind.EMBED:
        if include_embed:
            for name in {"gpt2": ["transformer.wte.weight", "transformer.wpe.weight"],
                         "gpt_neox": ["gpt_neox.embed_in.weight"],
                         "llama": ["model.embed_tokens.weight"]}[arch]:
                add(name, (ALL, ALL), "whole embedding matrix")
        return out

    layer = comp.block  # type: ignore[arg-type]
    dh, nh, d = model.d_head, model.n_heads, model.d_model
    if kind is ComponentKind.HEAD:
        h = comp.head_index  # type: ignore[arg-type]
        cols = _span(h * dh, dh)
        if arch == "gpt2":
            p = f"transformer.h.{layer}.attn."
            for j, part in enumerate(("query", "key", "value")):
                s = _span(j * d + h * dh, dh)
                add(p + "c_attn.weight", (ALL, s), f"{part} of head {h} (Conv1D [in, out]: columns)")
                add(p + "c_attn.bias", (s,), f"{part} bias of head {h}")
            add(p + "c_proj.weight", (cols, ALL), f"output rows reading head {h}'s z (Conv1D [in, out])")
            if include_shared_bias:
                add(p + "c_proj.bias", (ALL,), f"output bias (shared by all heads of layer {layer})")
        elif arch == "gpt_neox":
            p = f"gpt_neox.layers.{layer}.attention."
            # HF GPTNeoXAttention: qkv(x).view(..., n_heads, 3 * d_head) then chunk(3) ->
            # per head, rows [h*3*dh, (h+1)*3*dh) hold q | k | v, each d_head long.
            for j, part in enumerate(("query", "key", "value")):
                s = _span(h * 3 * dh + j * dh, dh)
                add(p + "query_key_value.weight", (s, ALL), f"{part} of head {h} (interleaved per head)")
                add(p + "query_key_value.bias", (s,), f"{part} bias of head {h}")
            add(p + "dense.weight", (ALL, cols), f"output columns reading head {h}'s z")
            if include_shared_bias:
                add(p + "dense.bias", (ALL,), f"output bias (shared by all heads of layer {layer})")
        else:  # llama
            p = f"model.layers.{layer}.self_attn."
            group = nh // model.n_kv_heads
            kv = h // group
            add(p + "q_proj.weight", (cols, ALL), f"query of head {h}")
            add(p + "q_proj.bias", (cols,), f"query bias of head {h}")
            kv_rows = _span(kv * dh, dh)
            shared = (
                f" (kv head {kv}, shared by query heads {kv * group}–{(kv + 1) * group - 1})"
                if group > 1 else ""
            )
            for part, proj in (("key", "k_proj"), ("value", "v_proj")):
                add(p + f"{proj}.weight", (kv_rows, ALL), f"{part} of head {h}{shared}")
                add(p + f"{proj}.bias", (kv_rows,), f"{part} bias of head {h}{shared}")
            add(p + "o_proj.weight", (ALL, cols), f"output columns reading head {h}'s z")
            if include_shared_bias:
                add(p + "o_proj.bias", (ALL,), f"output bias (shared by all heads of layer {layer})")
        return out

    # MLP
    if arch == "gpt2":
        p = f"transformer.h.{layer}.mlp."
        d_mlp = _mlp_size(params, p + "c_fc.weight", 1)
        n_ix: Any = _neuron_index(neurons, d_mlp, comp)
        what = "all neurons" if neurons is None else "neurons"
        add(p + "c_fc.weight", (ALL, n_ix), f"input columns, {what} (Conv1D [in, out])")
        add(p + "c_fc.bias", (n_ix,), f"input bias, {what}")
        add(p + "c_proj.weight", (n_ix, ALL), f"output rows, {what} (Conv1D [in, out])")
        if neurons is None:
            add(p + "c_proj.bias", (ALL,), "output bias")
    elif arch == "gpt_neox":
        p = f"gpt_neox.layers.{layer}.mlp."
        d_mlp = _mlp_size(params, p + "dense_h_to_4h.weight", 0)
        n_ix = _neuron_index(neurons, d_mlp, comp)
        what = "all neurons" if neurons is None else "neurons"
        add(p + "dense_h_to_4h.weight", (n_ix, ALL), f"input rows, {what}")
        add(p + "dense_h_to_4h.bias", (n_ix,), f"input bias, {what}")
        add(p + "dense_4h_to_h.weight", (ALL, n_ix), f"output columns, {what}")
        if neurons is None:
            add(p + "dense_4h_to_h.bias", (ALL,), "output bias")
    else:
        p = f"model.layers.{layer}.mlp."
        d_mlp = _mlp_size(params, p + "up_proj.weight", 0)
        n_ix = _neuron_index(neurons, d_mlp, comp)
        what = "all neurons" if neurons is None else "neurons"
        for proj in ("gate_proj", "up_proj"):
            add(p + f"{proj}.weight", (n_ix, ALL), f"{proj.split('_')[0]} rows, {what}")
            add(p + f"{proj}.bias", (n_ix,), f"{proj.split('_')[0]} bias, {what}")
        add(p + "down_proj.weight", (ALL, n_ix), f"down columns, {what}")
        if neurons is None:
            add(p + "down_proj.bias", (ALL,), "output bias")
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
            params=params,
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
