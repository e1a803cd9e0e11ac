"""Token entropy and the selection rules built on it: 80/20 high-entropy tokens, Clip-Cov, KL-Cov.

``token_entropy`` is ``saetune.kernels.entropy.token_entropy`` (defined beside the fused
entropy kernel, whose reference it is; the kernels never import ``saetune.rl``).

Shapes: ``logits`` ``[..., V]``; everything else ``[B, T]`` over response tokens with a
``{0, 1}`` (float or bool) ``mask``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from saetune.errors import SaetuneError
from saetune.kernels.entropy import token_entropy  # noqa: F401  (public here; defined with the kernels)
from saetune.rl.losses import _as_mask, _check_shape


def _quantile(sorted_x: Tensor, q: float) -> Tensor:
    """Linear-interpolation quantile of an ascending 1-D tensor (same rule as ``torch.quantile``,
    without its 16M-element input limit)."""
    n = sorted_x.numel()
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_x[lo] + (sorted_x[hi] - sorted_x[lo]) * frac


def entropy_stats(entropy: Tensor, mask: Tensor) -> dict[str, float]:
    """Logging summary of per-token entropy over the valid tokens of a batch.

    Returns ``mean`` (token-mean over the mask), ``p50``/``p80``/``p95`` (linear-interpolation
    quantiles), ``frac_above_p80`` (fraction of valid tokens strictly above the batch 80th
    percentile) and ``n_tokens``. With no valid token the statistics are ``nan`` and
    ``n_tokens`` is 0.
    """
    m = _as_mask(mask, entropy.shape if isinstance(entropy, Tensor) else None)
    vals = entropy.detach()[m].double()
    n = vals.numel()
    if n == 0:
        return {k: math.nan for k in ("mean", "p50", "p80", "p95", "frac_above_p80")} | {"n_tokens": 0}
    s = torch.sort(vals).values
    p80 = _quantile(s, 0.8)
    return {
        "mean": float(vals.mean()),
        "p50": float(_quantile(s, 0.5)),
        "p80": float(p80),
        "p95": float(_quantile(s, 0.95)),
        "frac_above_p80": float((vals > p80).double().mean()),
        "n_tokens": n,
    }


def _gather_valid(values: Tensor, group) -> Tensor:
    """Concatenate 1-D tensors of different lengths from all ranks (pad to the longest, gather, trim)."""
    world = dist.get_world_size(group)
    n = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    counts_l = [int(c) for c in counts]
    longest = max(counts_l)
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    bufs = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded, group=group)
    return torch.cat([b[:c] for b, c in zip(bufs, counts_l)])


def high_entropy_mask(entropy: Tensor, mask: Tensor, rho: float = 0.2, group=None) -> Tensor:
    """The 80/20 rule (Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens
    Drive Effective RL for LLM Reasoning"): keep only the top-ρ entropy tokens.

    Returns a bool ``[B, T]`` mask, True where ``mask`` is set and ``H_t ≥ τ``, with ``τ`` the
    (1 − ρ) linear-interpolation quantile of the entropies of **all valid tokens of the batch**
    — across every process when ``torch.distributed`` is initialised (or ``group`` is given):
    each rank's valid entropies are padded to a common length and all-gathered, so all ranks
    use the same ``τ``. Ties at ``τ`` are all kept, so slightly more than ρ of the tokens may pass.

    Use it to gate the policy-gradient term only (``policy_loss(..., pg_token_mask=...)``):
    **the loss normaliser is unchanged** — still the full response mask — as in the paper and
    TRL's ``top_entropy_quantile``. ``rho = 1`` keeps every valid token.
    """
    if not (0 < rho <= 1):
        raise SaetuneError(f"rho (the kept fraction of tokens) must be in (0, 1], got {rho!r}")
    _check_shape(entropy, entropy.shape, "entropy")
    m = _as_mask(mask, entropy.shape)
    ent = entropy.detach().float()
    vals = ent[m]
    distributed = group is not None or (dist.is_available() and dist.is_initialized())
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise SaetuneError("a process group was given but torch.distributed is not initialised")
        vals = _gather_valid(vals, group)
    if vals.numel() == 0:
        return torch.zeros_like(m)
    tau = _quantile(torch.sort(vals).values, 1.0 - rho)
    return m & (ent >= tau)


def token_covariance(advantages: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token centred cross-product of Cui et al. 2025 ("The Entropy Mechanism of RL for
    Reasoning Language Models"): ``C_t = (A_t − mean A)(logπ_t − mean logπ)``, means over the
    valid tokens of the batch. Detached; ``-inf`` at padding. ``advantages`` may be ``[B]``."""
    m = _as_mask(mask, logprobs.shape)
    if advantages.shape == logprobs.shape[:1]:
        advantages = advantages[:, None].expand(logprobs.shape)
    _check_shape(advantages, logprobs.shape, "advantages")
    a = advantages.detach().double()
    lp = logprobs.detach().double()
    n = m.sum().clamp(min=1)
    zero = torch.zeros((), dtype=torch.float64, device=a.device)
    a_mean = torch.where(m, a, zero).sum() / n
    lp_mean = torch.where(m, lp, zero).sum() / n
    cov = (a - a_mean) * (lp - lp_mean)
    return torch.where(m, cov, torch.full((), -math.inf, dtype=torch.float64, device=a.device))


def clip_cov_mask(
    advantages: Tensor,
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    mask: Tensor,
    ratio: float = 2e-4,
    cov_lower: float = 1.0,
    cov_upper: float = 5.0,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Clip-Cov (Cui et al. 2025): detach the gradient of a few random high-covariance tokens.

    With ``C_t`` from :func:`token_covariance`, the candidates are the valid tokens not already
    clipped by PPO (``−Â·clip(r) > −Â·r`` with ``r = exp(logπ − logπold)``; nothing is clipped
    when ``old_logprobs`` is None) and ``cov_lower < C_t < cov_upper`` (1 and 5 in the paper's
    code). ``max(1, ⌊ratio·N⌋)`` of them (N = valid tokens; ratio 2e-4) — or all, if fewer — are
    drawn uniformly at random with ``generator``.

    Returns a bool ``[B, T]`` keep-mask: ``mask`` with the drawn tokens set False; pass it as
    ``policy_loss(..., pg_token_mask=...)`` so their gradient is zero and the normaliser is
    unchanged. **Beware:** ``ratio`` is a fraction here; the original scripts pass it in percent.
    """
    if not (0 <= ratio <= 1):
        raise SaetuneError(f"ratio must be a fraction in [0, 1] (2e-4, not the scripts' percent), got {ratio!r}")
    if not cov_lower < cov_upper:
        raise SaetuneError(f"cov_lower ({cov_lower!r}) must be below cov_upper ({cov_upper!r})")
    cov = token_covariance(advantages, logprobs, mask)
    m = _as_mask(mask, logprobs.shape)
    candidates = m & (cov > cov_lower) & (cov < cov_upper)
    if old_logprobs is not None:
        _check_shape(old_logprobs, logprobs.shape, "old_logprobs")
        adv = advantages[:, None].expand(logprobs.shape) if advantages.shape == logprobs.shape[:1] else advantages
        r = torch.exp((logprobs.detach() - old_logprobs.detach()).clamp(-20, 20))
        clipped = (-adv * r.clamp(1 - clip_low, 1 + clip_high)) > (-adv * r)
        candidates &= ~clipped
    keep = m.clone()
    idx = torch.nonzero(candidates.reshape(-1)).squeeze(-1)
    if idx.numel() == 0 or ratio == 0:
        return keep
    k = min(max(1, int(ratio * int(m.sum()))), idx.numel())
    perm = torch.randperm(idx.numel(), generator=generator, device="cpu")[:k].to(idx.device)
    keep.view(-1)[idx[perm]] = False
    return keep


def kl_cov_selection(
    advantages: Tensor, logprobs: Tensor, mask: Tensor, ratio: float = 2e-3, at_least_one: bool = False
) -> Tensor:
    """KL-Cov (Cui et al. 2025): bool ``[B, T]`` mask of the top ``⌊ratio·N⌋`` valid tokens by
    ``C_t`` (:func:`token_covariance`; N = valid tokens). ``ratio`` is a fraction — 2e-3 is the
    paper's 7B setting; **the original scripts give it in percent** (0.2 there means 2e-3 here).
    ``at_least_one=True`` selects max(1, ⌊ratio·N⌋) as verl's implementation does. Ties at the
    cut-off are broken by ``torch.topk``. Apply :func:`kl_cov_loss` on the selection.
    """
    if not (0 <= ratio <= 1):
        raise SaetuneError(f"ratio must be a fraction in [0, 1] (2e-3, not the scripts' percent), got {ratio!r}")
    cov = token_covariance(advantages, logprobs, mask)
    m = _as_mask(mask, logprobs.shape)
    n = int(m.sum())
    k = int(ratio * n)
    if at_least_one and n > 0:
        k = max(1, k)
    sel = torch.zeros_like(m)
    if k == 0:
        return sel
    top = torch.topk(cov.reshape(-1), k).indices
    sel.view(-1)[top] = True
    return sel


def kl_cov_loss(logprobs: Tensor, old_logprobs: Tensor, selection: Tensor, beta: float = 1.0) -> Tensor:
    """KL-Cov's per-token penalty ``β·|logπθ − logπold|`` on the selected tokens, 0 elsewhere.

    KL-Cov's token loss is ``−Â·r + β·|logπθ − logπold|`` on the selection and ``−Â·r`` (no
    clipping) elsewhere; add this ``[B, T]`` term to the token loss before aggregation.
    ``β = 1`` as in the paper's original code (verl's recipe default is 0.1).
    """
    _check_shape(old_logprobs, logprobs.shape, "old_logprobs")
    sel = _as_mask(selection, logprobs.shape, "selection")
    term = beta * (logprobs - old_logprobs.detach()).abs()
    return torch.where(sel, term, torch.zeros((), dtype=term.dtype, device=term.device))
