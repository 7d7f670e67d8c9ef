"""Small randomly initialised models for tests and benchmarks (nothing downloaded).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from workbench.core.errors import WorkbenchError
from workbench.models.loaded import Architecture, LoadedModel
from workbench.models.training import word_tokenizer


def toy_model(
    architecture: Architecture = "gpt2",
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_mlp: int | None = None,
    vocab: list[str] | None = None,
    n_ctx: int = 64,
    seed: int = 0,
) -> LoadedModel:
    """A randomly initialised GPT-2, GPT-NeoX or Llama model with a word-level tokenizer.

    For tests and benchmarks (e.g. a 12-layer GPT-2-small-shaped model); nothing is
    downloaded. ``vocab`` defaults to ``w0 … w99``; ``n_kv_heads`` < ``n_heads`` gives
    grouped-query attention (Llama only).
    """
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    words = vocab or [f"w{i}" for i in range(100)]
    tok_dir = Path(tempfile.mkdtemp(prefix="workbench-toy-tok-"))
    tokenizer = word_tokenizer(words, tok_dir)
    d_mlp = d_mlp or 4 * d_model
    torch.manual_seed(seed)
    if architecture == "gpt2":
        if n_kv_heads not in (None, n_heads):
            raise WorkbenchError("GPT-2 has no grouped-query attention")
        cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=n_ctx, n_embd=d_model, n_layer=n_layers,
                         n_head=n_heads, n_inner=d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        hf = GPT2LMHeadModel(cfg)
    elif architecture == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=d_model, num_hidden_layers=n_layers,
                            num_attention_heads=n_heads, intermediate_size=d_mlp, max_position_embeddings=n_ctx,
                            hidden_dropout=0.0, attention_dropout=0.0,  # rotary on 25% of dims: the default, as Pythia
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        hf = GPTNeoXForCausalLM(cfg)
    elif architecture == "llama":
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp,
                          num_hidden_layers=n_layers, num_attention_heads=n_heads,
                          num_key_value_heads=n_kv_heads or n_heads, max_position_embeddings=n_ctx,
                          bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        hf = LlamaForCausalLM(cfg)
    else:
        raise WorkbenchError(f"unknown architecture {architecture!r}; use gpt2, gpt_neox or llama")
    hf.config._attn_implementation = "eager"
    hf.eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    name = f"toy-{architecture}-L{n_layers}-d{d_model}-h{n_heads}" + (f"-kv{n_kv_heads}" if n_kv_heads else "")
    return LoadedModel(name=name, hf=hf, tokenizer=tokenizer, path=None)
