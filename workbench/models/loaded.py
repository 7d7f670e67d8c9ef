"""A model as the rest of the workbench sees it: :class:`LoadedModel`.

The pristine Hugging Face module (``hf``, eval mode, never modified), its tokenizer, and a
TransformerLens 4 ``TransformerBridge`` booted on a copy of the module tree (``bridge()``),
because booting rewrites the wrapped tree and we keep HF parameter names canonical.

Copies of a model never copy its weights: :func:`sharing_copy` copies the module tree and
points its parameters at the same storage, so a bridge, a quantized variant or an
after-model costs only the tensors that differ from the base (issue 17: memory bounded by
the work, not by the model).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from workbench.core.computed_weight import answer_weight_reads
from workbench.core.device import device_memory_bytes, module_device, working_budget_setting
from workbench.core.errors import WorkbenchError
from workbench.core.sharing import sharing_copy
from workbench.models.adapter import ModelAdapter, build_adapter, check_family
from workbench.quant import QuantConfig

if TYPE_CHECKING:  # only for the annotation: importing transformers costs seconds
    from transformers import PreTrainedModel

# The HF ``model_type`` of every admitted family (``models.adapter.SUPPORTED_FAMILIES``).
Architecture = Literal[
    "gpt2", "gpt_neox", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "olmo2"
]

WORKING_SHARE = 4
"""By default a step of work may take the model's bytes ÷ this beside it
(:meth:`LoadedModel.working_budget_bytes`). A quarter, not the whole: on SmolLM2 in float32 the
default app flow peaked at 3.14× / 3.20× / 3.73× the model (load / attribution / MANSU, under
jemalloc) with the model's bytes as the budget and at 2.71× / 2.69× / 3.36× with 128 MiB, for 8%
more time in MANSU (docs/results/bench.md, issue 17): memory is what keeps real-size models out."""

MIN_WORKING_BYTES = 128 * 2**20
"""The least working memory a step is sized to by default (:meth:`LoadedModel.working_budget_bytes`)."""


def hf_module(model: LoadedModel | torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face module of a :class:`LoadedModel`, or the module itself."""
    return model.hf if isinstance(model, LoadedModel) else model


@dataclass
class LoadedModel:
    """A model ready for the workbench; see the module docstring.

    Attributes:
        name: built-in name, a directory path, or ``"<base>+update"`` for an after-model.
        hf: the Hugging Face causal LM (eval mode). Never modify it in place.
        tokenizer: a fast tokenizer loaded from a directory (TransformerLens needs that).
        path: the HF directory it was loaded from, or ``None`` if built in memory.
    """

    name: str
    hf: PreTrainedModel
    tokenizer: Any
    path: Path | None = None
    _bridge: Any = field(default=None, repr=False)
    _bridge_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _adapter: ModelAdapter | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    # --- shape facts, in the vocabulary attribution and circuits use -------------------
    @property
    def architecture(self) -> Architecture:
        """The HF ``model_type``; a ``WorkbenchError`` saying why for unsupported families."""
        return check_family(self.hf, self.name)  # type: ignore[return-value]

    @property
    def adapter(self) -> ModelAdapter:
        """The weight layout (heads, MLPs, quantized linears), computed once: ``hf`` never changes."""
        if self._adapter is None:
            self._adapter = build_adapter(self.hf, self.name)
        return self._adapter

    @property
    def n_layers(self) -> int:
        return int(self.hf.config.num_hidden_layers)

    @property
    def n_heads(self) -> int:
        return int(self.hf.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.hf.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.hf.config.hidden_size)

    @property
    def d_head(self) -> int:
        return int(getattr(self.hf.config, "head_dim", None) or self.d_model // self.n_heads)

    @property
    def n_ctx(self) -> int:
        cfg = self.hf.config
        return int(getattr(cfg, "n_positions", None) or cfg.max_position_embeddings)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's parameters as stored (a tied weight once): the unit in which the
        workbench bounds its working memory."""
        return sum(p.numel() * p.element_size() for p in self.hf.parameters())  # parameters() yields a tied one once

    def working_budget_bytes(self) -> int:
        """The memory one step of work on this model may take beside it: an attribution pass, a
        chunk of MANSU's gradient kept whole, MANSU's quantized weights outside its circuit held
        as tensors. ``$WORKBENCH_WORKING_MB`` when set (a smaller budget: less memory, more
        passes, the same numbers to float rounding), else a quarter of the model's own bytes
        (:data:`WORKING_SHARE`), at least :data:`MIN_WORKING_BYTES`; on a CUDA device at most
        half of what the model leaves of the device's total memory (its total, not its free
        memory: the same budget at every call, so work sized ahead is sized as the work that
        follows)."""
        setting = working_budget_setting()
        budget = setting if setting is not None else max(self.weight_bytes // WORKING_SHARE, MIN_WORKING_BYTES)
        total = device_memory_bytes(module_device(self.hf))
        return budget if total is None else max(1, min(budget, (total - self.weight_bytes) // 2))

    def reads_quantized_as_codes(self, quant: QuantConfig) -> bool:
        """Whether a quantized variant made to be read (evaluated, attributed), not trained, holds
        the quantized weights it shares with Q(w) as codes
        (:func:`~workbench.quant.compact.compact_quantized_copy`): when, as tensors, they would
        weigh more than :meth:`working_budget_bytes`. The same logits and attributions either
        way (tested); codes cost one dequantization per module and forward."""
        return self.quantized_bytes(quant) > self.working_budget_bytes()

    def quantized_bytes(self, quant: QuantConfig, excluding: Collection[str] = ()) -> int:
        """Bytes of the weights ``quant`` quantizes, as this model stores them, less those named in
        ``excluding``; a tied weight once, under any of its names."""
        names = set(self.adapter.quantizable(quant)) - set(excluding)
        seen: set[int] = set()
        total = 0
        for name, p in self.hf.named_parameters(remove_duplicate=False):
            if name in names and id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total

    def state(self) -> dict[str, torch.Tensor]:
        """The HF parameters by name (the live tensors: read, never write)."""
        return {name: p.detach() for name, p in self.hf.named_parameters()}

    @property
    def fingerprint(self) -> str:
        """Identity of the weights: sha256 over the architecture config and every parameter's
        name, dtype, shape and bytes — all of them, so a sparse edit changes it too.

        Computed once per object: the weights of a LoadedModel are never modified in place
        (an edit is a new object, :meth:`with_state`).
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            cfg = self.hf.config
            for key in ("model_type", "num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size"):
                h.update(f"{key}={getattr(cfg, key, None)};".encode())
            for name, p in self.hf.named_parameters():
                h.update(f"{name}|{p.dtype}|{tuple(p.shape)}".encode())
                h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def weights_hash(self) -> str:
        """Full sha256 of every parameter (for checking the base is untouched)."""
        h = hashlib.sha256()
        for name, p in self.hf.named_parameters():
            h.update(name.encode())
            # as raw bytes: numpy has no bfloat16 (the same bytes, so the same hash, for float32)
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def bridge(self) -> Any:
        """A ``TransformerBridge`` over a deep copy of ``hf`` (booted once, then cached).

        Thread-safe: concurrent app sessions share one bridge per model. Hooks added with
        ``bridge.hooks(...)`` are scoped to their context, so sharing is safe for reading.
        """
        with self._bridge_lock:
            if self._bridge is None:
                from transformer_lens.model_bridge import TransformerBridge

                # The bridge runs where the model is, over the model's own parameters (shared, not
                # copied: the base is read-only everywhere). Families whose bridge splits a joint
                # weight (GPT-2's c_attn, NeoX's query_key_value, Phi-3's qkv/gate_up) hold their
                # own copy of that weight's pieces.
                hf_copy = sharing_copy(self.hf, same_parameters=True)
                # A weight computed at forward (a compact quantized variant) is read by the
                # bridge's components as the weight, not as the placeholder the model holds
                answer_weight_reads(hf_copy)
                # In-memory models have no config.architectures, which the bridge's registry
                # needs for model types it does not map itself (e.g. gemma3_text).
                config: Any = hf_copy.config
                if not getattr(config, "architectures", None):
                    config.architectures = [type(hf_copy).__name__]
                # Booting with a name that is not a hub id is fine: with hf_model given,
                # TransformerLens reads the architecture from the model's own config.
                bridge = TransformerBridge.boot_transformers(
                    f"workbench/{self.architecture}", hf_model=hf_copy, tokenizer=self.tokenizer
                )
                bridge.eval()
                for p in bridge.parameters():
                    p.requires_grad_(False)
                embed = self.hf.get_input_embeddings()
                assert isinstance(embed, torch.nn.Module) and isinstance(embed.weight, torch.Tensor)
                _keep_rotary_in_model_dtype(bridge, embed.weight.dtype)
                self._bridge = bridge
            return self._bridge

    def booted_bridge(self) -> Any | None:
        """The bridge :meth:`bridge` booted, or ``None`` when none was (this never boots one)."""
        return self._bridge

    def with_state(self, new_state: dict[str, torch.Tensor], name: str) -> LoadedModel:
        """A new model: ``hf``'s tree with the parameters named in ``new_state`` replaced.

        Nothing is copied (:func:`sharing_copy`): the new model holds the given tensors (cast to
        each parameter's dtype and device) and shares every other weight with this one. Like
        every LoadedModel it is read-only: neither it nor the given tensors may be modified in
        place afterwards.
        """
        params = dict(self.hf.named_parameters(remove_duplicate=False))
        unknown = sorted(set(new_state) - set(params))
        if unknown:
            raise WorkbenchError(f"parameters not in model {self.name!r}: {unknown[:5]}")
        for key, value in new_state.items():
            if tuple(value.shape) != tuple(params[key].shape):
                raise WorkbenchError(
                    f"{key}: shape {tuple(value.shape)} does not match the model's {tuple(params[key].shape)}"
                )
        hf_copy = sharing_copy(self.hf)
        for key, value in new_state.items():
            p = hf_copy.get_parameter(key)
            p.data = value.detach().to(device=p.device, dtype=p.dtype)
        return self.with_tree(hf_copy, name)

    def with_tree(self, hf_copy: Any, name: str) -> LoadedModel:
        """A new model over ``hf_copy``, a copy of this model's tree (same modules and shapes:
        the layout carries over); read-only like every LoadedModel."""
        return LoadedModel(name=name, hf=hf_copy, tokenizer=self.tokenizer, path=None, _adapter=self._adapter)


def _keep_rotary_in_model_dtype(bridge: Any, dtype: torch.dtype) -> None:
    """Give a 16-bit model's rotated queries and keys back their dtype inside the bridge.

    Hugging Face's rotary step returns ``q``/``k`` in their own dtype; the bridge applies Llama's
    formula, which keeps whatever dtype ``cos``/``sin`` have. Families that hand it float32
    ``cos``/``sin`` (OLMo-2) then get float32 scores and a float32 pattern against 16-bit values,
    and the bridge's forward fails. Casting the rotated tensors back (a permanent hook, which
    the attribution's scoped hooks leave alone) is the step Hugging Face takes, so the bridge
    computes what the model computes. Nothing to do in float32, or where they already match."""
    if dtype not in (torch.bfloat16, torch.float16):
        return

    def cast(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        return tensor.to(dtype)

    points = {id(p): p for n, p in bridge.hook_dict.items() if n.endswith(("attn.hook_rot_q", "attn.hook_rot_k"))}
    for point in points.values():  # once per hook point (the dict may list one under two names)
        point.add_hook(cast, is_permanent=True)
