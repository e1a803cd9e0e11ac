"""Reasoning features: SAE features that fire on both ``<think>`` and ``</think>`` and on no
other prompt token, counted per layer, and the Gaussian-mixture summary over layers (Resa §5).

Resa feeds the R1 system prompt (it holds ``<think> </think>`` twice) through the model with an
SAE at every layer and counts, per layer, the features with

    a_open  = max over <think> positions  of f_i  > τ
    a_close = max over </think> positions of f_i  > τ
    a_other = max over every other prompt position of f_i ≤ τ

Resa publishes no threshold τ, so it is a parameter here (default 0: "fires" = positive). A
tag that the tokenizer splits into several tokens counts at each of its pieces. BOS and other
special tokens that are not the tags are left out of "other" (BOS activations are attention-sink
outliers). The counts are tri-modal over depth in the paper; a 3-component Gaussian mixture
over the layer index (each layer weighted by its count) gives means ≈ 4.9 / 14.5 / 22.7 there.

:func:`reasoning_feature_records` is the one function that runs a model; it stores
``(feature, a_open, a_close, a_other)`` for every feature positive on both tags, which is
enough to recount at any τ ≥ 0 without the model (:func:`reasoning_counts`,
:func:`threshold_sweep`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from saetune.errors import SaetuneError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def tag_positions(text: str, offsets: list[tuple[int, int]], tag: str) -> list[int]:
    """Token positions whose character span overlaps an occurrence of ``tag`` in ``text``."""
    spans, i = [], text.find(tag)
    while i >= 0:
        spans.append((i, i + len(tag)))
        i = text.find(tag, i + 1)
    return [t for t, (a, b) in enumerate(offsets) if b > a and any(a < e and b > s for s, e in spans)]


def reasoning_feature_rows(acts: np.ndarray, open_pos: list[int], close_pos: list[int],
                           other_mask: np.ndarray) -> np.ndarray:
    """Rows ``[feature, a_open, a_close, a_other]`` of every feature positive on both tags.

    ``acts`` [T, F] feature activations over the prompt; ``other_mask`` [T] marks the positions
    that count as "other prompt tokens". Returns a float array [n, 4].
    """
    if not open_pos or not close_pos:
        raise SaetuneError(f"the prompt must contain both {THINK_OPEN} and {THINK_CLOSE}; found "
                           f"{len(open_pos)} and {len(close_pos)} token(s)")
    a_open = acts[open_pos].max(0)
    a_close = acts[close_pos].max(0)
    a_other = acts[other_mask].max(0) if other_mask.any() else np.zeros(acts.shape[1], acts.dtype)
    keep = np.flatnonzero((a_open > 0) & (a_close > 0))
    return np.stack([keep.astype(np.float64), a_open[keep], a_close[keep], a_other[keep]], 1) if len(keep) \
        else np.zeros((0, 4))


def is_reasoning(a_open, a_close, a_other, threshold: float = 0.0):
    """The rule: above ``threshold`` on both tags and not above it on any other prompt token."""
    a_open, a_close, a_other = (np.asarray(x, dtype=np.float64) for x in (a_open, a_close, a_other))
    return (a_open > threshold) & (a_close > threshold) & (a_other <= threshold)


def reasoning_feature_records(model, tokenizer, saes: dict[str, Any], prompt: str | None = None) -> dict[str, Any]:
    """Run ``prompt`` (default: the R1-Zero system prompt) once and record, per SAE hook, the
    features positive on both tags with their three maxima (see the module docstring)."""
    import torch
    from saetune.data import R1_ZERO_SYSTEM
    from saetune.models import resolve_hook, run_to_hooks

    text = prompt or R1_ZERO_SYSTEM
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
        ids = enc["input_ids"]
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        open_pos, close_pos = tag_positions(text, offsets, THINK_OPEN), tag_positions(text, offsets, THINK_CLOSE)
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets: match the tags as tokens
        ids = tokenizer(text)["input_ids"]
        o, c = tokenizer.convert_tokens_to_ids(THINK_OPEN), tokenizer.convert_tokens_to_ids(THINK_CLOSE)
        open_pos = [t for t, i in enumerate(ids) if i == o]
        close_pos = [t for t, i in enumerate(ids) if i == c]
    tags = set(open_pos) | set(close_pos)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    other = np.array([t not in tags and ids[t] not in special for t in range(len(ids))])
    hooks = {h: resolve_hook(model, h) for h in saes}
    device = next(model.parameters()).device
    acts = run_to_hooks(model, torch.tensor([ids], device=device), list(hooks.values()))
    from .feature_build import token_texts
    out = {"prompt": text, "tokens": token_texts(tokenizer, ids), "open_positions": open_pos,
           "close_positions": close_pos, "other_positions": np.flatnonzero(other).tolist(), "hooks": {}}
    for h, sae in saes.items():
        with torch.no_grad():
            f = sae.to(device).encode(acts[hooks[h].name][0].float()).cpu().numpy()  # [T, F]
        rows = reasoning_feature_rows(f, open_pos, close_pos, other)
        out["hooks"][h] = {"layer": hooks[h].layer, "d_sae": int(sae.cfg.d_sae),
                           "features": [[int(r[0]), *(float(f"{x:.5g}") for x in r[1:])] for r in rows]}
    return out


def reasoning_feature_table(records: dict[str, Any], hook: str, threshold: float = 0.0) -> pd.DataFrame:
    """Features of ``hook`` positive on both tags, with whether they pass the rule at ``threshold``."""
    rows = (records.get("hooks") or {}).get(hook, {}).get("features", [])
    df = pd.DataFrame(rows, columns=["feature", "act_think", "act_end_think", "max_other"])
    df["feature"] = df["feature"].astype(int)
    df["reasoning"] = is_reasoning(df["act_think"], df["act_end_think"], df["max_other"], threshold)
    return df.sort_values(["reasoning", "act_think"], ascending=False).reset_index(drop=True)


def reasoning_counts(records: dict[str, Any], threshold: float = 0.0) -> pd.DataFrame:
    """Reasoning features per hook at ``threshold``: columns hook, layer, count, d_sae (by layer)."""
    if threshold < 0:
        raise SaetuneError(f"threshold must be ≥ 0 (only features positive on both tags are stored), got {threshold}")
    rows = []
    for h, r in (records.get("hooks") or {}).items():
        feats = np.asarray(r.get("features") or np.zeros((0, 4)), dtype=np.float64).reshape(-1, 4)
        n = int(is_reasoning(feats[:, 1], feats[:, 2], feats[:, 3], threshold).sum())
        rows.append({"hook": h, "layer": int(r.get("layer", -1)), "count": n, "d_sae": r.get("d_sae")})
    return pd.DataFrame(rows, columns=["hook", "layer", "count", "d_sae"]).sort_values("layer").reset_index(drop=True)


def threshold_sweep(records: dict[str, Any], thresholds) -> pd.DataFrame:
    """Counts per hook for each threshold (long format: threshold, hook, layer, count)."""
    parts = [reasoning_counts(records, float(t)).assign(threshold=float(t)) for t in thresholds]
    return pd.concat(parts, ignore_index=True)[["threshold", "hook", "layer", "count"]] if parts else \
        pd.DataFrame(columns=["threshold", "hook", "layer", "count"])


def passing_bands(records: dict[str, Any]) -> pd.DataFrame:
    """Every feature that is a reasoning feature at *some* threshold, and the band of τ where it is.

    The rule holds exactly for ``a_other ≤ τ < min(a_open, a_close)``, so a feature passes somewhere iff
    ``a_other < min(a_open, a_close)``; at the default τ = 0 only features silent on every other prompt
    token pass. Columns hook, layer, feature, tau_from, tau_to (by layer, then feature).
    """
    rows = []
    for h, r in (records.get("hooks") or {}).items():
        for f, a_open, a_close, a_other in np.asarray(r.get("features") or np.zeros((0, 4)), float).reshape(-1, 4):
            if a_other < min(a_open, a_close):
                rows.append({"hook": h, "layer": int(r.get("layer", -1)), "feature": int(f),
                             "tau_from": float(a_other), "tau_to": float(min(a_open, a_close))})
    cols = ["hook", "layer", "feature", "tau_from", "tau_to"]
    return pd.DataFrame(rows, columns=cols).sort_values(["layer", "feature"]).reset_index(drop=True)


def bands_sentence(records: dict[str, Any], threshold: float) -> str:
    """What the page says under the counts: the count at ``threshold`` and where any feature passes at all."""
    n = int(reasoning_counts(records, threshold)["count"].sum())
    bands = passing_bands(records)
    head = f"{n} reasoning feature{'s' if n != 1 else ''} at τ = {threshold:g}"
    if bands.empty:
        return head + "; no feature passes the rule at any τ (each one positive on both tags fires at least as " \
                      "strongly on another prompt token)."
    spans = "; ".join(f"feature {b.feature} at `{b.hook}` for {b.tau_from:.3g} ≤ τ < {b.tau_to:.3g}"
                      for b in bands.itertuples())
    return head + f". Features that pass at some τ: {spans}."


def fit_gmm_1d(x, weights=None, n_components: int = 3, iters: int = 500, min_std: float = 0.5,
               tol: float = 1e-9) -> dict[str, list[float]]:
    """Weighted 1-D Gaussian mixture by EM (deterministic: means start at weighted quantiles).

    Returns ``{"means", "stds", "weights"}`` sorted by mean, and ``loglik`` (per unit weight).
    ``min_std`` floors each σ (layers are integers: a component on one layer would collapse).
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
    keep = w > 0
    x, w = x[keep], w[keep]
    if len(np.unique(x)) < n_components:
        raise SaetuneError(f"a {n_components}-component mixture needs at least {n_components} distinct layers "
                           f"with a non-zero count; got {len(np.unique(x))}")
    w = w / w.sum()
    order = np.argsort(x)
    cdf = np.cumsum(w[order])
    mu = np.array([x[order][np.searchsorted(cdf, (j + 0.5) / n_components)] for j in range(n_components)], float)
    sd = np.full(n_components, max(np.sqrt(np.sum(w * (x - np.sum(w * x)) ** 2)) / n_components, min_std))
    pi = np.full(n_components, 1.0 / n_components)
    prev = -np.inf
    for _ in range(iters):
        logp = -0.5 * ((x[:, None] - mu) / sd) ** 2 - np.log(sd * math.sqrt(2 * math.pi)) + np.log(pi)  # [n, K]
        m = logp.max(1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(logp - m).sum(1))
        ll = float(np.sum(w * lse))
        r = np.exp(logp - lse[:, None]) * w[:, None]  # responsibilities × sample weight
        nk = r.sum(0) + 1e-300
        pi = nk / nk.sum()
        mu = (r * x[:, None]).sum(0) / nk
        sd = np.maximum(np.sqrt((r * (x[:, None] - mu) ** 2).sum(0) / nk), min_std)
        if ll - prev < tol:
            break
        prev = ll
    o = np.argsort(mu)
    return {"means": mu[o].tolist(), "stds": sd[o].tolist(), "weights": pi[o].tolist(), "loglik": ll}


def layer_gmm(counts: pd.DataFrame, n_components: int = 3) -> dict[str, list[float]]:
    """Resa's summary: a mixture over the layer index, each layer weighted by its count."""
    return fit_gmm_1d(counts["layer"].to_numpy(), counts["count"].to_numpy(), n_components)


def gmm_density(gmm: dict[str, list[float]], xs) -> np.ndarray:
    """The mixture's density at ``xs`` (for plotting over the layer axis)."""
    xs = np.asarray(xs, dtype=np.float64)[:, None]
    mu, sd, pi = (np.asarray(gmm[k]) for k in ("means", "stds", "weights"))
    return (pi * np.exp(-0.5 * ((xs - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))).sum(1)
