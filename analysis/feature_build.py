"""``saetune features``: precompute what the explorer shows for every SAE feature.

For an SAE, its model and a dataset this writes, per hook point, the record OpenAI's
sae-viewer and SAE-Dashboard show for each latent:

- firing density and mean / max activation (over tokens where it fires), an activation
  histogram (``hist_bins`` equal bins on (0, max]);
- top-activating contexts and quantile-group samples (the firing tokens split into
  ``n_quantiles`` equal-count groups by activation, ``n_per_quantile`` drawn from each), every
  context with this feature's activation at each of its tokens;
- top ± direct logit effects: the decoder direction scaled by the final norm's weight and
  read through the unembedding, ``(W_dec[i] ⊙ γ) · W_Uᵀ`` (it ignores the layers after the
  hook, as these dashboards do);
- nearest features by decoder cosine and by co-activation (Jaccard index of the firing sets).

Statistics exclude special tokens (BOS, EOS/pad, chat-template and other added special tokens:
``tokenizer.all_special_ids``), any ``exclude_tokens`` and the first position of each packed
chunk (no context; an attention sink): they distort density and top examples. Excluded tokens
still appear, with their activation, inside the contexts shown.

On-disk layout (``<run>/features/``; :mod:`saetune.analysis.feature_data` reads it lazily)::

    features/<hook>/meta.json            format, hook, d_sae, token counts, settings, sources
    features/<hook>/stats.safetensors    per-feature arrays, first dim d_sae:
        count [F] i64, density [F] f32, mean_act [F] f32, max_act [F] f32,
        hist [F, hist_bins] i32 (bin b covers (b, b+1]·max_act/hist_bins),
        logit_pos_ids / logit_neg_ids [F, n_logits] i32, logit_pos / logit_neg [F, n_logits] f32,
        dec_nn_ids [F, n_neighbours] i32, dec_nn_cos [F, n_neighbours] f32,
        coact_nn_ids [F, n_neighbours] i32 (−1 = none), coact_nn_jaccard [F, n_neighbours] f32,
        top_token_ids [F, 8] i32: the tokens its top contexts peak on, most frequent first (−1 pad)
    features/<hook>/examples.jsonl       one JSON object per feature, in id order:
        {"feature": i, "top": [EX, …], "quantiles": [{"lo", "hi", "n", "examples": [EX, …]}, …]}
        EX = {"ids": [token ids], "acts": [activation per token], "peak": index of the token,
              "act": its activation, "seq": chunk index, "pos": position in the chunk}
    features/<hook>/examples.index.npy   int64 [F + 1] byte offsets of each line (seek, read one)
    features/<hook>/tokens.json          {token id: text} for every id the files above use, as the
                                         token reads after another (its leading space kept)
    features/reasoning.json              think-token features per hook (see reasoning_features)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saetune.config import opt
from saetune.data import DataConfig
from saetune.errors import SaetuneError

from .feature_data import FORMAT, VERSION
from .rundirs import find_saes, recorded_model
TOP_TOKENS = 8


@dataclass
class FeaturesConfig(DataConfig):
    """``saetune features``: per-feature explorer data (density, histograms, contexts, logits, neighbours)."""

    sae: str = opt("", "SAE to describe: a train-sae run dir, an SAE dir (SAELens or sparsify layout), or a dir "
                       "of per-hook SAE dirs")
    hook: list[str] = opt(factory=list, help="hooks to describe when the SAE dir holds several (default: all)")
    model: str = opt("", "model the SAE reads (default: the one recorded with the SAE)")
    dataset: str = opt("", "'toy', a local .jsonl/.json/.parquet file, or a Hugging Face dataset id; '' = the "
                           "dataset (and template, fields, context size) the SAE was trained on, else 'toy'")
    max_examples: int = opt(3000, "records to read (0 = all; for 'toy', how many traces to make)")
    data_seed: int = opt(1, "seed of the toy traces (the demo SAE trains on seed 0, so 1 is held out)")
    n_tokens: int = opt(65536, "tokens to analyse (whole packed chunks, at most this many)")
    batch_size: int = opt(32, "sequences per forward pass")
    max_active: int = opt(64, "non-TopK SAEs: keep at most this many active latents per token")
    exclude_special: bool = opt(True, "leave BOS, EOS/pad and other special (chat-template) tokens and each "
                                      "chunk's first position out of the statistics")
    exclude_tokens: list[str] = opt(factory=list, help="more token strings to leave out of the statistics")
    hist_bins: int = opt(32, "activation histogram bins")
    n_top: int = opt(20, "top-activating contexts per feature")
    n_quantiles: int = opt(4, "quantile groups of the firing tokens")
    n_per_quantile: int = opt(5, "contexts sampled from each quantile group")
    context_before: int = opt(12, "tokens of context before the peak token")
    context_after: int = opt(4, "tokens of context after the peak token")
    n_logits: int = opt(10, "top positive and negative logit effects per feature")
    n_neighbours: int = opt(10, "nearest features by decoder cosine and by co-activation")
    coact_tokens: int = opt(0, "tokens used for co-activation (0 = all analysed tokens)")
    reasoning_prompt: str = opt("", "prompt for the think-token (reasoning) features; '' = the R1-Zero system "
                                    "prompt, which holds <think> and </think>")
    reasoning_threshold: float = opt(0.0, "activation a reasoning feature must exceed on <think> and </think> "
                                          "and not exceed elsewhere (the summary; the explorer can vary it)")
    device: str = opt("auto", "'auto', 'cpu', 'cuda', 'cuda:1', …")
    model_dtype: str = opt("float32", "model weights dtype")
    seed: int = opt(0, "seed of the quantile samples")
    progress: bool = opt(True, "print progress")

    def __post_init__(self):
        for name in ("n_tokens", "batch_size", "max_active", "hist_bins", "n_top", "n_quantiles", "n_logits",
                     "n_neighbours"):
            if getattr(self, name) < 1:
                raise SaetuneError(f"features: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("n_per_quantile", "context_before", "context_after", "coact_tokens"):
            if getattr(self, name) < 0:
                raise SaetuneError(f"features: {name} must be ≥ 0, got {getattr(self, name)}")


# ---- resolving inputs ---------------------------------------------------------------------

def excluded_token_ids(tokenizer, extra: list[str] = ()) -> set[int]:
    """Special tokens (BOS, EOS, pad, chat-template markers) plus the ids of ``extra`` strings."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            ids.add(v)
    for s in extra:
        tid = tokenizer.convert_tokens_to_ids(s)
        if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
            enc = tokenizer(s, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise SaetuneError(f"exclude_tokens: {s!r} is not one token of this tokenizer (it encodes to {enc})")
            tid = enc[0]
        ids.add(int(tid))
    return ids


def token_strings(tokenizer, ids) -> dict[int, str]:
    """Each id's text as it reads after another token, leading space included when it has one.

    Decoding one id alone loses that space for word-level tokenizers (the toy's) and
    SentencePiece ones; decoding it after a reference token and cutting the reference off keeps
    it (``decode([r, t])[len(decode([r])):]``), so BPE, SentencePiece and word-level tokens all
    read right when concatenated.
    """
    ids = sorted({int(i) for i in ids})
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ref = next((i for i in ids if i not in special and tokenizer.decode([i]).strip()), None)
    base = tokenizer.decode([ref]) if ref is not None else ""
    out = {}
    for t in ids:
        s = tokenizer.decode([ref, t]) if ref is not None else ""
        out[t] = s[len(base):] if ref is not None and s.startswith(base) else tokenizer.decode([t])
    return out


def token_texts(tokenizer, ids) -> list[str]:
    """The texts of a token sequence, concatenating to read like the decoded text."""
    m = token_strings(tokenizer, ids)
    return [m[int(t)].lstrip() if i == 0 else m[int(t)] for i, t in enumerate(ids)]


# ---- the maths (pure numpy / torch) -------------------------------------------------------

@torch.no_grad()
def sparse_codes(sae, x: torch.Tensor, max_active: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Active latents of ``x`` [N, d] as (indices [N, k] long, values [N, k] float; 0 = inactive)."""
    if sae.cfg.architecture == "topk":
        v, i = sae.encode_topk(x)
        return i, v.float()
    f = sae.encode(x).float()  # [N, F]
    v, i = f.topk(min(max_active, f.shape[-1]), dim=-1)
    return i, v.clamp_min(0)


def feature_stats(idx: np.ndarray, val: np.ndarray, included: np.ndarray, d_sae: int, hist_bins: int) -> dict:
    """Density, mean/max activation, histogram and the firing entries sorted per feature.

    ``idx``/``val`` [N, k] are the sparse codes of N tokens; ``included`` [N] masks the tokens
    that count. Returns arrays over features plus ``order`` data: for feature i its firing
    tokens are ``tok[off[i]:off[i+1]]`` with activations ``act[...]``, in descending order.
    """
    active = (val > 0) & included[:, None]  # [N, k]
    rows, cols = np.nonzero(active)
    f = idx[rows, cols].astype(np.int64)
    v = val[rows, cols].astype(np.float32)
    order = np.lexsort((-v, f))  # by feature, then activation descending
    f, v, tok = f[order], v[order], rows[order].astype(np.int64)
    off = np.searchsorted(f, np.arange(d_sae + 1))
    count = np.diff(off)
    n_incl = max(int(included.sum()), 1)
    sums = np.bincount(f, weights=v, minlength=d_sae)
    max_act = np.zeros(d_sae, np.float32)
    has = count > 0
    max_act[has] = v[off[:-1][has]]
    b = np.maximum(np.ceil(v / np.maximum(max_act[f], 1e-12) * hist_bins).astype(np.int64) - 1, 0)
    hist = np.bincount(f * hist_bins + np.minimum(b, hist_bins - 1), minlength=d_sae * hist_bins)
    return {
        "count": count.astype(np.int64), "density": (count / n_incl).astype(np.float32),
        "mean_act": (sums / np.maximum(count, 1)).astype(np.float32), "max_act": max_act,
        "hist": hist.reshape(d_sae, hist_bins).astype(np.int32), "tok": tok, "act": v, "off": off,
    }


def coactivation_neighbours(idx: np.ndarray, val: np.ndarray, included: np.ndarray, count: np.ndarray,
                            n: int, budget: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n`` other features by Jaccard index |A∩B| / |A∪B| of their firing-token sets.

    Co-firing pairs come from each token's active set, counted with ``bincount`` in blocks of
    features so at most ``budget`` counters live at once. Returns (ids [F, n], jaccard [F, n]),
    id −1 where a feature has fewer co-firing partners.
    """
    d_sae = count.shape[0]
    a = np.where((val > 0) & included[:, None], idx, -1).astype(np.int64)  # [N, k]
    a = a[(a >= 0).sum(1) >= 2]
    ids = np.full((d_sae, n), -1, np.int32)
    jac = np.zeros((d_sae, n), np.float32)
    if len(a) == 0:
        return ids, jac
    k = a.shape[1]
    tok_chunk = max(1, (1 << 22) // (k * k))
    block = max(1, min(d_sae, budget // d_sae))
    for b0 in range(0, d_sae, block):
        b1 = min(d_sae, b0 + block)
        c = np.zeros((b1 - b0) * d_sae, np.int64)
        for t0 in range(0, len(a), tok_chunk):
            x = a[t0:t0 + tok_chunk]
            I = np.broadcast_to(x[:, :, None], (len(x), k, k))
            J = np.broadcast_to(x[:, None, :], (len(x), k, k))
            m = (I >= b0) & (I < b1) & (J >= 0) & (I != J)
            c += np.bincount((I[m] - b0) * d_sae + J[m], minlength=c.shape[0])
        c = c.reshape(b1 - b0, d_sae).astype(np.float64)
        union = count[b0:b1, None] + count[None, :] - c
        jb = np.where(c > 0, c / np.maximum(union, 1), 0.0)
        top = np.argsort(-jb, axis=1, kind="stable")[:, :n]
        tj = np.take_along_axis(jb, top, 1)
        ids[b0:b1] = np.where(tj > 0, top, -1)
        jac[b0:b1] = tj
    return ids, jac


@torch.no_grad()
def decoder_neighbours(W_dec: torch.Tensor, n: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n`` other features by cosine of decoder rows: (ids [F, n], cosine [F, n])."""
    w = W_dec.float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    F = w.shape[0]
    n = min(n, F - 1)
    ids, cos = [], []
    for c0 in range(0, F, chunk):
        s = w[c0:c0 + chunk] @ w.T  # [c, F]
        r = torch.arange(s.shape[0])
        s[r, r + c0] = -float("inf")
        v, i = s.topk(n, dim=1)
        ids.append(i.int())
        cos.append(v)
    return torch.cat(ids).numpy(), torch.cat(cos).numpy()


@torch.no_grad()
def logit_effects(W_dec: torch.Tensor, W_U: torch.Tensor, gamma: torch.Tensor | None, n: int,
                  chunk: int = 256) -> dict[str, np.ndarray]:
    """Top ± direct logit effects ``(W_dec[i] ⊙ γ) · W_Uᵀ`` of every feature (γ: final norm weight)."""
    w = W_dec.float() * (gamma.float() if gamma is not None else 1.0)
    u = W_U.float()
    n = min(n, u.shape[0])
    out = {k: [] for k in ("logit_pos_ids", "logit_pos", "logit_neg_ids", "logit_neg")}
    for c0 in range(0, w.shape[0], chunk):
        eff = w[c0:c0 + chunk] @ u.T  # [c, V]
        v, i = eff.topk(n, dim=1)
        out["logit_pos"].append(v)
        out["logit_pos_ids"].append(i.int())
        v, i = (-eff).topk(n, dim=1)
        out["logit_neg"].append(-v)
        out["logit_neg_ids"].append(i.int())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def _final_norm_weight(model) -> torch.Tensor | None:
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm"):
        try:
            m = model.get_submodule(path)
        except AttributeError:
            continue
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            return w.detach().cpu()
    return None


def context_windows(tok: np.ndarray, seq_len: int, before: int, after: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat token indices [E, before+1+after] of windows around ``tok`` [E] that stay inside each
    token's own packed chunk, and a mask of the valid slots."""
    off = np.arange(-before, after + 1)
    pos = tok % seq_len
    w = tok[:, None] + off[None, :]
    valid = (pos[:, None] + off[None, :] >= 0) & (pos[:, None] + off[None, :] < seq_len)
    return np.where(valid, w, tok[:, None]), valid


def _round(x: np.ndarray) -> list:
    return [float(f"{v:.4g}") for v in x.tolist()]


def example_records(feat: int, toks: np.ndarray, ids_flat: np.ndarray, idx: np.ndarray, val: np.ndarray,
                    seq_len: int, before: int, after: int) -> list[dict[str, Any]]:
    """Context records (see the module docstring, EX) of feature ``feat`` at flat tokens ``toks``."""
    if len(toks) == 0:
        return []
    w, valid = context_windows(toks, seq_len, before, after)  # [E, W]
    acts = (val[w] * (idx[w] == feat)).sum(-1)  # [E, W]
    out = []
    for e in range(len(toks)):
        m = valid[e]
        ids = ids_flat[w[e][m]]
        a = acts[e][m]
        peak = int(np.flatnonzero(m).tolist().index(before)) if m[before] else 0
        out.append({"ids": ids.tolist(), "acts": _round(a), "peak": peak, "act": float(f"{a[peak]:.4g}"),
                    "seq": int(toks[e] // seq_len), "pos": int(toks[e] % seq_len)})
    return out


# ---- the stage ----------------------------------------------------------------------------

def _log(cfg: FeaturesConfig, msg: str) -> None:
    if cfg.progress:
        print(f"[features] {msg}", flush=True)


def build_hook_features(cfg: FeaturesConfig, model, tokenizer, sae, hook: str, chunks: torch.Tensor,
                        out_dir: Path, sources: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compute and write ``features/<hook>/`` (layout in the module docstring); returns meta. Phases:
    :func:`_encode_hook` (every token's active latents), :func:`_included_tokens`, :func:`_feature_neighbours`
    and :func:`_example_lines` (statistics, neighbours, logit effects, examples), :func:`_write_hook_features`
    (the files but ``meta.json``)."""
    from saetune.io import atomic_write_json
    from saetune.models import resolve_hook

    t0 = time.perf_counter()
    hp = resolve_hook(model, hook)
    sae = sae.to(next(model.parameters()).device)
    T = chunks.shape[1]
    idx, val = _encode_hook(cfg, model, sae, hp, chunks)  # [N, k] each
    ids_flat = chunks.reshape(-1).numpy()
    t_encode = time.perf_counter() - t0

    excluded = excluded_token_ids(tokenizer, cfg.exclude_tokens) if cfg.exclude_special else set()
    included = _included_tokens(cfg, ids_flat, excluded, T)
    F = sae.cfg.d_sae
    st = feature_stats(idx, val, included, F, cfg.hist_bins)
    logits, neighbours = _feature_neighbours(cfg, model, sae, idx, val, included, st)
    lines, offsets, used, top_token_ids = _example_lines(cfg, st, F, ids_flat, idx, val, T)
    for key in ("logit_pos_ids", "logit_neg_ids"):
        used.update(np.unique(logits[key]).tolist())
    used.update(int(t) for t in np.unique(top_token_ids) if t >= 0)
    vocab = token_strings(tokenizer, used)

    neighbours["top_token_ids"] = top_token_ids
    _write_hook_features(out_dir, st, logits, neighbours, lines, offsets, vocab)
    meta = {
        "format": FORMAT, "version": VERSION, "hook": hook, "d_sae": F, "d_in": sae.cfg.d_in,
        "architecture": sae.cfg.architecture, "k": sae.cfg.k,
        "n_tokens": int(len(ids_flat)), "n_included_tokens": int(included.sum()), "context_size": int(T),
        "excluded_token_ids": sorted(excluded), "excluded_first_position": bool(cfg.exclude_special),
        "dead_features": int((st["count"] == 0).sum()),
        "settings": {k: getattr(cfg, k) for k in ("hist_bins", "n_top", "n_quantiles", "n_per_quantile",
                                                  "context_before", "context_after", "n_logits", "n_neighbours")},
        "sources": sources or {}, "seconds": {"encode": round(t_encode, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    atomic_write_json(out_dir / "meta.json", meta)
    return meta


def _encode_hook(cfg: FeaturesConfig, model, sae, hp, chunks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Run the model to hook point ``hp`` on ``chunks`` [S, T], ``cfg.batch_size`` sequences at a time, and keep
    each token's (at most ``cfg.max_active``) active SAE latents: ``(idx, val)``, both [S·T, k]."""
    from saetune.models import run_to_hooks

    device = next(model.parameters()).device
    idx_parts, val_parts = [], []
    for s0 in range(0, chunks.shape[0], cfg.batch_size):
        ids = chunks[s0:s0 + cfg.batch_size].to(device)
        x = run_to_hooks(model, ids, [hp])[hp.name]  # [B, T, d]
        i, v = sparse_codes(sae, x.reshape(-1, x.shape[-1]).float(), cfg.max_active)
        idx_parts.append(i.int().cpu())
        val_parts.append(v.cpu())
    return torch.cat(idx_parts).numpy(), torch.cat(val_parts).numpy()


def _included_tokens(cfg: FeaturesConfig, ids_flat: np.ndarray, excluded: set[int], T: int) -> np.ndarray:
    """Which of the S·T tokens count in the statistics: with ``exclude_special``, none whose id is in ``excluded``
    and no sequence's first position; otherwise all."""
    if not cfg.exclude_special:
        return np.ones(len(ids_flat), bool)
    included = ~np.isin(ids_flat, np.fromiter(excluded, np.int64, len(excluded)))
    included &= (np.arange(len(ids_flat)) % T) != 0
    return included


def _feature_neighbours(cfg: FeaturesConfig, model, sae, idx: np.ndarray, val: np.ndarray, included: np.ndarray,
                        st: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each feature's logit effects and nearest neighbours: by co-activation (Jaccard, on the first
    ``coact_tokens`` tokens, all when 0) and by decoder cosine; returns ``(logits, neighbours)``."""
    F = sae.cfg.d_sae
    ct = cfg.coact_tokens or len(idx)
    coact_ids, coact_j = coactivation_neighbours(idx[:ct], val[:ct], included[:ct],
                                                 feature_stats(idx[:ct], val[:ct], included[:ct], F, 1)["count"]
                                                 if ct < len(idx) else st["count"], cfg.n_neighbours)
    dec_ids, dec_cos = decoder_neighbours(sae.W_dec.detach().cpu(), cfg.n_neighbours)
    W_U = model.get_output_embeddings().weight.detach().cpu()
    logits = logit_effects(sae.W_dec.detach().cpu(), W_U, _final_norm_weight(model), cfg.n_logits)
    return logits, {"dec_nn_ids": dec_ids, "dec_nn_cos": dec_cos, "coact_nn_ids": coact_ids,
                    "coact_nn_jaccard": coact_j}


def _example_lines(cfg: FeaturesConfig, st: dict[str, np.ndarray], F: int, ids_flat: np.ndarray, idx: np.ndarray,
                   val: np.ndarray, T: int) -> tuple[list[bytes], list[int], set[int], np.ndarray]:
    """Per feature: its ``n_top`` top examples, ``n_per_quantile`` examples drawn (seeded by ``cfg.seed``) from each
    of ``n_quantiles`` activation quantiles, and its most frequent peak tokens. Returns the ``examples.jsonl``
    lines, their byte offsets, the token ids the examples use and ``top_token_ids`` [F, TOP_TOKENS] (−1 = none)."""
    rng = np.random.default_rng(cfg.seed)
    lines, offsets, used = [], [0], set()
    top_token_ids = np.full((F, TOP_TOKENS), -1, np.int32)
    for f in range(F):
        a, b = st["off"][f], st["off"][f + 1]
        toks, acts = st["tok"][a:b], st["act"][a:b]
        top = example_records(f, toks[:cfg.n_top], ids_flat, idx, val, T, cfg.context_before, cfg.context_after)
        groups = []
        if len(toks) and cfg.n_per_quantile:
            asc_t, asc_a = toks[::-1], acts[::-1]
            for g in np.array_split(np.arange(len(asc_t)), min(cfg.n_quantiles, len(asc_t))):
                pick = np.sort(rng.choice(g, size=min(cfg.n_per_quantile, len(g)), replace=False))
                groups.append({"lo": float(f"{asc_a[g[0]]:.4g}"), "hi": float(f"{asc_a[g[-1]]:.4g}"), "n": int(len(g)),
                               "examples": example_records(f, asc_t[pick][::-1], ids_flat, idx, val, T,
                                                           cfg.context_before, cfg.context_after)})
        peak_ids = ids_flat[toks[:cfg.n_top]]
        if len(peak_ids):
            u, c = np.unique(peak_ids, return_counts=True)
            best = u[np.argsort(-c, kind="stable")][:TOP_TOKENS]
            top_token_ids[f, :len(best)] = best
        for ex in top + [e for g in groups for e in g["examples"]]:
            used.update(ex["ids"])
        line = (json.dumps({"feature": f, "top": top, "quantiles": groups}, separators=(",", ":")) + "\n").encode()
        lines.append(line)
        offsets.append(offsets[-1] + len(line))
    return lines, offsets, used, top_token_ids


def _write_hook_features(out_dir: Path, st: dict[str, np.ndarray], logits: dict[str, np.ndarray],
                         arrays: dict[str, np.ndarray], lines: list[bytes], offsets: list[int],
                         vocab: dict[int, str]) -> None:
    """Write ``stats.safetensors`` (statistics, logit effects, then ``arrays``: neighbours, top tokens),
    ``examples.jsonl`` with its byte-offset index ``examples.index.npy``, and ``tokens.json``."""
    import io
    from saetune.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(st[k])) for k in ("count", "density", "mean_act", "max_act", "hist")}
    tensors.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in logits.items()})
    tensors.update({k: torch.from_numpy(v) for k, v in arrays.items()})
    atomic_save_safetensors(out_dir / "stats.safetensors", tensors)
    atomic_write_bytes(out_dir / "examples.jsonl", b"".join(lines))
    buf = io.BytesIO()
    np.save(buf, np.asarray(offsets, np.int64))
    atomic_write_bytes(out_dir / "examples.index.npy", buf.getvalue())
    atomic_write_json(out_dir / "tokens.json", {str(k): v for k, v in vocab.items()})


def training_data(cfg: FeaturesConfig, sae_run: Path | None) -> FeaturesConfig:
    """``cfg`` with an empty ``dataset`` filled from the SAE run's config (its dataset, template,
    fields and context size; a toy SAE's traces get this config's own ``data_seed``), else 'toy'."""
    import dataclasses

    from saetune.runs import resolve_recorded
    from .rundirs import read_config
    if cfg.dataset:
        return cfg
    saved = (read_config(sae_run) or {}) if sae_run is not None else {}
    keep = ("dataset", "split", "template", "text_field", "problem_field", "answer_field", "response_field",
            "context_size")
    found = {k: saved[k] for k in keep if saved.get(k) not in (None, "")}
    found.setdefault("dataset", "toy")
    found["dataset"] = resolve_recorded(found["dataset"], sae_run) if sae_run is not None else found["dataset"]
    return dataclasses.replace(cfg, **found)


def features(cfg: FeaturesConfig, out: str | Path | None = None, resume: bool = False,
             overwrite: bool = False) -> dict[str, Any]:
    """Run ``saetune features`` into run dir ``out``; returns a summary per hook."""
    from saetune.data import load_chunks
    from saetune.io import atomic_write_json
    from saetune.models import load_model, resolve_device
    from saetune.runs import RunDir, record_path
    from saetune.sae import SAE
    from .reasoning_features import reasoning_feature_records

    if not cfg.sae:
        raise SaetuneError("features needs --sae: a train-sae run dir or an SAE dir")
    sae_dirs, sae_run = find_saes(cfg.sae, cfg.hook or None)
    model_name = cfg.model or recorded_model(sae_dirs, sae_run)
    data_cfg = training_data(cfg, sae_run)
    device = resolve_device(cfg.device)
    with RunDir.open(out, "features", cfg, resume=resume, overwrite=overwrite, seed=cfg.seed, device=device,
                     inputs=(model_name, *sae_dirs.values())) as run:
        with run.phase("load"):
            model, tok = load_model(model_name, dtype=cfg.model_dtype, device=device)
            saes = {h: SAE.load(p) for h, p in sae_dirs.items()}
            chunks = load_chunks(data_cfg, tok)
            chunks = chunks[:max(1, cfg.n_tokens // chunks.shape[1])]
        run.add_input("model", model_name)
        for h, p in sae_dirs.items():
            run.add_input(f"sae:{h}", p)
        summary = {}
        for h, sae in saes.items():
            with run.phase(f"features:{h}"):
                _log(cfg, f"{h}: {chunks.numel():,} tokens, {sae.cfg.d_sae} features")
                where = run.path / "features" / h
                meta = build_hook_features(cfg, model, tok, sae, h, chunks, where,
                                           sources={"model": record_path(model_name, where, scope=run.path.parent),
                                                    "sae": record_path(sae_dirs[h], where, scope=run.path.parent),
                                                    "dataset": data_cfg.dataset, "data_seed": data_cfg.data_seed,
                                                    "template": data_cfg.template})
            summary[h] = {k: meta[k] for k in ("d_sae", "n_tokens", "n_included_tokens", "dead_features", "seconds")}
            _log(cfg, f"{h}: {meta['seconds']['total']:.1f} s")
        with run.phase("reasoning"):
            try:
                rec = reasoning_feature_records(model, tok, saes, cfg.reasoning_prompt or None)
            except SaetuneError as e:  # e.g. a prompt without the tags: the feature data stands on its own
                rec = {"prompt": cfg.reasoning_prompt, "hooks": {}, "error": str(e)}
                _log(cfg, f"reasoning features skipped: {e}")
            rec["threshold"] = cfg.reasoning_threshold
            atomic_write_json(run.path / "features" / "reasoning.json", rec)
        run.add_artifact("features", "features")
        run.finish(summary=summary)
        return summary
