"""The ``saetune`` reward manager for verl's reward loop (``reward.reward_manager.name=saetune``).

Per response (verl calls :meth:`SaetuneRewardManager.run_single` on one-row batches)::

    score = combine_rpr(correctness, rpr_weight · RPR, rpr_mode) + overlong_penalty(L)

``correctness`` and ``RPR`` come from :func:`saetune.rl.integrations.verl.compute_score`
(math-verify, gold first, or the toy task's exact match; the 40-phrase reasoning-pattern
reward) and are joined by :func:`saetune.rl.rewards.combine_rpr` (``wrong_only``, the "noisy
rewards" paper's: a wrong answer gets its RPR instead of 0; ``alone``; ``add``, the default);
``rpr_mode`` and ``rpr_weight`` are the row's ``extra_info`` values (written by
``saetune verl-data --rpr-mode/--rpr-weight``) or else ``reward.reward_kwargs.rpr_mode`` /
``.rpr_weight`` (and ``correctness_reward``: ``signed`` for DAPO's ±1). The extra info
carries ``acc`` for ``algorithm.filter_groups.metric=acc``. The overlong term is DAPO's soft punishment ``min(−(L − (L_max − B))/B, 0)`` when ``reward.reward_kwargs``
sets ``max_resp_len`` and ``overlong_buffer_len`` (CURE's recipe: B = 512). A custom
``compute_score`` configured in verl (``custom_reward_function``) replaces saetune's.
The response is decoded with its special tokens except padding and EOS (the toy's tags are
special tokens). Grading runs in verl's executor threads; saetune's grader bounds math-verify there through
its worker process (signals only work in a main thread).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from verl import DataProto
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from saetune.errors import SaetuneError
from saetune.rl.advantages import overlong_penalty
from saetune.rl.integrations.verl import compute_score as saetune_compute_score
from saetune.rl.rewards import RPR_MODES

__all__ = ["SaetuneRewardManager"]


def _kwargs(config: Any) -> dict:
    reward = config.get("reward", {}) if hasattr(config, "get") else {}
    return dict((reward or {}).get("reward_kwargs", {}) or {})


class SaetuneRewardManager(RewardManagerBase):
    """verl ``RewardManagerBase`` scoring with saetune's correctness and RPR (+ DAPO overlong penalty)."""

    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None,
                 reward_model_tokenizer=None, **_: Any):
        super().__init__(config, tokenizer, compute_score)
        from verl.utils.reward_score import default_compute_score
        # verl hands every manager its own default grader; saetune's replaces that one only.
        custom = compute_score is not None and compute_score is not default_compute_score
        self.compute_score = compute_score if custom else saetune_compute_score
        self.is_async = inspect.iscoroutinefunction(self.compute_score)
        kw = _kwargs(config)
        self.rpr_weight = kw.get("rpr_weight")
        self.rpr_mode = kw.get("rpr_mode")
        self.correctness_reward = kw.get("correctness_reward")
        if self.correctness_reward not in (None, "binary", "signed"):
            raise SaetuneError("reward.reward_kwargs.correctness_reward must be 'binary' (1/0) or 'signed' (+1/-1), "
                               f"got {self.correctness_reward!r}")
        if self.rpr_mode is not None and self.rpr_mode not in RPR_MODES:
            raise SaetuneError(f"reward.reward_kwargs.rpr_mode must be one of {', '.join(RPR_MODES)}, "
                               f"got {self.rpr_mode!r}")
        self.max_resp_len = kw.get("max_resp_len")
        self.overlong_buffer_len = kw.get("overlong_buffer_len")
        if (self.max_resp_len is None) != (self.overlong_buffer_len is None):
            raise SaetuneError("reward.reward_kwargs needs both max_resp_len and overlong_buffer_len for the overlong "
                               f"penalty (or neither), got max_resp_len={self.max_resp_len!r}, "
                               f"overlong_buffer_len={self.overlong_buffer_len!r}")
        if self.max_resp_len is not None and not 0 < int(self.overlong_buffer_len) <= int(self.max_resp_len):
            raise SaetuneError(f"need 0 < overlong_buffer_len ≤ max_resp_len, got {self.overlong_buffer_len!r} "
                               f"and {self.max_resp_len!r}")

    async def run_single(self, data: DataProto) -> dict:
        item = data[-1:][0]  # one trajectory; for multi-sequence outputs the last one is scored
        response_ids = item.batch["responses"]
        n_valid = int(item.batch["attention_mask"][-response_ids.shape[-1]:].sum())
        drop = {t for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if t is not None}
        # Special tokens other than padding/EOS are kept: the toy's <think>/<answer> tags are special
        # tokens, and verl's default decode(skip_special_tokens=True) would erase the answer.
        valid = [int(t) for t in response_ids[:n_valid].tolist() if int(t) not in drop]
        ground_truth = item.non_tensor_batch["reward_model"]["ground_truth"]
        extra_info = dict(item.non_tensor_batch.get("extra_info", None) or {})
        for key in ("rpr_weight", "rpr_mode", "correctness_reward"):  # the row's own setting wins
            if getattr(self, key) is not None and key not in extra_info:
                extra_info[key] = getattr(self, key)
        loop = asyncio.get_running_loop()
        text = await loop.run_in_executor(None, lambda: self.tokenizer.decode(valid, skip_special_tokens=False))
        args = dict(data_source=item.non_tensor_batch["data_source"], solution_str=text,
                    ground_truth=ground_truth, extra_info=extra_info)
        if self.is_async:
            result = await self.compute_score(**args)
        else:
            result = await loop.run_in_executor(None, lambda: self.compute_score(**args))
        info = dict(result) if isinstance(result, dict) else {"acc": float(result)}
        score = float(info["score"] if isinstance(result, dict) else result)
        if self.max_resp_len is not None:
            pen = float(overlong_penalty([n_valid], int(self.max_resp_len), int(self.overlong_buffer_len))[0])
            info["overlong_penalty"] = pen
            score += pen
        info["score"] = score
        return {"reward_score": score, "reward_extra_info": info}
