"""Tiny random Llama / GPT-2 causal LMs (2 layers, 32 wide) and their transformer-lens 3 bridges, for the
tests of :mod:`saetune.hooked` and hook-name resolution. No network: configs only, the toy's tokenizer."""

from __future__ import annotations

import copy

import torch

N_LAYERS = 2
D_MODEL = 32


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from saetune.toy import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=None, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval(), tok


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    from saetune.toy import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), tok


def bridge_of(model, name: str):
    """A ``TransformerBridge`` over a deep copy of ``model`` (booting wraps the HF modules in place), eval mode.

    Each bridge gets a fresh tokenizer: transformer-lens rewires the one it is given.
    """
    from transformer_lens.model_bridge import TransformerBridge

    from saetune.toy import build_tokenizer

    return TransformerBridge.boot_transformers(name, hf_model=copy.deepcopy(model), tokenizer=build_tokenizer()).eval()


def hook_counts(model) -> dict[str, tuple[int, int, int]]:
    """Per module: torch forward hooks, forward pre-hooks, and TL hooks (HookPoint.fwd_hooks); zeros left out."""
    out = {}
    for name, m in model.named_modules():
        n = (len(m._forward_hooks), len(m._forward_pre_hooks), len(getattr(m, "fwd_hooks", None) or ()))
        if any(n):
            out[name] = n
    return out
