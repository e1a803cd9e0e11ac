"""saetune rewards as TRL reward functions (``GRPOTrainer(reward_funcs=[...])``).

TRL calls each reward function as ``f(prompts=..., completions=..., completion_ids=..., **kw)``
where ``kw`` holds every other dataset column (one value per completion, e.g. ``answer``) plus
TRL's own keys (``trainer_state``, ``log_extra``, …); it wants one float per completion, or
``None`` where the reward does not apply (TRL then ignores it for that sample). Completions are
strings, or, for conversational datasets, lists of ``{"role", "content"}`` messages (the last
message's content is graded). The function's ``__name__`` is the name TRL logs it under.

    from saetune.rl.integrations.trl import correctness_reward, correctness_or_rpr_reward, rpr_reward
    trainer = GRPOTrainer(model, reward_funcs=[correctness_or_rpr_reward], ...)  # the noisy-rewards paper's

TRL sums its reward functions, so ``[correctness_reward, rpr_reward]`` is RPR *added* to
correctness, which the reference never does; :func:`make_rpr_reward` builds one function that
joins them as the paper does (:func:`saetune.rl.rewards.combine_rpr`: ``wrong_only`` or ``alone``).

A reward that fails raises (TRL stops the step): a silent 0 would train on a wrong signal.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from saetune.errors import SaetuneError
from saetune.rl import rewards as _rewards

__all__ = ["completion_text", "correctness_or_rpr_reward", "correctness_reward", "make_reward", "make_rpr_reward",
           "rpr_reward", "toy_correctness_reward"]


def completion_text(completion: Any) -> str:
    """The text of one TRL completion: a string, or the content of the last message of a list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # multimodal content parts: keep the text parts
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise SaetuneError(f"a TRL completion must be a string or a list of messages, got {type(completion).__name__}: "
                       f"{completion!r:.80}")


def _golds(kwargs: dict, field: str, n: int) -> list[Any]:
    if field not in kwargs:
        cols = sorted(k for k in kwargs if k not in ("trainer_state", "log_extra", "log_metric"))
        raise SaetuneError(f"the dataset has no {field!r} column, which this reward grades against; columns passed "
                           f"by TRL: {cols}")
    golds = list(kwargs[field])
    if len(golds) != n:
        raise SaetuneError(f"{len(golds)} {field!r} values for {n} completions")
    return golds


def make_reward(fn: Callable[..., float], name: str, needs_answer: bool, answer_field: str = "answer",
                tokenizer: Any = None):
    """Wrap ``fn(text)`` or ``fn(text, answer)`` as a TRL reward function named ``name``.

    ``tokenizer`` (an object, or a zero-argument callable returning one): grade
    ``tokenizer.decode(completion_ids[i], skip_special_tokens=False)`` instead of TRL's text,
    which has special tokens stripped (the toy's ``<answer>`` tags are special tokens).
    A missing gold answer (``None``) gives ``None`` for that completion; a NaN or a raise stops
    with an error naming the reward and the completion.
    """
    def reward(prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (),
               completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[float | None]:
        if tokenizer is not None and completion_ids is not None:
            tok = tokenizer() if callable(tokenizer) and not hasattr(tokenizer, "decode") else tokenizer
            if len(completion_ids) != len(completions):
                raise SaetuneError(f"{len(completion_ids)} completion_ids for {len(completions)} completions")
            texts = [tok.decode(list(ids), skip_special_tokens=False) for ids in completion_ids]
        else:
            texts = [completion_text(c) for c in completions]
        golds = _golds(kwargs, answer_field, len(texts)) if needs_answer else [None] * len(texts)
        out: list[float | None] = []
        for i, (t, g) in enumerate(zip(texts, golds)):
            if needs_answer and g is None:
                out.append(None)
                continue
            try:
                v = float(fn(t, g) if needs_answer else fn(t))
            except Exception as e:
                raise SaetuneError(f"reward {name!r} failed on completion {i}: {type(e).__name__}: {e}") from e
            if math.isnan(v):
                raise SaetuneError(f"reward {name!r} returned NaN on completion {i}")
            out.append(v)
        return out

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = f"saetune reward {name!r} in TRL's reward-function signature."
    return reward


def _toy_correct(text: str, answer: Any) -> float:
    from saetune.toy.task import is_correct
    return 1.0 if is_correct(text, answer) else 0.0


#: 1.0 when the completion's answer matches the ``answer`` column (math-verify, saetune.evaluate).
correctness_reward = make_reward(_rewards.correctness_reward, "correctness", needs_answer=True)
def _toy_tokenizer():
    global _TOY_TOK
    if _TOY_TOK is None:
        from saetune.toy.tokenizer import build_tokenizer
        _TOY_TOK = build_tokenizer()
    return _TOY_TOK


_TOY_TOK = None
#: The toy task's exact match of the last ``<answer> … </answer>`` with the ``answer`` column
#: (graded on ``completion_ids`` decoded with the toy tokenizer, tags kept).
toy_correctness_reward = make_reward(_toy_correct, "toy_correctness", needs_answer=True, tokenizer=_toy_tokenizer)
#: The Reasoning Pattern Reward (SPEC_RL.md), no gold needed.
rpr_reward = make_reward(_rewards.reasoning_pattern_reward, "rpr", needs_answer=False)


def make_rpr_reward(mode: str = "wrong_only", grader: Callable[[str, Any], float] | None = None,
                    rpr_weight: float = 1.0, name: str | None = None, answer_field: str = "answer",
                    tokenizer: Any = None):
    """One TRL reward joining correctness and RPR: ``combine_rpr(grader(text, gold), rpr_weight·RPR(text), mode)``.

    ``mode``: ``wrong_only`` (default; the "noisy rewards" paper: a correct answer gets its
    correctness reward, a wrong one its RPR), ``alone`` (RPR only; no gold needed) or ``add``.
    ``grader`` defaults to math-verify (:func:`saetune.rl.rewards.correctness_reward`);
    ``tokenizer`` as in :func:`make_reward`. Named ``correctness_rpr_<mode>`` unless ``name``.
    """
    if mode not in _rewards.RPR_MODES:
        raise SaetuneError(f"unknown rpr mode {mode!r}; valid: {', '.join(_rewards.RPR_MODES)}")
    if isinstance(rpr_weight, bool) or not isinstance(rpr_weight, (int, float)) or not math.isfinite(rpr_weight):
        raise SaetuneError(f"rpr_weight must be a finite number, got {rpr_weight!r}")
    grade = grader or _rewards.correctness_reward

    def joined(text: str, gold: Any = None) -> float:
        rpr = rpr_weight * _rewards.reasoning_pattern_reward(text)
        correct = 0.0 if mode == "alone" else float(grade(text, gold))
        return _rewards.combine_rpr(correct, rpr, mode)

    if mode == "alone":
        return make_reward(lambda text: joined(text), name or "rpr_alone", needs_answer=False, tokenizer=tokenizer)
    return make_reward(joined, name or f"correctness_rpr_{mode}", needs_answer=True, answer_field=answer_field,
                       tokenizer=tokenizer)


#: Math-verify correctness for a correct answer, its RPR for a wrong one (the "noisy rewards" paper).
correctness_or_rpr_reward = make_rpr_reward("wrong_only", name="correctness_or_rpr")
