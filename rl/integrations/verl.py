"""saetune rewards as a verl custom reward function.

verl calls ``compute_score(data_source, solution_str, ground_truth, extra_info=None)`` once per
response (``custom_reward_function.path`` = this file, ``.name`` = ``compute_score``) and accepts
a float or a dict with a ``"score"`` key whose other keys it logs. Here::

    score = combine_rpr(correctness, rpr_weight · RPR, rpr_mode)

(:func:`saetune.rl.rewards.combine_rpr`: ``add`` = the sum; ``wrong_only`` = correctness for a
correct answer, the weighted RPR for a wrong one, as the "noisy rewards" paper; ``alone`` = RPR
only). ``correctness`` is the toy task's exact match when ``data_source`` starts with
``"saetune/toy"`` (or is ``"toy"``), else math-verify (``saetune.evaluate.is_correct``, gold
first); ``rpr_mode`` comes from ``extra_info["rpr_mode"]`` (default ``add``) and ``rpr_weight``
from ``extra_info["rpr_weight"]`` (default 0 for ``add``, else 1, the paper's);
``extra_info["correctness_reward"] = "signed"`` makes correctness +1/−1 (DAPO's math reward)
instead of 1/0. The dict holds
the parts, ``acc`` (1 correct, 0 wrong: what verl's ``algorithm.filter_groups.metric=acc`` reads)
and the number of RPR phrases that fired. A grader error raises: verl then fails the batch
instead of training on 0.
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
    """verl's custom reward signature; returns ``{"score", "acc", "correctness", "rpr", "rpr_hits"}``."""
    if not isinstance(solution_str, str):
        raise SaetuneError(f"solution_str must be a str, got {type(solution_str).__name__}")
    extra = extra_info or {}
    mode = str(extra.get("rpr_mode") or "add")
    if mode not in _rewards.RPR_MODES:
        raise SaetuneError(f"extra_info['rpr_mode'] must be one of {', '.join(_rewards.RPR_MODES)}, got {mode!r}")
    w = extra.get("rpr_weight")
    w = float((0.0 if mode == "add" else 1.0) if w is None else w)
    kind = str(extra.get("correctness_reward") or "binary")
    if kind not in ("binary", "signed"):
        raise SaetuneError(f"extra_info['correctness_reward'] must be 'binary' or 'signed', got {kind!r}")
    if not math.isfinite(w):
        raise SaetuneError(f"extra_info['rpr_weight'] must be a finite number, got {w!r}")
    if _is_toy(str(data_source)):
        from saetune.toy.task import is_correct
        correct = 1.0 if is_correct(solution_str, ground_truth) else 0.0
    else:
        correct = _rewards.correctness_reward(solution_str, ground_truth)
    rpr = _rewards.reasoning_pattern_reward(solution_str)
    acc, correct = correct, (2.0 * correct - 1.0 if kind == "signed" else correct)
    return {"score": _rewards.combine_rpr(correct, w * rpr, mode), "acc": acc, "correctness": correct, "rpr": rpr,
            "rpr_hits": len(_rewards.reasoning_pattern_hits(solution_str))}
