"""SAE quality as the field measures it. Pure functions on tensors.

- FVU  = ‖x − x̂‖² / Σ_b ‖x_b − x̄‖²  (fraction of variance unexplained; Resa's loss)
- MSE  = mean over tokens of ‖x − x̂‖²
- L0   = mean number of active latents per token
- dead fraction = share of latents that did not fire in the last ``dead_tokens`` tokens
- CE loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean), with the SAE's reconstruction
  (resp. zeros) spliced in place of the activation; 1 = as good as the clean model
- KL(clean ‖ spliced) per token, in nats
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def total_variance(x: Tensor) -> Tensor:
    return (x - x.mean(0)).pow(2).sum()


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    return (x_hat - x).pow(2).sum() / total_variance(x).clamp_min(1e-12)


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    return (x_hat - x).pow(2).sum(-1).mean()


def l0(acts: Tensor) -> Tensor:
    return (acts > 0).float().sum(-1).mean()


def ablation_score(with_ablation: float, with_sae: float, reference: float) -> float:
    """``(with_ablation − with_sae) / (with_ablation − reference)``; NaN when the ablation changes nothing."""
    denom = with_ablation - reference
    return float("nan") if abs(denom) < 1e-12 else (with_ablation - with_sae) / denom


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """(CE_zero − CE_sae) / (CE_zero − CE_clean) (SAEBench's ``ce_loss_score``)."""
    return ablation_score(ce_zero, ce_sae, ce_clean)


def ce_per_position(logits: Tensor, ids: Tensor) -> Tensor:
    """[B, T−1] next-token cross-entropy (float32) of [B, T, V] logits on [B, T] ids."""
    B, T, V = logits.shape
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1),
                           reduction="none").view(B, T - 1)


def next_token_ce(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of [B, T, V] logits on [B, T] ids."""
    return ce_per_position(logits, ids).mean()


def kl_from_logp(logp_clean: Tensor, logits: Tensor) -> Tensor:
    """[..., V] → [...]: KL(P_clean ‖ P) = Σ_v p_clean (log p_clean − log p), P_clean given as float32 log-probs
    (computed once when several ``logits`` are compared with one clean run)."""
    lq = logits.float().log_softmax(-1)
    return (logp_clean.exp() * (logp_clean - lq)).sum(-1)


def kl_per_position(clean_logits: Tensor, logits: Tensor) -> Tensor:
    """[..., V] → [...]: KL(P_clean ‖ P) per position, in float32."""
    return kl_from_logp(clean_logits.float().log_softmax(-1), logits)


def kl_per_token(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Mean over tokens of KL(p ‖ q) for [..., V] logits."""
    return kl_per_position(logits_p, logits_q).mean()
