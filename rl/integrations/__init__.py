"""saetune's rewards for the RL engines people run at scale.

- :mod:`saetune.rl.integrations.trl` — TRL ``GRPOTrainer`` reward functions,
  ``f(prompts, completions, completion_ids, **kwargs) -> list[float | None]``;
- :mod:`saetune.rl.integrations.verl` — a verl ``compute_score(data_source, solution_str,
  ground_truth, extra_info=None)``.

Neither imports its engine: the functions are plain Python, so they can be tested (and used)
without TRL or verl installed. ``pip install saetune[trl]`` brings TRL.
"""
