"""saetune.rl: the RL-for-reasoning pieces, as pure functions exact to their published code.

- ``entropy``: per-token entropy, masked statistics, the 80/20 high-entropy mask, Clip-Cov / KL-Cov
- ``advantages``: GRPO / Dr.GRPO advantages, DAPO's dynamic-sampling filter and overlong shaping
- ``losses``: clipped policy loss (dual clip, KL k3, entropy bonus, pg coefficient, three
  aggregations), REDI's offline loss
- ``rewards``: correctness, reasoning-pattern reward (RPR) and its hits, reward flipping, HAPO, OTC,
  AdaptThink, RLPR, weighted composition
- ``cure``: CURE's critical-token selection, branch prompts and group assembly

The trainer that puts them to work is not built yet.
"""
