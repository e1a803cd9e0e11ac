"""The toy model: a 4-layer, 128-wide ``Qwen2ForCausalLM`` (about 1M parameters).

It is a real Hugging Face architecture (RMSNorm, RoPE, grouped-query attention with 2 KV heads
per 4 query heads, SwiGLU MLP, tied embeddings), so everything built for Qwen-family reasoning
models - hooks, SAEs, LoRA, generation - runs on it unchanged, in seconds on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from ..errors import SaetuneError

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def toy_config(vocab_size: int, *, eos_token_id: int = 0, pad_token_id: int = 0,
               attn_implementation: str = "sdpa", **overrides: Any) -> Qwen2Config:
    """A ``Qwen2Config`` for the toy model; ``overrides`` replace any field (e.g. ``num_hidden_layers``)."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise SaetuneError(f"attn_implementation {attn_implementation!r} is not supported for the toy "
                           f"model; valid choices: {', '.join(ATTN_IMPLEMENTATIONS)}")
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        attention_dropout=0.0,
        use_sliding_window=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    fields.update(overrides)
    cfg = Qwen2Config(**fields)
    cfg._attn_implementation = attn_implementation
    return cfg


def build_model(tokenizer: PreTrainedTokenizerBase, seed: int, **config_overrides: Any) -> Qwen2ForCausalLM:
    """A randomly initialised toy model; the same ``seed`` gives the same weights.

    The caller's global torch RNG is left as it was (initialisation runs in a forked RNG).
    """
    cfg = toy_config(len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    return model.float()
