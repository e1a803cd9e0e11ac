"""Group-relative advantages and reward shaping: GRPO, Dr.GRPO, DAPO's filters and penalties.

Rewards are 1-D ``[N]`` (one per response); a *group* is the G responses of one prompt, given
either as ``group_size`` (contiguous blocks of G) or as ``group_ids`` ``[N]`` (any ids).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from saetune.errors import SaetuneError
from saetune.rl.losses import _as_mask


def _rewards_1d(rewards) -> Tensor:
    r = rewards if isinstance(rewards, Tensor) else torch.as_tensor(rewards)
    if r.dim() != 1:
        raise SaetuneError(f"rewards must be 1-D [N] (one per response), got shape {tuple(r.shape)}")
    return r if r.is_floating_point() else r.float()


def _group_index(n: int, group_ids=None, group_size: int | None = None) -> tuple[Tensor, int]:
    """Return ``(inverse [N] long, number of groups)`` from ids or a contiguous group size."""
    if (group_ids is None) == (group_size is None):
        raise SaetuneError("give exactly one of group_ids and group_size")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise SaetuneError(f"group_size must be a positive int, got {group_size!r}")
        if n % group_size:
            raise SaetuneError(f"{n} rewards cannot be split into groups of group_size={group_size}")
        return torch.arange(n) // group_size, n // group_size
    ids = group_ids if isinstance(group_ids, Tensor) else torch.as_tensor(group_ids)
    if ids.shape != (n,):
        raise SaetuneError(f"group_ids has shape {tuple(ids.shape)}, expected ({n},) like rewards")
    _, inverse = torch.unique(ids, return_inverse=True)
    return inverse.long(), int(inverse.max()) + 1 if n else 0


def grpo_advantages(
    rewards: Tensor | Sequence[float],
    group_ids: Tensor | Sequence | None = None,
    group_size: int | None = None,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024): ``Â_i = (R_i − mean_g R) / (std_g R + ε)``.

    ``std`` uses Bessel's correction, like ``torch.std``; ``ε = 1e-6`` is verl's (TRL uses
    1e-4). ``scale_by_std=False`` is Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
    Training"): ``Â_i = R_i − mean_g R``, no division. A group whose rewards all agree gets 0;
    a group of one gets 0 (not ``nan``; verl instead passes its raw reward through).
    Computed in float64, returned in the rewards' float dtype (float32 for integer rewards).
    """
    r = _rewards_1d(rewards)
    if not eps >= 0:
        raise SaetuneError(f"eps must be ≥ 0, got {eps!r}")
    inv, g = _group_index(r.numel(), group_ids, group_size)
    inv = inv.to(r.device)
    x = r.double()
    count = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, inv, torch.ones_like(x))
    mean = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, inv, x) / count
    centred = x - mean[inv]
    adv = centred
    if scale_by_std:
        ss = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, inv, centred**2)
        std = torch.sqrt(ss / (count - 1).clamp(min=1))
        adv = centred / (std[inv] + eps)
    adv = torch.where(count[inv] > 1, adv, torch.zeros_like(adv))
    return adv.to(r.dtype)


def dynamic_sampling_filter(rewards: Tensor | Sequence[float], group: int | Tensor | Sequence) -> Tensor:
    """DAPO's dynamic sampling (Yu et al. 2025): bool keep-mask ``[N]`` over responses, True for
    the responses of groups whose rewards do **not** all agree (all-correct or all-wrong groups
    give zero GRPO advantage, hence no gradient). A group of one is dropped (it trivially agrees).

    ``group`` is the group size (int, contiguous groups) or the per-response group ids ``[N]``.
    """
    r = _rewards_1d(rewards)
    if isinstance(group, int) and not isinstance(group, bool):
        inv, g = _group_index(r.numel(), group_size=group)
    else:
        inv, g = _group_index(r.numel(), group_ids=group)
    inv = inv.to(r.device)
    gmax = torch.full((g,), -torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(
        0, inv, r.double(), reduce="amax"
    )
    gmin = torch.full((g,), torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(
        0, inv, r.double(), reduce="amin"
    )
    return (gmax > gmin)[inv]


def overlong_penalty(lengths, max_len: int, buffer: int, penalty_factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment: ``min(−(L − (Lmax − B))/B, 0)·penalty_factor``.

    0 while ``L ≤ Lmax − B``, then falls linearly to −1 at ``L = Lmax`` (and keeps falling past
    it, as verl computes it; generation normally stops at Lmax). Settings: the DAPO paper uses
    ``B = 4096`` with ``Lmax = 20480``; CURE's recipe ``B = 512``. Returns float32 ``[N]``.
    """
    if not (isinstance(max_len, int) and isinstance(buffer, int) and 0 < buffer <= max_len):
        raise SaetuneError(f"need ints 0 < buffer ≤ max_len, got buffer={buffer!r}, max_len={max_len!r}")
    L = (lengths if isinstance(lengths, Tensor) else torch.as_tensor(lengths)).float()
    if (L < 0).any():
        raise SaetuneError(f"lengths must be ≥ 0, got min {float(L.min())}")
    pen = -(L - (max_len - buffer)) / buffer * penalty_factor
    return torch.where(L > max_len - buffer, pen, torch.zeros_like(pen))


def broadcast_to_tokens(adv: Tensor, mask: Tensor) -> Tensor:
    """Per-response advantages ``[B]`` → per-token ``[B, T]``: ``Â_{b,t} = Â_b·m_{b,t}`` (0 at padding)."""
    m = _as_mask(mask)
    if not isinstance(adv, Tensor) or adv.shape != m.shape[:1]:
        shape = tuple(adv.shape) if isinstance(adv, Tensor) else type(adv).__name__
        raise SaetuneError(f"adv has shape {shape}, expected [B]={tuple(m.shape[:1])} for mask {tuple(m.shape)}")
    dtype = adv.dtype if adv.is_floating_point() else torch.float32
    return torch.where(m, adv[:, None].to(dtype), torch.zeros((), dtype=dtype, device=adv.device))
