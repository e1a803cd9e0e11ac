"""Reward functions for RL on reasoning traces: pure functions, one small stateful history.

What is here, and where each formula comes from (details in ``../shared/SPEC_RL.md``):

- :func:`correctness_reward` — the verifiable 0/1 reward.
- :func:`reasoning_pattern_reward` (RPR) and :func:`reasoning_pattern_hits` — the
  Reasoning Pattern Reward of the "noisy rewards" paper, its reward-model variant
  (:func:`reasoning_pattern_reward_rm`, :func:`combine_with_reward_model`), how it joins
  correctness (:func:`combine_rpr`) and its per-group reward flipping (:func:`flip_group_rewards`).
- HAPO length reward (:class:`HapoHistory`, :func:`hapo_length_reward`, :func:`hapo_reward`).
- OTC tool-call rewards (:func:`otc_ppo_tool_reward`, :func:`otc_grpo_tool_reward`,
  :func:`otc_reward`, :func:`otc_group_rewards`, :func:`tool_productivity`).
- AdaptThink (:func:`adaptthink_reward`, :func:`is_no_thinking`).
- RLPR probability reward (:func:`rlpr_probability_reward`, :func:`rlpr_reward`,
  :func:`rlpr_std_filter`, :func:`rlpr_update_threshold`).
- Composition (:class:`RewardSpec`, :func:`compose_rewards`).
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from saetune.errors import SaetuneError

# --------------------------------------------------------------------------- correctness


def correctness_reward(response: str, answer: Any) -> float:
    """Verifiable correctness reward: 1.0 if ``response`` answers ``answer``, else 0.0.

    The grader is ``saetune.evaluate.is_correct`` (math-verify) when that module exists; only
    when the module itself is absent does it fall back to the toy task's exact match of the
    last ``<answer> … </answer>`` (``saetune.toy.task.is_correct``). An ImportError raised
    *inside* ``saetune.evaluate`` (e.g. math-verify missing) propagates: switching graders
    silently would change results.
    """
    try:
        from saetune.evaluate import is_correct  # lazy: the module may not exist yet
    except ModuleNotFoundError as err:
        if err.name != "saetune.evaluate":
            raise
        from saetune.toy.task import is_correct
    return 1.0 if is_correct(response, answer) else 0.0


# --------------------------------------------------------------------------- RPR

#: The 40 reasoning phrases of the "noisy rewards" paper's RPR, verbatim: trailing spaces
#: matter and the typo ``makes sence`` is the original's.
REASONING_PATTERNS: tuple[str, ...] = (
    "i need to", "we need to", "wait", "alternatively", "let me check", "let me see",
    "let's focus on", "we know that", "we can observe ", "we can see ", "let me try",
    "let's try", "let us try", "first, ", "firstly, ", "next, ", "finally, ",
    "let us first", "let's first", "let me first", "try again", "still not",
    "not working", "not correct", "does not work", "doesn't work", "makes sence",
    "since we ", "because we ", "consequently", "as a result", "thus", "therefore",
    "hence", "so that", "thereby", "if we", "given there ", "for instance ", "for example ",
)

#: The 13 extra phrases of the reward-model variant (53 phrases in all).
REASONING_PATTERNS_RM_EXTRA: tuple[str, ...] = (
    "1. ", "2. ", "3. ", "4. ", "step 1 ", "step 2 ", "step 3. ", "step 4 ",
    "considering the", "i'll", "i will", "i would", "i should",
)
REASONING_PATTERNS_RM: tuple[str, ...] = REASONING_PATTERNS + REASONING_PATTERNS_RM_EXTRA

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
RPR_HITS_FOR_FULL = 20  # min(1, hits / 20)
RPR_NGRAM = 20  # rep20 uses whitespace-word 20-grams
USER_TURN = "user: "


def _check_text(text: Any, name: str = "text") -> str:
    if not isinstance(text, str):
        raise SaetuneError(f"{name} must be a str, got {type(text).__name__} ({text!r:.80})")
    return text


def _thinking_offset(text: str) -> int:
    """Index in ``text`` where the scored part starts: just after the first ``<think>``, or 0."""
    i = text.find(THINK_OPEN)
    return 0 if i < 0 else i + len(THINK_OPEN)


def _scored_text(text: str) -> str:
    return text[_thinking_offset(text):].lower()


def repetition_rate(text: str, n: int = RPR_NGRAM) -> float:
    """rep_n = #(distinct whitespace-word n-grams occurring more than once) / #(n-grams).

    0.0 when the text has fewer than ``n`` words. RPR uses ``n = 20``.
    """
    words = text.split()
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    repeated = sum(1 for c in counts.values() if c > 1)
    return repeated / (len(words) - n + 1)


def _pattern_score(scored: str, patterns: Sequence[str]) -> float:
    hits = sum(1 for p in patterns if p in scored)  # presence, not occurrences
    return min(1.0, hits / RPR_HITS_FOR_FULL) - repetition_rate(scored)


def reasoning_pattern_reward(text: str) -> float:
    """Reasoning Pattern Reward (RPR; "noisy rewards" paper), in [0, 1].

    ``t`` = the response after its first ``<think>`` (the whole response without one),
    lower-cased; ``hits`` = how many of the 40 :data:`REASONING_PATTERNS` occur in ``t`` as plain
    substrings (each phrase counts once however often it occurs, and ``wait`` also matches in
    ``awaited``)::

        RPR = max(0, min(1, hits / 20) − rep20(t) − count(t, "user: "))

    with ``rep20`` from :func:`repetition_rate`; ``count`` is non-overlapping occurrences.
    """
    scored = _scored_text(_check_text(text))
    return max(0.0, _pattern_score(scored, REASONING_PATTERNS) - scored.count(USER_TURN))


def reasoning_pattern_reward_rm(text: str) -> float:
    """RPR's reward-model variant: the 53 :data:`REASONING_PATTERNS_RM`, no ``user: `` term.

    ``max(0, min(1, hits / 20) − rep20(t))`` on the same lower-cased text after ``<think>``.
    """
    scored = _scored_text(_check_text(text))
    return max(0.0, _pattern_score(scored, REASONING_PATTERNS_RM))


def combine_with_reward_model(score: float, rpr: float) -> float:
    """Reward-model score ``s`` topped up by RPR ("noisy rewards" paper).

    ``s' = min(s + 0.1·RPR, 1)`` when ``s < 0.5``; otherwise ``s`` unchanged.
    """
    for name, v in (("score", score), ("rpr", rpr)):
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SaetuneError(f"{name} must be a finite number, got {v!r}")
    return min(score + 0.1 * rpr, 1.0) if score < 0.5 else float(score)


#: How RPR joins the correctness reward: see :func:`combine_rpr`.
RPR_MODES: tuple[str, ...] = ("add", "wrong_only", "alone")


def combine_rpr(correctness: float, rpr: float, mode: str) -> float:
    """One response's reward from its correctness reward and its (weighted) RPR.

    - ``"wrong_only"`` — the "noisy rewards" paper's "RPR for wrong answers": a correct answer
      (``correctness > 0``) keeps its correctness reward, a wrong one gets its RPR instead of
      its 0 (or −1): ``r = correctness if correctness > 0 else rpr``;
    - ``"alone"`` — the paper's RPR-only runs (no correctness check): ``r = rpr``;
    - ``"add"`` — ``r = correctness + rpr``: saetune's earlier sum, which the reference never
      uses (a correct answer could then earn more than 1).

    ``correctness`` is 0/1 (or ±1, DAPO's signed reward); ``rpr`` comes already weighted
    (``rpr_weight · RPR``, 1·RPR in the paper). Callers: the trainer
    (``RLConfig.rpr_mode``), the TRL reward :func:`saetune.rl.integrations.trl.make_rpr_reward`
    and verl's ``compute_score`` (``extra_info["rpr_mode"]``).
    """
    if mode not in RPR_MODES:
        raise SaetuneError(f"unknown rpr mode {mode!r}; valid: {', '.join(RPR_MODES)}")
    for name, v in (("correctness", correctness), ("rpr", rpr)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SaetuneError(f"{name} must be a finite number, got {v!r}")
    if mode == "alone":
        return float(rpr)
    if mode == "wrong_only":
        return float(correctness) if correctness > 0 else float(rpr)
    return float(correctness) + float(rpr)


def reasoning_pattern_hits(
    text: str, patterns: Sequence[str] = REASONING_PATTERNS
) -> dict[str, list[tuple[int, int]]]:
    """Where each reasoning phrase fires: ``{phrase: [(start, end), ...]}`` for the explorer.

    Matching is the same as :func:`reasoning_pattern_reward` (case-insensitive, only after the
    first ``<think>``) but lists every occurrence (overlapping ones too); spans are
    ``text[start:end]`` slices of the ORIGINAL string. Phrases that do not occur are absent,
    so ``len(hits)`` is RPR's hit count.
    """
    text = _check_text(text)
    offset = _thinking_offset(text)
    # Lower-case char by char and remember where each lowered char came from: lower() can
    # change lengths (e.g. "İ" -> "i̇"), which would shift naive spans.
    lowered, origin = [], []
    for j, ch in enumerate(text[offset:], start=offset):
        low = ch.lower()
        lowered.append(low)
        origin.extend([j] * len(low))
    scored = "".join(lowered)
    out: dict[str, list[tuple[int, int]]] = {}
    for p in patterns:
        spans, i = [], scored.find(p)
        while i >= 0:
            spans.append((origin[i], origin[i + len(p) - 1] + 1))
            i = scored.find(p, i + 1)
        if spans:
            out[p] = spans
    return out


# --------------------------------------------------------------------------- reward flipping


def _group_index(n: int, groups: int | Sequence[Any] | torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map each of ``n`` samples to a group index 0..G-1; returns (index [n], G)."""
    if isinstance(groups, int) and not isinstance(groups, bool):
        if groups < 1 or n % groups:
            raise SaetuneError(
                f"group_size={groups} must be a positive divisor of the number of rewards ({n})"
            )
        return torch.arange(n) // groups, n // groups
    ids = torch.as_tensor(groups)
    if ids.dim() != 1 or ids.numel() != n:
        raise SaetuneError(
            f"group ids must be 1-D with one id per reward ({n}), got shape {tuple(ids.shape)}"
        )
    uniq, inverse = torch.unique(ids, return_inverse=True)  # groups in sorted id order
    return inverse, uniq.numel()


def flip_group_rewards(
    rewards: torch.Tensor,
    groups: int | Sequence[int] | torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy-reward corruption ("noisy rewards" paper): flip whole groups' 0/1 rewards.

    Each GROUP (all responses to one prompt) is flipped with probability ``p``, and then every
    member gets ``r → 1 − r``; one uniform draw per group from ``generator``.

    Args:
        rewards: [N] 0/1 rewards.
        groups: a group size (consecutive chunks of that size) or [N] group ids.
        p: flip probability in [0, 1].
    Returns:
        ``(flipped [N] same dtype, flipped_groups [G] bool)``; groups are in chunk order for a
        group size and in sorted-id order for ids.
    """
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise SaetuneError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if not ((rewards == 0) | (rewards == 1)).all():
        bad = rewards[(rewards != 0) & (rewards != 1)][:5].tolist()
        raise SaetuneError(f"flip_group_rewards needs 0/1 rewards, found {bad}")
    if not 0.0 <= p <= 1.0:
        raise SaetuneError(f"flip probability p must be in [0, 1], got {p!r}")
    index, n_groups = _group_index(rewards.numel(), groups)
    flipped_groups = torch.rand(n_groups, generator=generator) < p  # (G,)
    flip = flipped_groups[index.to(flipped_groups.device)]  # (N,)
    out = torch.where(flip, 1 - rewards, rewards)
    return out, flipped_groups


# --------------------------------------------------------------------------- HAPO


class HapoHistory:
    """HAPO's per-problem history: the shortest correct response length seen so far.

    Read it while scoring a batch and call :meth:`update` only after the batch, so a batch
    never rewards itself against its own lengths.
    """

    def __init__(self) -> None:
        self._shortest: dict[Any, int] = {}

    def get(self, problem_id: Any) -> int | None:
        """Shortest correct length seen for ``problem_id``, or None before any correct answer."""
        return self._shortest.get(problem_id)

    def update(self, problem_id: Any, lengths: Iterable[int], correct: Iterable[bool]) -> int | None:
        """Fold one batch of responses to ``problem_id`` in; returns the new history length."""
        lengths, correct = list(lengths), list(correct)
        if len(lengths) != len(correct):
            raise SaetuneError(
                f"lengths ({len(lengths)}) and correct ({len(correct)}) must have the same size"
            )
        for n in lengths:
            if n < 0:
                raise SaetuneError(f"response lengths must be >= 0, got {n}")
        good = [int(n) for n, ok in zip(lengths, correct) if ok]
        if good:
            old = self._shortest.get(problem_id)
            self._shortest[problem_id] = min(good) if old is None else min(old, *good)
        return self._shortest.get(problem_id)

    def __len__(self) -> int:
        return len(self._shortest)

    def __contains__(self, problem_id: Any) -> bool:
        return problem_id in self._shortest


def hapo_length_reward(length: float, correct: bool, history_len: float | None) -> float:
    """HAPO length reward for a response of ``length`` tokens, with history ``h``.

    ``f = cos((l/h)·π/2)`` if ``l < 2h`` else ``−1``; correct: ``max(−0.7, f)``;
    wrong: ``min(0, f)``; no history (``h`` None): 0.
    """
    if history_len is None:
        return 0.0
    if history_len <= 0:
        raise SaetuneError(f"history_len must be > 0 (a correct length), got {history_len}")
    if length < 0:
        raise SaetuneError(f"length must be >= 0, got {length}")
    f = math.cos(length / history_len * math.pi / 2) if length < 2 * history_len else -1.0
    return max(-0.7, f) if correct else min(0.0, f)


def hapo_reward(length: float, correct: bool, history_len: float | None, w: float = 1.0) -> float:
    """HAPO total reward ``R = r_correct + w·r_len`` (``w`` in [0, 1], reference default 1)."""
    if not 0.0 <= w <= 1.0:
        raise SaetuneError(f"HAPO length weight w must be in [0, 1], got {w!r}")
    return float(bool(correct)) + w * hapo_length_reward(length, correct, history_len)


# --------------------------------------------------------------------------- OTC


def _check_calls(m: Any, name: str) -> int:
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise SaetuneError(f"{name} must be a non-negative int (tool calls), got {m!r}")
    return m


def _check_c(c: float) -> float:
    if not c > 0:
        raise SaetuneError(f"OTC smoothing constant c must be > 0, got {c!r}")
    return c


def otc_ppo_tool_reward(m: int, c: float = 1.0) -> float:
    """OTC (PPO form) tool reward: ``r_tool = cos(m·π / (2m + c))`` for ``m`` tool calls.

    1 at ``m = 0``, decreasing towards 0. ``c`` is not published in the reference code;
    default 1.
    """
    m, c = _check_calls(m, "m"), _check_c(c)
    return math.cos(m * math.pi / (2 * m + c))


def otc_grpo_tool_reward(m: int, n: int, c: float = 1.0) -> float:
    """OTC (GRPO form) tool reward, in [0, 1].

    ``n`` = fewest tool calls among the group's correct responses;
    ``f(m, n) = 0 if m = n = 0; m if n = 0; else 2nm/(m + n)``;
    ``r_tool = 1 if f = n = 0; cos(m·π/(2m + c)) if n = 0; else sin(f·π/(2n))``
    (so ``m = n`` scores 1, and both fewer and more calls than ``n`` score less).
    """
    m, n, c = _check_calls(m, "m"), _check_calls(n, "n"), _check_c(c)
    if n == 0:
        return 1.0 if m == 0 else math.cos(m * math.pi / (2 * m + c))
    f = 2 * n * m / (m + n)
    return math.sin(f * math.pi / (2 * n))


def otc_reward(r_tool: float, correct: bool, alpha: float = 1.0) -> float:
    """OTC total reward ``r = α·r_tool·r_correct`` (wrong answers get 0; α default 1)."""
    return alpha * r_tool * float(bool(correct))


def otc_group_rewards(
    tool_calls: Sequence[int], correct: Sequence[bool], alpha: float = 1.0, c: float = 1.0
) -> list[float]:
    """OTC-GRPO rewards for one group: ``n`` from the correct responses, then :func:`otc_reward`.

    With no correct response every reward is 0 (``r_correct = 0``), so ``n`` is not needed.
    """
    if len(tool_calls) != len(correct):
        raise SaetuneError(
            f"tool_calls ({len(tool_calls)}) and correct ({len(correct)}) must have the same size"
        )
    good = [m for m, ok in zip(tool_calls, correct) if ok]
    if not good:
        return [0.0] * len(tool_calls)
    n = min(good)
    return [otc_reward(otc_grpo_tool_reward(m, n, c), ok, alpha) for m, ok in zip(tool_calls, correct)]


def tool_productivity(correct: Sequence[bool], tool_calls: Sequence[int]) -> float:
    """OTC tool productivity: correct answers / total tool calls.

    With zero tool calls in total the denominator is taken as 1 (so a tool-free run scores
    its number of correct answers rather than dividing by zero).
    """
    if len(correct) != len(tool_calls):
        raise SaetuneError(
            f"correct ({len(correct)}) and tool_calls ({len(tool_calls)}) must have the same size"
        )
    total = sum(_check_calls(m, "tool_calls entry") for m in tool_calls)
    return sum(1 for ok in correct if ok) / max(total, 1)


# --------------------------------------------------------------------------- AdaptThink


def is_no_thinking(response: str) -> bool:
    """AdaptThink's NoThinking mode: the response opens with ``</think>`` (whitespace ignored)."""
    return _check_text(response, "response").lstrip().startswith(THINK_CLOSE)


def adaptthink_reward(
    acc: float, ref_mean_acc: float, no_thinking: bool, delta: float = 0.05
) -> float:
    """AdaptThink reward ``R = acc − mean reference acc on the prompt + δ·1[no thinking]``.

    ``δ = 0.05`` is the reference setting.
    """
    return float(acc) - float(ref_mean_acc) + (delta if no_thinking else 0.0)


# --------------------------------------------------------------------------- RLPR


def _mean_token_prob(logprobs: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    lp = torch.as_tensor(logprobs, dtype=torch.float64)
    if lp.dim() not in (1, 2):
        raise SaetuneError(f"{name} must be [T] or [B, T] log-probs, got shape {tuple(lp.shape)}")
    m = torch.ones_like(lp, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    if m.shape != lp.shape:
        raise SaetuneError(f"mask for {name} has shape {tuple(m.shape)}, expected {tuple(lp.shape)}")
    real = lp[m]  # padding may hold anything (e.g. -inf); only real tokens are checked
    if not torch.isfinite(real).all() or (real > 1e-6).any():
        raise SaetuneError(
            f"{name} must be finite log-probabilities (<= 0) on answer tokens; "
            f"got values in [{real.min().item()}, {real.max().item()}]"
        )
    n = m.sum(-1)
    if (n == 0).any():
        raise SaetuneError(f"{name} has a row with no answer tokens (empty mask or T = 0)")
    return torch.where(m, lp.exp(), 0.0).sum(-1) / n  # (B,) or ()


def rlpr_probability_reward(answer_logprobs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RLPR probability reward (Yu et al. 2025): mean per-token probability of the reference answer.

    ``r = (1/|y*|) Σ_i π_θ(y*_i | x, z, y*_<i)``: the response's reasoning ``z`` followed by
    the reference answer ``y*`` instead of the generated one; the per-token log-probs are given.

    Args:
        answer_logprobs: [T] or [B, T] log-probs of the answer tokens.
        mask: same shape, True on real answer tokens (padding excluded).
    Returns: [] or [B] float64.
    """
    return _mean_token_prob(answer_logprobs, mask, "answer_logprobs")


def rlpr_reward(
    answer_logprobs: torch.Tensor,
    no_reasoning_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    no_reasoning_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Debiased RLPR reward ``r̂ = clip(r − r', 0, 1)`` (Yu et al. 2025, "RLPR").

    ``r`` is :func:`rlpr_probability_reward` with the reasoning; ``r'`` is the same mean
    per-token probability of ``y*`` with the reasoning left out (``x`` then ``y*`` directly),
    which removes the part of the probability that the answer's text alone explains. ``r'``
    is one number per prompt and broadcasts over the responses to it: pass ``[T']`` for one
    prompt, or ``[B, T']`` matching ``[B, T]``.
    """
    r = rlpr_probability_reward(answer_logprobs, mask)
    r0 = _mean_token_prob(no_reasoning_logprobs, no_reasoning_mask, "no_reasoning_logprobs")
    if r0.dim() > r.dim() or (r0.dim() == 1 and r0.shape != r.shape):
        raise SaetuneError(
            f"no-reasoning baseline has {tuple(r0.shape)} rows but answer_logprobs has {tuple(r.shape)}"
        )
    return (r - r0).clamp(0.0, 1.0)


def rlpr_std_filter(
    rewards: torch.Tensor, groups: int | Sequence[int] | torch.Tensor, beta: float
) -> torch.Tensor:
    """RLPR standard-deviation filter: keep a prompt only if its group's reward std >= β.

    Groups with (nearly) constant rewards — too easy or too hard — give no learning signal,
    and with a continuous reward they are not exactly constant, hence a threshold rather
    than "std > 0". The std is the population std (``unbiased=False``) over the group.

    Sources: the paper (Yu et al. 2025, arXiv 2506.18254, and its summaries found with the
    search tool: papers.lunadong.com/paper/14299, texonom.com RLPR note) describes removing
    prompts whose reward std is low, with the threshold β updated by an exponential moving
    average of the per-step average std (:func:`rlpr_update_threshold`). I could NOT confirm
    a numeric initial β, the EMA momentum, or whether the std is biased, so ``beta`` is a
    required argument with no default.

    Args:
        rewards: [N] rewards (e.g. :func:`rlpr_reward`).
        groups: group size (consecutive chunks) or [N] prompt ids.
        beta: threshold, >= 0.
    Returns: keep mask [G] bool (groups in chunk order / sorted-id order).
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise SaetuneError(f"RLPR std threshold beta must be a finite number >= 0, got {beta!r}")
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.dim() != 1:
        raise SaetuneError(f"rewards must be 1-D [N], got shape {tuple(r.shape)}")
    return group_std(r, groups) >= beta


def group_std(rewards: torch.Tensor, groups: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Population std of ``rewards`` [N] within each group -> [G] (float64)."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    index, g = _group_index(r.numel(), groups)
    count = torch.zeros(g, dtype=torch.float64).index_add_(0, index, torch.ones_like(r))
    mean = torch.zeros(g, dtype=torch.float64).index_add_(0, index, r) / count
    var = torch.zeros(g, dtype=torch.float64).index_add_(0, index, (r - mean[index]) ** 2) / count
    return var.sqrt()


def rlpr_update_threshold(beta: float, group_stds: torch.Tensor, momentum: float) -> float:
    """RLPR's adaptive threshold: ``β ← momentum·β + (1 − momentum)·mean(group stds of the step)``.

    An exponential moving average as the RLPR paper describes; the momentum is not confirmed
    from the public description, so it is required.
    """
    if not 0.0 <= momentum <= 1.0:
        raise SaetuneError(f"EMA momentum must be in [0, 1], got {momentum!r}")
    s = torch.as_tensor(group_stds, dtype=torch.float64)
    if s.numel() == 0:
        raise SaetuneError("rlpr_update_threshold needs at least one group std")
    return momentum * float(beta) + (1.0 - momentum) * s.mean().item()


# --------------------------------------------------------------------------- composition


@dataclass(frozen=True)
class RewardSpec:
    """One term of a composite reward: ``weight · fn(**inputs it names)``."""

    name: str
    fn: Callable[..., Any]
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise SaetuneError("RewardSpec needs a non-empty name")
        if not callable(self.fn):
            raise SaetuneError(f"reward {self.name!r}: fn must be callable, got {self.fn!r}")
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise SaetuneError(f"reward {self.name!r}: weight must be a finite number, got {self.weight!r}")


def _call_with_inputs(fn: Callable[..., Any], inputs: Mapping[str, Any]) -> Any:
    """Call ``fn`` with the inputs it accepts (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return fn(**inputs)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return fn(**inputs)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return fn(**{k: v for k, v in inputs.items() if k in names})


def compose_rewards(specs: Sequence[RewardSpec], **inputs: Any) -> tuple[float, dict[str, float]]:
    """Weighted sum of rewards: ``total = Σ_k weight_k · fn_k(inputs)``.

    Each ``fn`` gets the keyword ``inputs`` its signature names (e.g. ``response``,
    ``answer``, ``text``). Returns ``(total, parts)`` where ``parts[name]`` is the UNWEIGHTED
    value of each reward. A reward that raises, returns a non-number or NaN stops everything
    with a SaetuneError naming that reward (the original error is chained and quoted).
    """
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SaetuneError(f"reward names must be unique; repeated: {dup}")
    total, parts = 0.0, {}
    for spec in specs:
        try:
            value = _call_with_inputs(spec.fn, inputs)
        except Exception as err:
            raise SaetuneError(
                f"reward {spec.name!r} failed: {type(err).__name__}: {err}"
            ) from err
        try:
            value = float(value)
        except (TypeError, ValueError) as err:
            raise SaetuneError(
                f"reward {spec.name!r} returned {value!r:.80}, which is not a number"
            ) from err
        if math.isnan(value):
            raise SaetuneError(f"reward {spec.name!r} returned NaN")
        parts[spec.name] = value
        total += spec.weight * value
    return total, parts


__all__ = [
    "REASONING_PATTERNS", "REASONING_PATTERNS_RM", "REASONING_PATTERNS_RM_EXTRA",
    "correctness_reward", "repetition_rate", "reasoning_pattern_reward",
    "reasoning_pattern_reward_rm", "combine_with_reward_model", "RPR_MODES", "combine_rpr",
    "reasoning_pattern_hits",
    "flip_group_rewards", "HapoHistory", "hapo_length_reward", "hapo_reward",
    "otc_ppo_tool_reward", "otc_grpo_tool_reward", "otc_reward", "otc_group_rewards",
    "tool_productivity", "is_no_thinking", "adaptthink_reward", "rlpr_probability_reward",
    "rlpr_reward", "rlpr_std_filter", "group_std", "rlpr_update_threshold", "RewardSpec",
    "compose_rewards",
]
