"""saetune.rl: the RL-for-reasoning pieces, as pure functions exact to their published code, and a
single-node trainer around them.

- ``entropy``: per-token entropy, masked statistics, the 80/20 high-entropy mask, Clip-Cov / KL-Cov
- ``advantages``: GRPO / Dr.GRPO advantages, DAPO's dynamic-sampling filter and overlong shaping
- ``losses``: clipped policy loss (dual clip, KL k3, entropy bonus, pg coefficient, three
  aggregations), REDI's offline loss
- ``rewards``: correctness, reasoning-pattern reward (RPR) and its hits, reward flipping, HAPO, OTC,
  AdaptThink, RLPR, weighted composition
- ``cure``: CURE's critical-token selection, branch prompts and group assembly
- ``tools``: the calculator tool (a bounded, ast-based arithmetic evaluator)
- ``rollout``: batched HF sampling with per-token log-probs and entropies, stop strings, tool calls
- ``trainer``: ``RLConfig`` and ``train(cfg, out)`` — GRPO/DAPO, CURE stages 1 and 2, run dirs
  with metrics, traces and checkpoints (``saetune rl`` on the command line)
- ``integrations``: saetune's rewards for TRL (``integrations.trl``) and verl (``integrations.verl``)

``saetune.rl.train`` and ``saetune.rl.RLConfig`` load the trainer on first use.
"""

from __future__ import annotations

if __name__ != "saetune.rl":  # found as a top-level `rl` from a checkout root: see saetune/_checkout.py
    from saetune._checkout import hand_over

    hand_over(__name__, __file__)
else:
    from saetune._lazy import lazy_exports

    _LAZY = {"train": "saetune.rl.trainer", "RLConfig": "saetune.rl.trainer"}

    __all__ = sorted(_LAZY)

    __getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)
