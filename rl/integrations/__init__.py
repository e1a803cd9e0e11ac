"""saetune's rewards and algorithms for the RL engines people run at scale.

- :mod:`saetune.rl.integrations.trl` — TRL ``GRPOTrainer`` reward functions,
  ``f(prompts, completions, completion_ids, **kwargs) -> list[float | None]``;
- :mod:`saetune.rl.integrations.verl` — a verl ``compute_score(data_source, solution_str,
  ground_truth, extra_info=None)`` (plain Python, no verl import);
- :mod:`saetune.rl.integrations.verl_plugin` — registers saetune's advantage estimators,
  policy loss, reward manager and CURE branch agent loop in verl's registries (loaded by verl
  itself through the ``verl.plugins`` entry point); the pieces live in ``verl_algos``,
  ``verl_reward`` and ``verl_cure``; ``verl_run`` writes verl datasets and runs recipes.

``pip install saetune[trl]`` brings TRL, ``saetune[verl]`` verl.
"""
