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


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    denom = ce_zero - ce_clean
    return float("nan") if abs(denom) < 1e-12 else (ce_zero - ce_sae) / denom


def next_token_ce(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of [B, T, V] logits on [B, T] ids."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def kl_per_token(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Mean over tokens of KL(p ‖ q) for [..., V] logits."""
    lp = logits_p.float().log_softmax(-1)
    lq = logits_q.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()
