"""saetune's advantage estimators and policy loss in verl's signatures.

verl looks these up by name (``algorithm.adv_estimator=saetune_grpo``,
``actor_rollout_ref.actor.policy_loss.loss_mode=saetune_dapo``) once
:mod:`saetune.rl.integrations.verl_plugin` has registered them. The math is saetune's own
(:mod:`saetune.rl.advantages`, :mod:`saetune.rl.losses`), so a verl run and a ``saetune rl``
run optimise the same objective; these wrappers only translate verl's tensors and config.

Advantage estimators take ``token_level_rewards`` [B, T], ``response_mask`` [B, T] and
``index`` [B] (verl's per-prompt ``uid``; a CURE group shares its prompt's uid, so the 4
originals and 12 branches get one GRPO advantage, as CURE does) and return
``(advantages, returns)``, both [B, T], 0 off the mask.

The policy loss matches verl's aggregation over data-parallel ranks: with
``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``) the
local aggregate is rescaled so that the sum of rank gradients averaged by DDP/FSDP equals the
gradient of the global-batch loss — ``token-mean``: ``Σ m·ℓ / N_tokens_global · dp``; seq
modes: ``Σ_b seq_b / N_seqs_global · dp``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from saetune.errors import SaetuneError
from saetune.rl.advantages import grpo_advantages
from saetune.rl.losses import _as_mask, policy_loss, resolve_agg_mode

__all__ = ["grpo_advantage", "dr_grpo_advantage", "dapo_policy_loss", "global_batch_scale"]


def _cfg_get(config: Any, key: str, default: Any) -> Any:
    """``config.key`` for verl's dataclass configs and DictConfigs alike (``default`` when absent or None)."""
    if config is None:
        return default
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def _outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index, eps: float,
                       scale_by_std: bool) -> tuple[Tensor, Tensor]:
    if token_level_rewards.dim() != 2 or token_level_rewards.shape != response_mask.shape:
        raise SaetuneError(f"token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
                           f"{tuple(response_mask.shape)} must both be [B, T]")
    if index is None:
        raise SaetuneError("a group-relative advantage needs verl's per-prompt 'uid' (index); the batch has none")
    ids = np.asarray(index)
    if ids.shape != (token_level_rewards.shape[0],):
        raise SaetuneError(f"index has shape {ids.shape}, expected ({token_level_rewards.shape[0]},)")
    _, inverse = np.unique(ids.astype(str), return_inverse=True)  # uids are strings; any hashable works
    scores = token_level_rewards.sum(-1)  # (B,) outcome reward = the sum of the token rewards
    adv = grpo_advantages(scores, group_ids=torch.as_tensor(inverse.reshape(-1)), eps=eps, scale_by_std=scale_by_std)
    m = _as_mask(response_mask)
    out = torch.where(m, adv[:, None].to(token_level_rewards.dtype), torch.zeros((), dtype=token_level_rewards.dtype))
    return out, out


def grpo_advantage(token_level_rewards: Tensor, response_mask: Tensor, index=None, config: Any = None,
                   **_: Any) -> tuple[Tensor, Tensor]:
    """GRPO: ``Â_i = (R_i − mean_g R) / (std_g R + ε)`` over the responses sharing a uid (verl's
    ``norm_adv_by_std_in_grpo=False`` in the algorithm config gives Dr.GRPO's ``R_i − mean_g R``).

    Differences from verl's ``grpo``: computed in float64; a group of one gets advantage 0 (verl
    passes its raw reward through); ``ε`` is ``algorithm.norm_adv_eps`` when set, else 1e-6.
    """
    return _outcome_advantage(token_level_rewards, response_mask, index, eps=float(_cfg_get(config, "norm_adv_eps", 1e-6)),
                              scale_by_std=bool(_cfg_get(config, "norm_adv_by_std_in_grpo", True)))


def dr_grpo_advantage(token_level_rewards: Tensor, response_mask: Tensor, index=None, config: Any = None,
                      **_: Any) -> tuple[Tensor, Tensor]:
    """Dr.GRPO (Liu et al. 2025): ``Â_i = R_i − mean_g R``, no division by the group's std."""
    return _outcome_advantage(token_level_rewards, response_mask, index, eps=0.0, scale_by_std=False)


def global_batch_scale(mask: Tensor, agg: str, dp_size: int = 1, batch_num_tokens=None,
                       global_batch_size=None) -> float:
    """Factor turning saetune's local aggregate (:func:`saetune.rl.losses.aggregate`) into verl's.

    ``token-mean``: local ``S / n_local`` → verl ``S / N_global · dp`` (``N_global`` = local
    tokens when not given). Seq modes: local ``S / B_local`` (saetune counts empty rows) →
    verl ``S / B_global · dp`` where verl counts only rows with a valid token.
    """
    m = _as_mask(mask)
    agg = resolve_agg_mode(agg)
    dp = int(dp_size or 1)
    if agg == "token-mean":
        local = int(m.sum())
        total = float(batch_num_tokens) if batch_num_tokens is not None else float(local)
        if dp > 1 and batch_num_tokens is None:
            raise SaetuneError("token-mean over several data-parallel ranks needs global_batch_info['batch_num_tokens']")
        return max(local, 1) * dp / total if total > 0 else 0.0
    rows = m.shape[0]
    nonempty = int(m.any(-1).sum())
    if dp > 1 and global_batch_size is None:
        raise SaetuneError(f"{agg} over several data-parallel ranks needs global_batch_info['global_batch_size']")
    total = float(global_batch_size) if global_batch_size is not None else float(nonempty)
    return rows * dp / total if total > 0 else 0.0


def dapo_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                     loss_agg_mode: str = "token-mean", config: Any = None, rollout_is_weights: Tensor | None = None,
                     **_: Any) -> tuple[Tensor, dict[str, float]]:
    """DAPO's clipped loss with dual clip, from :func:`saetune.rl.losses.policy_loss`:
    ``ℓ = −min(r·Â, clip(r, 1−ε_low, 1+ε_high)·Â)``, ``ℓ ← min(ℓ, −c·Â)`` where ``Â < 0``.

    ``ε_low``/``ε_high`` are the actor's ``clip_ratio_low``/``clip_ratio_high`` (each falling
    back to ``clip_ratio``), ``c`` its ``clip_ratio_c``; aggregation is ``loss_agg_mode``
    rescaled by :func:`global_batch_scale`. Dr.GRPO's ``seq-mean-token-sum-norm`` divides by the
    constant verl's own aggregation uses: ``global_batch_info["loss_scale_factor"]`` (verl copies the
    actor's ``loss_scale_factor`` there before each call) or else the response width, which verl's
    rollout pads to ``rollout.response_length`` — a constant of the run either way. Rollout
    importance weights (verl's rollout correction) are not applied by this loss: passing them is
    an error, not a silent change.
    """
    if rollout_is_weights is not None:
        raise SaetuneError("loss_mode=saetune_dapo does not apply rollout importance weights; turn off "
                           "algorithm.rollout_correction or use loss_mode=vanilla")
    clip = float(_cfg_get(config, "clip_ratio", 0.2))
    info = dict(_cfg_get(config, "global_batch_info", {}) or {})
    agg = resolve_agg_mode(loss_agg_mode)
    norm = info.get("loss_scale_factor")  # as verl's agg_loss: this, else the mask's width
    loss, metrics = policy_loss(
        log_prob, old_log_prob, advantages, response_mask,
        clip_low=float(_cfg_get(config, "clip_ratio_low", clip)),
        clip_high=float(_cfg_get(config, "clip_ratio_high", clip)),
        dual_clip=float(_cfg_get(config, "clip_ratio_c", 3.0)), agg=agg,
        norm_length=float(norm) if norm else None)
    scale = global_batch_scale(response_mask, agg, info.get("dp_size", 1), info.get("batch_num_tokens"),
                               info.get("global_batch_size"))
    n = max(metrics["n_tokens"], 1)
    with torch.no_grad():
        log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
        ppo_kl = float(torch.where(_as_mask(response_mask), -log_ratio, torch.zeros(())).sum() / n)
    return loss * scale, {
        "actor/pg_clipfrac": metrics["clipfrac_low"] + metrics["clipfrac_high"],
        "actor/pg_clipfrac_lower": metrics["clipfrac_dual"],
        "actor/ppo_kl": ppo_kl,
        "actor/ratio_mean": metrics["ratio_mean"],
    }
