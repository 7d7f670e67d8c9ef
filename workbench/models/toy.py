"""Small randomly initialised models for tests and benchmarks (nothing downloaded).

Every family the workbench supports (``models.adapter.SUPPORTED_FAMILIES``) can be built
from its ``transformers`` config class; ``"gemma3"`` is accepted for ``"gemma3_text"``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workbench.core.errors import WorkbenchError
from workbench.models.adapter import SUPPORTED_FAMILIES
from workbench.models.loaded import LoadedModel
from workbench.models.training import word_tokenizer

if TYPE_CHECKING:  # only for the annotation: importing transformers costs seconds
    from transformers import PreTrainedModel

_ALIASES = {"gemma3": "gemma3_text", "neox": "gpt_neox", "pythia": "gpt_neox"}
# Families without grouped-query attention in their config.
_NO_GQA = ("gpt2", "gpt_neox")
_OWN_HEAD_DIM = ("qwen3", "gemma2", "gemma3_text")
"""Families whose config takes a head width of its own (``toy_model(d_head=)``)."""


def toy_model(
    architecture: str = "gpt2",
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_mlp: int | None = None,
    d_head: int | None = None,
    vocab: list[str] | None = None,
    n_ctx: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """A randomly initialised model of one supported family with a word-level tokenizer.

    For tests and benchmarks (e.g. a 12-layer GPT-2-small-shaped model); nothing is
    downloaded. ``architecture`` is an HF ``model_type`` (``gpt2``, ``gpt_neox``, ``llama``,
    ``qwen2``, ``qwen3``, ``mistral``, ``gemma2``, ``gemma3``, ``phi3``, ``olmo2``).
    ``vocab`` defaults to ``w0 … w99``; ``n_kv_heads`` < ``n_heads`` gives grouped-query
    attention (not GPT-2 or GPT-NeoX). ``d_head`` other than ``d_model // n_heads``: Qwen3 and
    Gemma only (their configs carry it). ``dtype``: the weights' storage dtype, initialised in it
    directly (a 1B-parameter model never exists in float32 first).
    """
    family = _ALIASES.get(architecture, architecture)
    if family not in SUPPORTED_FAMILIES:
        raise WorkbenchError(f"unknown architecture {architecture!r}; use one of {', '.join(SUPPORTED_FAMILIES)}")
    if family in _NO_GQA and n_kv_heads not in (None, n_heads):
        raise WorkbenchError(f"{SUPPORTED_FAMILIES[family]} has no grouped-query attention")
    if d_model % n_heads:
        raise WorkbenchError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
    if d_head not in (None, d_model // n_heads) and family not in _OWN_HEAD_DIM:
        raise WorkbenchError(f"a head width other than d_model / n_heads needs one of {', '.join(_OWN_HEAD_DIM)}")
    words = vocab or [f"w{i}" for i in range(100)]
    tok_dir = Path(tempfile.mkdtemp(prefix="workbench-toy-tok-"))
    tokenizer = word_tokenizer(words, tok_dir)
    shape = _Shape(len(tokenizer), n_layers, d_model, n_heads, n_kv_heads or n_heads, d_mlp or 4 * d_model, n_ctx,
                   tokenizer.eos_token_id, tokenizer.pad_token_id, d_head or d_model // n_heads)
    torch.manual_seed(seed)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        hf = _build(family, shape)
    finally:
        torch.set_default_dtype(saved)
    config: Any = hf.config
    config._attn_implementation = "eager"
    config.architectures = [type(hf).__name__]
    hf.eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    name = f"toy-{architecture}-L{n_layers}-d{d_model}-h{n_heads}" + (f"-kv{n_kv_heads}" if n_kv_heads else "")
    name += f"-dh{d_head}" if d_head not in (None, d_model // n_heads) else ""
    return LoadedModel(name=name, hf=hf, tokenizer=tokenizer, path=None)


class _Shape:
    def __init__(self, vocab: int, n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, d_mlp: int,
                 n_ctx: int, eos: int, pad: int | None, d_head: int) -> None:
        self.vocab, self.n_layers, self.d_model, self.n_heads = vocab, n_layers, d_model, n_heads
        self.n_kv_heads, self.d_mlp, self.n_ctx, self.eos, self.pad = n_kv_heads, d_mlp, n_ctx, eos, pad
        self.d_head = d_head

    def decoder(self) -> dict[str, Any]:
        """The config keywords every Llama-like family shares."""
        return dict(vocab_size=self.vocab, hidden_size=self.d_model, intermediate_size=self.d_mlp,
                    num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                    num_key_value_heads=self.n_kv_heads, max_position_embeddings=self.n_ctx,
                    bos_token_id=self.eos, eos_token_id=self.eos, pad_token_id=self.pad)


def _build(family: str, s: _Shape) -> PreTrainedModel:
    import transformers as tf

    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=s.vocab, n_positions=s.n_ctx, n_embd=s.d_model, n_layer=s.n_layers, n_head=s.n_heads,
            n_inner=s.d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=s.eos,
            eos_token_id=s.eos))
    if family == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            vocab_size=s.vocab, hidden_size=s.d_model, num_hidden_layers=s.n_layers, num_attention_heads=s.n_heads,
            intermediate_size=s.d_mlp, max_position_embeddings=s.n_ctx, hidden_dropout=0.0,
            attention_dropout=0.0,  # rotary on 25% of dims: the default, as Pythia
            bos_token_id=s.eos, eos_token_id=s.eos))
    head_dim = {"head_dim": s.d_head}
    builders: dict[str, tuple[Any, Any, dict[str, Any]]] = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}),
        # Gemma's sliding window and soft-capping stay at their defaults; the window is
        # wider than the toy's context.
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, head_dim),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, head_dim),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"resid_pdrop": 0.0, "embd_pdrop": 0.0}),
        "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, {}),
    }
    config_cls, model_cls, extra = builders[family]
    return model_cls(config_cls(**s.decoder(), **extra))
