"""One description of a model's weight layout: :class:`ModelAdapter` (``LoadedModel.adapter``).

Every module that needs to know *which Hugging Face parameters* a head, an MLP or the
quantizer touches asks this object; none inspects module classes or family names itself.

Where it comes from:

- **Module paths** (embeddings, the decoder blocks, each block's attention and MLP
  projections, norms, unembedding) are read from TransformerLens 4's own architecture
  adapter for the model (``component_mapping``), selected by the same registry
  ``TransformerBridge.boot_transformers`` uses, without booting a bridge.
- **Written here by hand**, because the bridge does not expose it as data (it splits
  fused matrices with per-family functions at boot, on copies): where each head's
  q/k/v features sit inside a fused projection (GPT-2 ``c_attn``: ``[q | k | v]`` blocks;
  GPT-NeoX ``query_key_value``: interleaved per head; Phi-3 ``qkv_proj``:
  ``[q (n_heads) | k (n_kv) | v (n_kv)]``), Phi-3's fused ``gate_up_proj``
  (``[gate | up]``), which norms are Gemma's ``x · (1 + w)`` kind, and which families
  are refused (mixture-of-experts, state-space, encoder–decoder: their layers do not
  decompose into heads + one MLP, which circuits, MANSU and the quantization analysis
  assume).

Layouts: an ``nn.Linear`` weight is ``[out, in]``; a transformers ``Conv1D`` weight (GPT-2)
is ``[in, out]``, i.e. transposed, and bitsandbytes quantizes it transposed.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import torch
from torch import nn

from workbench.core.errors import WorkbenchError
from workbench.quant import QuantConfig, conv1d_class

Side = Literal["out", "in"]
Index = tuple[Any, ...]

# model_type -> a readable family name. Only families whose blocks are (attention with
# heads) + (one dense MLP) and which were checked end to end are admitted.
SUPPORTED_FAMILIES: dict[str, str] = {
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX/Pythia",
    "llama": "Llama/SmolLM",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
    "phi3": "Phi-3",
    "olmo2": "OLMo-2",
}

# Families refused on purpose, by what breaks the heads + MLP picture.
_STATE_SPACE = ("mamba", "mamba2", "falcon_mamba", "rwkv", "rwkv7", "recurrent_gemma", "jamba", "bamba",
                "zamba2", "falcon_h1", "nemotron_h", "granitemoehybrid", "lfm2", "qwen3_next")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

# Gemma's RMSNorm scales by (1 + w), not w: a zero weight is the identity. The bridge
# folds this into its own weight processing but does not expose it as data.
_PLUS_ONE_NORM = ("gemma2", "gemma3_text")


class NormKind(Enum):
    LAYER = "layernorm"
    RMS = "rmsnorm"
    RMS_PLUS_ONE = "rmsnorm (1 + w)"


@dataclass(frozen=True)
class Linear:
    """One linear module of a decoder block.

    Attributes:
        module: its HF module path, e.g. ``model.layers.0.self_attn.q_proj``.
        transposed: a GPT-2 ``Conv1D`` (weight ``[in, out]``) rather than ``nn.Linear``.
        bias: whether it has a bias parameter.
    """

    module: str
    transposed: bool
    bias: bool

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias_name(self) -> str | None:
        return f"{self.module}.bias" if self.bias else None


@dataclass(frozen=True)
class FeatureSlice:
    """Features ``[start, stop)`` (or a list of features) on one side of one linear.

    ``side="out"``: output features (rows of a Linear weight, columns of a Conv1D weight,
    and the bias entries); ``side="in"``: input features (the other axis, no bias).
    ``text`` says what the features are, e.g. ``"query of head 2"``.
    """

    linear: Linear
    side: Side
    features: slice | tuple[int, ...]
    text: str

    def weight_index(self) -> Index:
        ix: Any = self.features if isinstance(self.features, slice) else list(self.features)
        out_axis_first = not self.linear.transposed
        rows_are_features = out_axis_first == (self.side == "out")
        return (ix, slice(None)) if rows_are_features else (slice(None), ix)

    def bias_index(self) -> Index | None:
        if self.side != "out" or not self.linear.bias:
            return None
        return (self.features if isinstance(self.features, slice) else list(self.features),)


@dataclass(frozen=True)
class AttentionLayout:
    """One layer's attention: its projections and where each head's features sit.

    ``heads[h]`` lists head *h*'s q, k, v output features and o input features. Under
    grouped-query attention the k/v features of kv head ``h // group`` are listed for
    every query head of its group (a head cannot change without its keys and values).
    """

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    heads: tuple[tuple[FeatureSlice, ...], ...]
    qk_norm_shared_across_heads: bool


@dataclass(frozen=True)
class MlpLayout:
    """One layer's MLP: ``inputs`` (in, and gate on gated MLPs) read the residual stream
    and each holds ``d_mlp`` neurons starting at its ``offset``; ``out`` writes it back."""

    inputs: tuple[tuple[Linear, int, str], ...]
    out: Linear
    d_mlp: int

    def neuron_slices(self, neurons: tuple[int, ...] | None) -> tuple[FeatureSlice, ...]:
        what = "all neurons" if neurons is None else "neurons"
        out: list[FeatureSlice] = []
        for lin, offset, role in self.inputs:
            feats: slice | tuple[int, ...] = (
                slice(offset, offset + self.d_mlp) if neurons is None else tuple(offset + n for n in neurons)
            )
            out.append(FeatureSlice(lin, "out", feats, f"{role}, {what}"))
        feats_out: slice | tuple[int, ...] = slice(None) if neurons is None else tuple(neurons)
        out.append(FeatureSlice(self.out, "in", feats_out, f"output, {what}"))
        return tuple(out)


@dataclass(frozen=True)
class LayerLayout:
    """One decoder layer. ``attention_out_norm`` / ``mlp_out_norm``: the module path of a
    norm applied to the attention / MLP output *before* it is added to the residual
    (Gemma 2/3, OLMo-2), else ``None``; then a head's residual write is not ``z_h W_O[h]``."""

    attention: AttentionLayout
    mlp: MlpLayout
    norms: tuple[str, ...]
    attention_out_norm: str | None = None
    mlp_out_norm: str | None = None


@dataclass(frozen=True)
class ModelAdapter:
    """The weight layout of one loaded model (see the module docstring).

    Attributes:
        family: the HF ``model_type`` (``"gpt2"``, ``"qwen2"``, ``"gemma3_text"``, …).
        bridge_architecture: the TransformerLens adapter's architecture key.
        layers: per decoder layer, its attention, MLP and norm parameters.
        blocks: the module path of the decoder blocks' ``ModuleList`` (``transformer.h``,
            ``model.layers``); block ``i``'s parameters are named ``f"{blocks}.{i}.…"``.
        embeddings: input embedding parameter names (token, and learned positions).
        unembed: the output embedding's module path (``lm_head``/``embed_out``).
        unembed_weight: the name ``named_parameters()`` lists its weight under (the token
            embedding's when tied).
        tied_embeddings: the output embedding shares the token embedding's tensor.
        parameter_order: every parameter name, in ``named_parameters()`` order.
        norm: the kind of every norm in the model.
        linears: every linear of the decoder blocks, in parameter order.
        quantized: weight names a 4-/8-bit loader replaces (the decoder linears; not
            embeddings, norms or the unembedding).
        transposed: the Conv1D weights among them (quantized along ``w.T``).
    """

    family: str
    bridge_architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    layers: tuple[LayerLayout, ...]
    blocks: str
    embeddings: tuple[str, ...]
    unembed: str
    unembed_weight: str
    tied_embeddings: bool
    parameter_order: tuple[str, ...]
    norm: NormKind
    linears: tuple[Linear, ...]
    quantized: frozenset[str]
    transposed: frozenset[str]

    @property
    def family_name(self) -> str:
        return SUPPORTED_FAMILIES[self.family]

    def head_slices(self, layer: int, head: int) -> tuple[FeatureSlice, ...]:
        return self.layers[layer].attention.heads[head]

    def layer_of(self, name: str) -> int | None:
        """The decoder block parameter ``name`` belongs to (``None``: outside the blocks)."""
        head, _, rest = name.partition(f"{self.blocks}.")
        index = rest.split(".", 1)[0]
        return int(index) if head == "" and index.isdigit() else None

    def quantizable(self, cfg: QuantConfig) -> list[str]:
        """What ``cfg`` quantizes, in parameter order: the decoder linears, plus the input
        embeddings if ``cfg.include_embeddings`` and the unembedding if ``cfg.include_lm_head``
        (the rule of :func:`workbench.quant.quantizable_parameters`, which tests check this
        against)."""
        take = set(self.quantized)
        if cfg.include_embeddings:
            take.update(self.embeddings)
        if cfg.include_lm_head:
            take.add(self.unembed_weight)
        return [n for n in self.parameter_order if n in take]


# --- building ------------------------------------------------------------------------------


def _hf_config(hf: nn.Module) -> Any:
    """``hf.config`` (a transformers ``PretrainedConfig``; typed ``Any`` since ``nn.Module`` does not declare it)."""
    config: Any = hf.config
    return config


def check_family(hf: nn.Module, name: str) -> str:
    """The model's ``model_type`` if the workbench supports it, else a ``WorkbenchError`` saying why."""
    cfg = _hf_config(hf)
    model_type = str(getattr(cfg, "model_type", "") or "")
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(cfg, "is_encoder_decoder", False):
        raise WorkbenchError(
            f"model {name!r} ({model_type}) is an encoder–decoder model: the workbench attributes and unlearns "
            "decoder-only causal LMs, whose every layer is attention heads + one MLP on one residual stream"
        )
    experts = [k for k in _EXPERT_KEYS if (getattr(text_cfg, k, None) or 0) > 1]
    if experts or "moe" in model_type or model_type in ("mixtral", "olmoe", "phimoe", "jetmoe", "dbrx"):
        raise WorkbenchError(
            f"model {name!r} ({model_type}) is a mixture-of-experts model: its MLP is a router over experts, "
            "so an MLP is not one component with one set of weights (circuits, MANSU's per-layer projection and "
            "the quantization analysis assume it is)"
        )
    if model_type in _STATE_SPACE:
        raise WorkbenchError(
            f"model {name!r} ({model_type}) has state-space / recurrent layers: they have no attention heads "
            "for attribution and circuits to name"
        )
    if model_type not in SUPPORTED_FAMILIES:
        names = ", ".join(SUPPORTED_FAMILIES.values())
        raise WorkbenchError(
            f"model {name!r} has architecture {model_type!r}; the workbench supports {names} "
            "(dense decoder-only families checked end to end)"
        )
    return model_type


def bridge_config(hf: nn.Module) -> Any:
    """A copy of ``hf.config`` with ``architectures`` filled in from the model class.

    Models built in memory (tests, toys) have no ``architectures``; the bridge's registry
    needs it for families whose ``model_type`` it does not map (e.g. ``gemma3_text``).
    """
    cfg = copy.copy(_hf_config(hf))
    if not getattr(cfg, "architectures", None):
        cfg.architectures = [type(hf).__name__]
    return cfg


def _bridge_mapping(hf: nn.Module) -> tuple[str, dict[str, Any]]:
    from transformer_lens.factories import architecture_adapter_factory
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_config_from_hf
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config

    cfg = bridge_config(hf)
    arch = determine_architecture_from_hf_config(cfg)
    bcfg = build_bridge_config_from_hf(cfg, arch, "workbench", torch.float32)
    adapter = architecture_adapter_factory.ArchitectureAdapterFactory.select_architecture_adapter(bcfg)
    mapping: Any = adapter.component_mapping
    return arch, dict(mapping)


def _subs(component: Any) -> dict[str, Any]:
    return dict(getattr(component, "submodules", None) or {})


def _linear(hf_modules: dict[str, nn.Module], path: str) -> Linear:
    m = hf_modules.get(path)
    conv = conv1d_class()
    if m is None or not (isinstance(m, nn.Linear) or (conv is not None and isinstance(m, conv))):
        raise WorkbenchError(f"model layout: expected a linear layer at {path!r}, found {type(m).__name__}")
    return Linear(path, transposed=conv is not None and isinstance(m, conv),
                  bias=getattr(m, "bias", None) is not None)


def _qkv_starts(family: str, h: int, kv: int, nh: int, nkv: int, dh: int) -> tuple[int, int, int]:
    """Where head ``h`` (kv head ``kv``) starts in a fused q/k/v projection's output features.

    Not in the bridge as data: it splits these matrices at boot with per-family functions.
    """
    if family == "gpt_neox":  # qkv(x).view(..., n_heads, 3 * d_head).chunk(3): interleaved per head
        base = h * 3 * dh
        return base, base + dh, base + 2 * dh
    # GPT-2 c_attn / Phi-3 qkv_proj: [q (n_heads·dh) | k (n_kv·dh) | v (n_kv·dh)]
    return h * dh, nh * dh + kv * dh, nh * dh + nkv * dh + kv * dh


def _attention(family: str, attn: Any, prefix: str, mods: dict[str, nn.Module],
               nh: int, nkv: int, dh: int) -> AttentionLayout:
    subs = _subs(attn)
    base = f"{prefix}.{attn.name}."
    o = _linear(mods, base + subs["o"].name)
    fused = "qkv" in subs
    if fused:
        q = k = v = _linear(mods, base + subs["qkv"].name)
    else:
        q, k, v = (_linear(mods, base + subs[x].name) for x in "qkv")
    group = nh // nkv
    heads = []
    for h in range(nh):
        kv = h // group
        shared = f" (kv head {kv}, shared by query heads {kv * group}–{(kv + 1) * group - 1})" if group > 1 else ""
        if fused:
            qs, ks, vs = _qkv_starts(family, h, kv, nh, nkv, dh)
        else:
            qs, ks, vs = h * dh, kv * dh, kv * dh
        heads.append((
            FeatureSlice(q, "out", slice(qs, qs + dh), f"query of head {h}"),
            FeatureSlice(k, "out", slice(ks, ks + dh), f"key of head {h}{shared}"),
            FeatureSlice(v, "out", slice(vs, vs + dh), f"value of head {h}{shared}"),
            FeatureSlice(o, "in", slice(h * dh, (h + 1) * dh), f"output reading head {h}'s z"),
        ))
    # OLMo-2 normalises q and k over all heads at once (q_norm over n_heads·d_head), so a
    # head's q/k cannot change without rescaling every head's; Qwen3/Gemma 3 norm per head.
    q_norm = mods.get(base + "q_norm")
    joint = q_norm is not None and int(getattr(q_norm, "weight", torch.empty(0)).numel()) > dh
    return AttentionLayout(q=q, k=k, v=v, o=o, heads=tuple(heads), qk_norm_shared_across_heads=joint)


def _mlp(mlp: Any, prefix: str, mods: dict[str, nn.Module]) -> MlpLayout:
    subs = _subs(mlp)
    base = f"{prefix}.{mlp.name}."
    out = _linear(mods, base + subs["out"].name)
    w: Any = mods[out.module].weight
    d_mlp = int(w.shape[0] if out.transposed else w.shape[1])  # the out projection's input features
    if type(mlp).__name__ == "JointGateUpMLPBridge":
        # Phi-3's gate_up_proj = [gate | up] (chunk(2) in HF); the bridge splits it at boot
        # and names only the halves it makes, so the fused module is named here.
        fused = _linear(mods, base + "gate_up_proj")
        inputs = ((fused, 0, "gate rows"), (fused, d_mlp, "up rows"))
    elif "gate" in subs:
        inputs = ((_linear(mods, base + subs["gate"].name), 0, "gate rows"),
                  (_linear(mods, base + subs["in"].name), 0, "up rows"))
    else:
        inputs = ((_linear(mods, base + subs["in"].name), 0, "input"),)
    return MlpLayout(inputs=inputs, out=out, d_mlp=d_mlp)


def _norm_kind(family: str, block: Any) -> NormKind:
    if family in _PLUS_ONE_NORM:
        return NormKind.RMS_PLUS_ONE
    kinds = {type(c).__name__ for k, c in _subs(block).items() if k.startswith("ln")}
    return NormKind.RMS if any("RMS" in k for k in kinds) else NormKind.LAYER


def _block_norms(prefix: str, block: Any, attn: Any, params: Collection[str]) -> tuple[str, ...]:
    names = [f"{prefix}.{c.name}.{p}" for k, c in _subs(block).items() if k.startswith("ln")
             for p in ("weight", "bias")]
    names += [f"{prefix}.{attn.name}.{c.name}.{p}" for k, c in _subs(attn).items() if k.endswith("_norm")
              for p in ("weight", "bias")]
    return tuple(n for n in names if n in params)


def build_adapter(hf: nn.Module, name: str) -> ModelAdapter:
    """The adapter of ``hf`` (see the module docstring); refuses unsupported families."""
    family = check_family(hf, name)
    arch, mapping = _bridge_mapping(hf)
    full = _hf_config(hf)
    cfg = full.get_text_config() if hasattr(full, "get_text_config") else full
    nh = int(cfg.num_attention_heads)
    nkv = int(getattr(cfg, "num_key_value_heads", None) or nh)
    d = int(cfg.hidden_size)
    dh = int(getattr(cfg, "head_dim", None) or d // nh)
    n_layers = int(cfg.num_hidden_layers)
    mods = dict(hf.named_modules())
    params = dict(hf.named_parameters())
    block = mapping["blocks"]
    bsubs = _subs(block)
    layers = []
    for layer in range(n_layers):
        prefix = f"{block.name}.{layer}"
        layers.append(LayerLayout(
            attention=_attention(family, bsubs["attn"], prefix, mods, nh, nkv, dh),
            mlp=_mlp(bsubs["mlp"], prefix, mods),
            norms=_block_norms(prefix, block, bsubs["attn"], params),
            attention_out_norm=f"{prefix}.{bsubs['ln1_post'].name}" if "ln1_post" in bsubs else None,
            mlp_out_norm=f"{prefix}.{bsubs['ln2_post'].name}" if "ln2_post" in bsubs else None,
        ))
    seen: dict[str, Linear] = {}
    for lay in layers:
        att, mlp = lay.attention, lay.mlp
        for lin in (att.q, att.k, att.v, att.o, *(i[0] for i in mlp.inputs), mlp.out):
            seen.setdefault(lin.module, lin)
    order = {n: i for i, n in enumerate(params)}
    linears = tuple(sorted(seen.values(), key=lambda lin: order[lin.weight_name]))
    _check_complete(hf, name, block.name, {lin.module for lin in linears})
    embeddings = tuple(f"{mapping[k].name}.weight" for k in ("embed", "pos_embed") if k in mapping)
    unembed = mapping["unembed"].name
    head = mods.get(unembed)
    embed = mods.get(mapping["embed"].name)
    tied = head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0)
    head_weight = getattr(head, "weight", None)
    unembed_weight = next((n for n, p in params.items() if p is head_weight), f"{unembed}.weight")
    return ModelAdapter(
        family=family, bridge_architecture=arch, n_layers=n_layers, n_heads=nh, n_kv_heads=nkv, d_head=dh,
        d_model=d, layers=tuple(layers), blocks=block.name, embeddings=embeddings, unembed=unembed,
        unembed_weight=unembed_weight,
        tied_embeddings=bool(tied), parameter_order=tuple(params),
        norm=_norm_kind(family, block), linears=linears,
        quantized=frozenset(lin.weight_name for lin in linears),
        transposed=frozenset(lin.weight_name for lin in linears if lin.transposed),
    )


def _check_complete(hf: nn.Module, name: str, blocks: str, known: set[str]) -> None:
    """Every linear inside the decoder blocks must be one the adapter placed: a linear it
    does not know (an expert, a router, an adapter layer) would be quantized but belong to
    no component."""
    conv = conv1d_class()
    stray = [n for n, m in hf.named_modules()
             if n.startswith(blocks + ".") and n not in known
             and (isinstance(m, nn.Linear) or (conv is not None and isinstance(m, conv)))]
    if stray:
        raise WorkbenchError(
            f"model {name!r}: linear layers {stray[:3]} inside the decoder blocks belong to no head or MLP "
            "of the TransformerLens layout; the workbench cannot map them to circuit components"
        )
