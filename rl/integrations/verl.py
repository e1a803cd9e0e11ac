"""saetune rewards as a verl custom reward function.

verl calls ``compute_score(data_source, solution_str, ground_truth, extra_info=None)`` once per
response (``custom_reward_function.path`` = this file, ``.name`` = ``compute_score``) and accepts
a float or a dict with a ``"score"`` key whose other keys it logs. Here::

    score = correctness + rpr_weight · RPR

``correctness`` is the toy task's exact match when ``data_source`` starts with ``"saetune/toy"``
(or is ``"toy"``), else math-verify (``saetune.evaluate.is_correct``, gold first); ``rpr_weight``
comes from ``extra_info["rpr_weight"]`` (default 0). The dict holds the parts and the RPR
phrases that fired. A grader error raises: verl then fails the batch instead of training on 0.
"""

from __future__ import annotations

import math
from typing import Any

from saetune.errors import SaetuneError
from saetune.rl import rewards as _rewards

__all__ = ["compute_score"]


def _is_toy(data_source: str) -> bool:
    return data_source == "toy" or data_source.startswith("saetune/toy")


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None) -> dict:
    """verl's custom reward signature; returns ``{"score", "correctness", "rpr", "rpr_hits"}``."""
    if not isinstance(solution_str, str):
        raise SaetuneError(f"solution_str must be a str, got {type(solution_str).__name__}")
    extra = extra_info or {}
    w = float(extra.get("rpr_weight", 0.0))
    if not math.isfinite(w):
        raise SaetuneError(f"extra_info['rpr_weight'] must be a finite number, got {w!r}")
    if _is_toy(str(data_source)):
        from saetune.toy.task import is_correct
        correct = 1.0 if is_correct(solution_str, ground_truth) else 0.0
    else:
        correct = _rewards.correctness_reward(solution_str, ground_truth)
    rpr = _rewards.reasoning_pattern_reward(solution_str)
    return {"score": correct + w * rpr, "correctness": correct, "rpr": rpr,
            "rpr_hits": len(_rewards.reasoning_pattern_hits(solution_str))}
