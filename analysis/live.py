"""On-demand views that need the live model: a prompt's feature activations and entropy, and a
(steered) continuation with the features of every generated token.

The explorer calls these only when asked (the "try a prompt" box, a feature overlay on a
trace); the model and SAE are loaded by the caller, once. The SAE is read (and, for a steered
continuation, its latents are edited) by :mod:`saetune.steering`, the same code the ``attach``
verb and notebooks use.
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
    from saetune.rl.entropy import token_entropy
    from saetune.steering import intervene

    device = next(model.parameters()).device
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    x = torch.tensor([ids], device=device)
    with intervene(model, sae.to(device), hook, mode="record", top_k=top_n, keep_acts=True) as rec:
        logits = model(input_ids=x, use_cache=False).logits[0]  # [T, V]
    f = rec.acts(0).numpy()  # [T, F]
    ent = token_entropy(logits.float()).cpu().numpy()  # [T]
    from .feature_build import token_texts
    tokens = token_texts(tokenizer, ids)
    return {"tokens": tokens, "ids": ids, "entropy": ent, "acts": f, "table": _feature_table(tokens, f, top_n, ent)}


def _feature_table(tokens: list[str], f: np.ndarray, top_n: int, entropy: np.ndarray | None = None,
                   steered: set[int] | None = None, start: int = 0) -> pd.DataFrame:
    rows = []
    for t in range(len(tokens)):
        top = np.argsort(-f[t], kind="stable")[:top_n]
        row: dict[str, Any] = {"position": start + t, "token": tokens[t]}
        if entropy is not None:
            row["entropy"] = float(entropy[t])
        if steered is not None:
            row["steered"] = start + t in steered
        row.update(active=int((f[t] > 0).sum()),
                   top_features=", ".join(f"{j}: {f[t, j]:.2f}" for j in top if f[t, j] > 0))
        rows.append(row)
    return pd.DataFrame(rows)


@torch.no_grad()
def steered_continuation(model, tokenizer, sae, hook: str, text: str, edits=None, schedule=None,
                         max_new_tokens: int = 32, top_n: int = 5, add_special_tokens: bool = True) -> dict[str, Any]:
    """Generate greedily from ``text`` with the SAE at ``hook``, its latents edited by ``edits`` (``{latent: value}``
    clamps, or :func:`saetune.steering.clamp` / ``add``) on ``schedule`` (:class:`saetune.steering.Schedule`;
    default: every position) — no edits: a plain continuation that records.

    Returns ``response`` (text), ``tokens`` and ``ids`` of the generated tokens, ``acts`` [R, d_sae] float32 numpy
    (the top-``top_n`` latents of each generated token, dense; the rest 0), ``steered`` (which generated tokens were
    produced under the edit), and ``table``: one row per generated token (absolute ``position``) with its features.
    """
    from saetune.steering import generate

    from .feature_build import token_texts
    prompt = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    row = generate(model, tokenizer, prompt, sae.to(next(model.parameters()).device), edits=edits,
                   schedule=schedule, hook=hook, max_new_tokens=max_new_tokens, top_k=top_n)[0]
    P, R = len(row.prompt_ids), len(row.response_ids)
    f = np.zeros((R, sae.d_sae), dtype=np.float32)
    for j in range(R):
        for latent, a in row.features.get(P + j, []):
            f[j, latent] = a
    tokens = token_texts(tokenizer, row.response_ids)
    produced = {p + 1 for p in row.steered}  # position p's output is the token at p + 1
    return {"response": row.text, "tokens": tokens, "ids": row.response_ids, "acts": f,
            "steered": np.array([P + j in produced for j in range(R)], dtype=bool),
            "table": _feature_table(tokens, f, top_n, steered=produced, start=P)}


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
