"""A verl-shaped PPO batch for tests that run verl's engine-side ``ppo_loss``: left-padded prompts, right-padded
responses, and the flat per-token log-probs a model engine returns (per sequence its prompt and response
tokens, shifted by one)."""

from __future__ import annotations

import torch


def engine_batch(plen: list[int], rlen: list[int], p: int, r: int, seed: int, spread: float) -> dict:
    """``attn`` [b, p + r], ``rmask`` [b, r], ``old``/``adv``/``lp`` [b, r] and ``flat`` [Σ plen + rlen − 1 …]:
    prompt ``i`` holds ``plen[i]`` tokens of ``p``, response ``i`` ``rlen[i]`` of ``r``; ``lp`` is ``old`` moved
    by ``spread`` × N(0, 1) (so the clip engages)."""
    g = torch.Generator().manual_seed(seed)
    b = len(plen)
    attn = torch.zeros(b, p + r, dtype=torch.long)
    for i in range(b):
        attn[i, p - plen[i]:p + rlen[i]] = 1
    rmask = attn[:, p:].clone()
    old = -torch.rand(b, r, generator=g) * 2
    adv = torch.randn(b, r, generator=g)
    lp = (old + spread * torch.randn(b, r, generator=g)) * rmask
    flat = torch.cat([torch.cat([torch.zeros(plen[i] - 1), lp[i, :rlen[i]], torch.zeros(1)]) for i in range(b)])
    return {"attn": attn, "rmask": rmask, "old": old, "adv": adv, "lp": lp, "flat": flat}
