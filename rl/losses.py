"""Policy-gradient losses for RL on reasoning traces: PPO/GRPO/DAPO clipping, KL, entropy, REDI.

Every input is a ``[B, T]`` tensor over response tokens with a ``{0, 1}`` (float or bool)
``mask``; a padding position never changes a result, whatever value it holds (the math uses
``torch.where`` on the mask, so even ``nan`` padding is harmless).

Formulas (ratio ``r = exp(logπθ − logπold)``, advantage ``Â``):

- token loss  ``ℓ = −min(r·Â, clip(r, 1−ε_low, 1+ε_high)·Â)``  (PPO; DAPO's "clip-higher"
  ε_low 0.2, ε_high 0.28);
- dual clip   ``ℓ ← min(ℓ, −c·Â)`` where ``Â < 0`` (Ye et al. 2020; c = 3 in verl, 10 in CURE);
- KL k3       ``e^Δ − Δ − 1``, ``Δ = logπref − logπθ`` (Schulman's k3 estimator, GRPO);
- entropy bonus ``−c_H·H̄`` (one-shot RLVR; c_H = 1e-3 there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saetune.errors import SaetuneError

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
"""verl's ``loss_agg_mode`` names."""

AGG_ALIASES = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}
"""TRL's ``GRPOConfig.loss_type`` names mapped to the verl mode they compute."""


# --------------------------------------------------------------------------- input checks
def _as_mask(mask: Tensor, shape: torch.Size | None = None, name: str = "mask") -> Tensor:
    """Return ``mask`` as bool after checking it is a 2-D {0,1} tensor (of ``shape`` if given)."""
    if not isinstance(mask, Tensor):
        raise SaetuneError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise SaetuneError(f"{name} must be [B, T], got shape {tuple(mask.shape)}")
    if shape is not None and mask.shape != shape:
        raise SaetuneError(
            f"{name} has shape {tuple(mask.shape)} but the token tensors have shape {tuple(shape)}"
        )
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise SaetuneError(f"{name} must hold only 0 and 1 (or be bool); found other values")
    return mask != 0


def _check_shape(t: Tensor, shape: torch.Size, name: str) -> None:
    if not isinstance(t, Tensor):
        raise SaetuneError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != shape:
        raise SaetuneError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} (like logprobs)")


def resolve_agg_mode(mode: str) -> str:
    """Map a verl ``loss_agg_mode`` or TRL ``loss_type`` alias to the verl name; else raise."""
    if mode in AGG_MODES:
        return mode
    if mode in AGG_ALIASES:
        return AGG_ALIASES[mode]
    raise SaetuneError(
        f"unknown loss aggregation {mode!r}; valid: {', '.join(AGG_MODES)} "
        f"(or TRL aliases {', '.join(sorted(AGG_ALIASES))})"
    )


# --------------------------------------------------------------------------- aggregation
def aggregate(loss_mat: Tensor, mask: Tensor, mode: str = "token-mean", norm_length: float | None = None) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar over the valid tokens of ``mask``.

    - ``token-mean`` (DAPO; TRL ``bnpo``/``dapo``): ``Σ_{b,t} m·ℓ / Σ_{b,t} m`` — every token
      of the batch weighs the same, so long responses are not down-weighted.
    - ``seq-mean-token-mean`` (GRPO; TRL ``grpo``): ``mean_b (Σ_t m·ℓ / Σ_t m)``.
    - ``seq-mean-token-sum-norm`` (Dr.GRPO; TRL ``dr_grpo``): ``mean_b (Σ_t m·ℓ / L)`` with
      ``L = norm_length``, a constant of the run: the max new tokens (verl divides by its
      ``loss_scale_factor``, else by the response length its rollout pads every batch to; TRL by
      ``max_completion_length``). The default ``T`` (the mask's width) equals that constant only
      when responses are padded to the response budget, as in verl; a trainer whose batches are
      padded to their longest sequence must pass it (``saetune.rl.step.update`` does).

    A batch (or a sequence, in the seq modes) with no valid token contributes 0 rather than
    ``nan`` (denominators clamped at 1, as TRL does); empty rows still count in ``mean_b``.
    """
    mode = resolve_agg_mode(mode)
    if not isinstance(loss_mat, Tensor) or loss_mat.dim() != 2:
        shape = tuple(loss_mat.shape) if isinstance(loss_mat, Tensor) else type(loss_mat).__name__
        raise SaetuneError(f"loss_mat must be a [B, T] tensor, got {shape}")
    m = _as_mask(mask, loss_mat.shape)
    masked = torch.where(m, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    if mode == "token-mean":
        return masked.sum() / m.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if norm_length is None:
        norm_length = loss_mat.shape[-1]
    if not (isinstance(norm_length, (int, float)) and norm_length > 0 and math.isfinite(norm_length)):
        raise SaetuneError(f"norm_length must be a positive number, got {norm_length!r}")
    return (masked.sum(-1) / float(norm_length)).mean()


# --------------------------------------------------------------------------- KL
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 KL estimate ``e^Δ − Δ − 1`` with ``Δ = logπref − logπθ`` (≥ 0, 0 iff equal).

    An unbiased, low-variance estimate of KL(πθ‖πref) from samples of πθ (Schulman 2020,
    "Approximating KL divergence"; GRPO's KL term; verl's ``low_var_kl`` without its clamps).
    """
    _check_shape(ref_logprobs, logprobs.shape, "ref_logprobs")
    delta = ref_logprobs - logprobs
    return torch.expm1(delta) - delta


# --------------------------------------------------------------------------- policy loss
def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    pg_coef: float = 1.0,
    norm_length: float | None = None,
    pg_token_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy-gradient loss with optional dual clip, k3 KL and entropy bonus.

    ``loss = pg_coef·agg(ℓ·g) + kl_coef·agg(k3) − entropy_coef·agg(H)`` where, per token,
    ``r = exp(logπθ − logπold)`` (log-ratio clamped to ±20 as verl does, against overflow) and

    - ``ℓ = −min(r·Â, clip(r, 1−clip_low, 1+clip_high)·Â)`` (PPO; defaults are DAPO's
      clip-higher 0.2/0.28);
    - dual clip (``dual_clip = c > 1``): ``ℓ ← min(ℓ, −c·Â)`` where ``Â < 0`` — bounds the loss
      of a negative-advantage token whose ratio exploded (c = 3 is verl's default, 10 CURE's
      recipe; ``None`` turns it off);
    - ``g = pg_token_mask`` (optional, e.g. :func:`saetune.rl.entropy.high_entropy_mask` or
      :func:`saetune.rl.entropy.clip_cov_mask`) drops tokens from the policy-gradient term
      while the normaliser stays ``mask`` (as the 80/20 paper and Clip-Cov do);
    - ``k3 = e^Δ − Δ − 1``, ``Δ = logπref − logπθ`` (needs ``ref_logprobs`` when ``kl_coef`` ≠ 0);
    - ``H`` = per-token entropy **with its graph** so the bonus has a gradient (one-shot RLVR:
      ``entropy_coef`` 1e-3; ``pg_coef=0`` trains on entropy alone).

    ``advantages`` is ``[B]`` (one per response, broadcast over tokens) or ``[B, T]``.
    ``agg`` is a verl ``loss_agg_mode`` or a TRL alias, see :func:`aggregate`.

    Returns ``(loss, metrics)``; metrics are floats: ``pg_loss``, ``clipfrac_low`` (Â<0 and
    r<1−ε_low, so the clip is active), ``clipfrac_high`` (Â>0 and r>1+ε_high), ``clipfrac_dual``
    (dual clip active), ``kl`` and ``entropy`` (aggregated like the loss; ``nan`` when not
    given), ``ratio_mean`` and ``n_tokens`` — fractions and means over the valid tokens.
    """
    if not isinstance(logprobs, Tensor) or logprobs.dim() != 2:
        shape = tuple(logprobs.shape) if isinstance(logprobs, Tensor) else type(logprobs).__name__
        raise SaetuneError(f"logprobs must be a [B, T] tensor, got {shape}")
    shape = logprobs.shape
    _check_shape(old_logprobs, shape, "old_logprobs")
    m = _as_mask(mask, shape)
    if not isinstance(advantages, Tensor):
        raise SaetuneError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if advantages.shape == shape[:1]:
        advantages = advantages[:, None].expand(shape)
    elif advantages.shape != shape:
        raise SaetuneError(
            f"advantages has shape {tuple(advantages.shape)}; expected [B]={tuple(shape[:1])} "
            f"or [B, T]={tuple(shape)} like logprobs"
        )
    if not (0 <= clip_low < 1):
        raise SaetuneError(f"clip_low must be in [0, 1), got {clip_low!r}")
    if not (clip_high >= 0):
        raise SaetuneError(f"clip_high must be ≥ 0, got {clip_high!r}")
    if dual_clip is not None and not dual_clip > 1:
        raise SaetuneError(f"dual_clip must be > 1 (3 in verl, 10 in CURE) or None, got {dual_clip!r}")
    if kl_coef != 0 and ref_logprobs is None:
        raise SaetuneError(f"kl_coef={kl_coef!r} needs ref_logprobs, which is None")
    if entropy_coef != 0 and entropy is None:
        raise SaetuneError(f"entropy_coef={entropy_coef!r} needs the per-token entropy tensor, which is None")
    agg = resolve_agg_mode(agg)

    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    adv = torch.where(m, advantages.to(logprobs.dtype), zero).detach()
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), zero).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    dual_active = torch.zeros_like(m)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual_active = (adv < 0) & (pg3 < pg) & m
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    if pg_token_mask is not None:
        g = _as_mask(pg_token_mask, shape, "pg_token_mask")
        pg = torch.where(g, pg, zero)

    n = m.sum().clamp(min=1)
    with torch.no_grad():
        low = (adv < 0) & (ratio < 1.0 - clip_low) & m
        high = (adv > 0) & (ratio > 1.0 + clip_high) & m
        metrics = {
            "clipfrac_low": float(low.sum() / n),
            "clipfrac_high": float(high.sum() / n),
            "clipfrac_dual": float(dual_active.sum() / n),
            "ratio_mean": float(torch.where(m, ratio, zero).sum() / n),
            "n_tokens": int(m.sum()),
        }

    pg_loss = aggregate(pg, m, agg, norm_length)
    metrics["pg_loss"] = float(pg_loss.detach())
    loss = pg_coef * pg_loss if pg_coef != 0 else torch.zeros((), dtype=pg_loss.dtype, device=pg_loss.device)

    metrics["kl"] = math.nan
    if ref_logprobs is not None:
        kl = aggregate(kl_k3(logprobs, ref_logprobs.detach()), m, agg, norm_length)
        metrics["kl"] = float(kl.detach())
        if kl_coef != 0:
            loss = loss + kl_coef * kl

    metrics["entropy"] = math.nan
    if entropy is not None:
        _check_shape(entropy, shape, "entropy")
        ent = aggregate(entropy, m, agg, norm_length)
        metrics["entropy"] = float(ent.detach())
        if entropy_coef != 0:
            loss = loss - entropy_coef * ent
    return loss, metrics


# --------------------------------------------------------------------------- REDI
def redi_loss(
    pos_logprobs: Tensor, pos_mask: Tensor, neg_logprobs: Tensor, neg_mask: Tensor, alpha: float = 0.8
) -> Tensor:
    """REDI's offline objective on (positive, negative) trace pairs (Xu et al. 2025, "Harnessing
    Negative Signals: Reinforcement Distillation from Teacher Data for LLM Reasoning").

    ``L = mean_pairs[ −(1/|y⁺|)·Σ_t log π(y⁺_t) + α·(1/|y⁻|)·Σ_t log π(y⁻_t) ]``

    i.e. length-normalised likelihood up on the correct trace, down (weighted by α) on the
    incorrect one. ``α = 0.8`` is the authors' recipe (``reinforce_chosen_coef: 1.0``,
    ``reinforce_rejected_coef: 0.8`` in ``experiments_trl/recipes/redi/redi_1_08_1e-6`` of
    github.com/Tim-Siu/reinforcement-distillation); α < 1 keeps the unbounded negative term from
    collapsing the model. Inputs: per-token log-probs ``[B, T⁺]`` / ``[B, T⁻]`` with masks; row b
    of each is one pair. An empty trace contributes 0.
    """
    if not alpha >= 0:
        raise SaetuneError(f"alpha (weight on the negative trace) must be ≥ 0, got {alpha!r}")
    pm = _as_mask(pos_mask, pos_logprobs.shape, "pos_mask")
    nm = _as_mask(neg_mask, neg_logprobs.shape, "neg_mask")
    if pos_logprobs.shape[0] != neg_logprobs.shape[0]:
        raise SaetuneError(
            f"pos_logprobs {tuple(pos_logprobs.shape)} and neg_logprobs {tuple(neg_logprobs.shape)} "
            "must have the same number of rows (one row per pair)"
        )
    pos_ll = aggregate_rows(pos_logprobs, pm)
    neg_ll = aggregate_rows(neg_logprobs, nm)
    return (-pos_ll + alpha * neg_ll).mean()


def aggregate_rows(values: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean over valid tokens ``Σ_t m·x / max(1, Σ_t m)`` → ``[B]``."""
    m = _as_mask(mask, values.shape)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(m, values, zero).sum(-1) / m.sum(-1).clamp(min=1)
