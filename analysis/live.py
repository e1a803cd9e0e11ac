"""On-demand views that need the live model: a prompt's feature activations and entropy.

The explorer calls these only when asked (the "try a prompt" box, a feature overlay on a
trace); the model and SAE are loaded by the caller, once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch


@torch.no_grad()
def prompt_activations(model, tokenizer, sae, hook: str, text: str, top_n: int = 5,
                       add_special_tokens: bool = True) -> dict[str, Any]:
    """Run ``text`` once: per-token next-token entropy and the SAE's feature activations.

    Returns ``tokens`` [T], ``ids`` [T], ``entropy`` [T] (nats, of the distribution predicting
    the next token), ``acts`` [T, d_sae] float32 numpy, and ``table``: one row per token with its
    ``top_n`` features.
    """
    from saetune.models import capture, resolve_hook
    from saetune.rl.entropy import token_entropy

    hp = resolve_hook(model, hook)
    device = next(model.parameters()).device
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    x = torch.tensor([ids], device=device)
    with capture(model, [hp]) as acts:
        logits = model(input_ids=x, use_cache=False).logits[0]  # [T, V]
    f = sae.to(device).encode(acts[hp.name][0].float()).float().cpu().numpy()  # [T, F]
    ent = token_entropy(logits.float()).cpu().numpy()  # [T]
    from .feature_build import token_texts
    tokens = token_texts(tokenizer, ids)
    rows = []
    for t in range(len(ids)):
        top = np.argsort(-f[t], kind="stable")[:top_n]
        rows.append({"position": t, "token": tokens[t], "entropy": float(ent[t]),
                     "active": int((f[t] > 0).sum()),
                     "top_features": ", ".join(f"{j}: {f[t, j]:.2f}" for j in top if f[t, j] > 0)})
    return {"tokens": tokens, "ids": ids, "entropy": ent, "acts": f, "table": pd.DataFrame(rows)}


def top_features_of_prompt(acts: np.ndarray, n: int = 20) -> pd.DataFrame:
    """Features with the largest activation anywhere in the prompt: feature, max_act, n_tokens."""
    mx = acts.max(0)
    order = np.argsort(-mx, kind="stable")[:n]
    order = order[mx[order] > 0]
    return pd.DataFrame({"feature": order, "max_act": mx[order], "n_tokens": (acts[:, order] > 0).sum(0)})


@torch.no_grad()
def response_feature_acts(model, sae, hook: str, prompt_ids: list[int], response_ids: list[int],
                          feature: int) -> np.ndarray:
    """Activation of one SAE feature at each response token of a trace (prompt as context)."""
    from saetune.models import resolve_hook, run_to_hooks

    hp = resolve_hook(model, hook)
    device = next(model.parameters()).device
    x = torch.tensor([list(prompt_ids) + list(response_ids)], device=device)
    a = run_to_hooks(model, x, [hp])[hp.name][0, len(prompt_ids):].float()  # [R, d]
    return sae.to(device).encode(a)[:, feature].cpu().numpy()
