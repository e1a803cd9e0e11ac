"""``saetune rl``: a single-node GRPO / DAPO trainer, with CURE, for any HF causal LM.

One step (the formulas live in the pure modules beside this one):

1. **rollout** — P prompts from the data stream; G responses each (plain GRPO/DAPO), or CURE
   stage 1: n1 originals, a critical token per original (:mod:`saetune.rl.cure`), n2 branch
   continuations from prompt + prefix, all n1 + n1·n2 in one group. Log-probs and entropies
   come from :mod:`saetune.rl.rollout`.
2. **reward** — :func:`saetune.rl.rewards.compose_rewards` over the configured rewards; a
   reward that raises or returns NaN fails the step, naming the step and the reward.
3. **dynamic sampling** (DAPO) — groups whose answers are all correct or all wrong
   (``filter_metric`` acc, DAPO's and CURE's; or whose rewards all agree: reward) are dropped and
   more prompts are sampled, up to ``max_sample_batches`` batches.
4. **update** — GRPO advantages per group, :func:`saetune.rl.losses.policy_loss` (clip-higher,
   dual clip, aggregation, k3 KL to an optional reference, entropy bonus), the 80/20 mask
   (:func:`saetune.rl.entropy.high_entropy_mask`), ``ppo_epochs`` × ``mini_batches`` AdamW steps.

The run dir holds ``metrics.jsonl`` (one row per step), ``traces/step_NNNNNN.jsonl`` (every
sampled response of traced steps, DESIGN.md's schema), ``checkpoints/`` (weights, optimiser,
data cursor) and, at the end, ``model/`` — an HF model dir (LoRA merged in) — and
``results.json`` with greedy accuracy and mean entropy before and after.

Determinism: the prompts of a step come from a cursor into a seeded stream and every random
draw of step s is seeded from ``(seed, s)``, so a resumed run replays the same data and samples
as an uninterrupted one (same hardware and thread count).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch

from saetune.config import opt
from saetune.errors import SaetuneError
from saetune.io import atomic_replace_dir, atomic_save_safetensors, atomic_write_json, atomic_write_text
from saetune.rl import cure as _cure
from saetune.rl.advantages import dynamic_sampling_filter, grpo_advantages, overlong_penalty
from saetune.rl.entropy import entropy_stats, high_entropy_mask
from saetune.rl.losses import policy_loss, resolve_agg_mode
from saetune.rl.rewards import (RewardSpec, combine_rpr, compose_rewards, reasoning_pattern_hits,
                                reasoning_pattern_reward)
from saetune.rl.rollout import SampleParams, right_pad, sample, score, score_responses
from saetune.runs import RunDir

STAGE = "rl"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOY_EVAL_SEED = 1_000_003  # the toy build's eval stream for seed 0: the shipped base's 0.68 is on it


@dataclass
class RLConfig:
    """``saetune rl``: GRPO / DAPO (optionally CURE) on a causal LM with verifiable rewards."""

    model: str = opt("toy", "policy to start from: 'toy' (the shipped toy base), a local HF dir, or a hub id")
    dataset: str = opt("toy", "prompts: 'toy' (fresh toy problems), or a JSONL/JSON/Parquet file or hub id with "
                              "problem/answer fields")
    problem_field: str = opt("problem", "dataset field holding the question")
    answer_field: str = opt("answer", "dataset field holding the gold answer")
    template: Literal["chat", "r1zero", "raw"] = opt("chat", "prompt template for non-toy datasets")
    algorithm: Literal["dapo", "grpo"] = opt("dapo", "fills the unset loss settings: dapo = clip 0.2/0.28, "
                                                      "token-mean, dynamic sampling; grpo = clip 0.2/0.2, "
                                                      "seq-mean-token-mean, none")
    finetune: Literal["full", "lora"] = opt("full", "train every weight (CURE's recipe) or LoRA adapters (merged at "
                                                     "the end)")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    target_modules: list[str] = opt(None, "modules that get LoRA", factory=lambda: list(LORA_TARGETS))
    steps: int = opt(100, "training steps (one rollout batch and its updates each)")
    prompts_per_step: int = opt(8, "prompts (groups) per step")
    group_size: int = opt(8, "responses per prompt without CURE (at least 2: a group of one has no baseline)")
    cure: bool = opt(False, "CURE stage 1: branch from a critical high-entropy token of each original")
    cure_n1: int = opt(4, "CURE: original responses per prompt")
    cure_n2: int = opt(3, "CURE: continuations per critical-token branch")
    cure_top_k: int = opt(20, "CURE: candidates (highest-entropy valid positions) to draw the critical token from")
    cure_stage1_steps: int = opt(0, "with cure: steps of stage 1, after which stage 2 (plain DAPO from the "
                                    "stage-1 weights) runs for the rest (0 = all steps are stage 1)")
    cure_branch_reward: Literal["continuation", "full"] = opt(
        "continuation", "text a branch is rewarded on: its continuation only (CURE) or prefix + continuation")
    cure_prompt_window: int = opt(1500, "CURE: a branch prompt (prompt + prefix) keeps its first this-many tokens "
                                        "(CURE: 1500, its max prompt length); capped at context_size - max new "
                                        "tokens, so the continuation keeps the full response budget")
    temperature: float = opt(1.0, "sampling temperature (log-probs and entropies use it too)")
    top_p: float = opt(1.0, "nucleus sampling threshold")
    max_new_tokens: int = opt(0, "response length cap (0 = the toy task's longest trace + 1, or 1024)")
    context_size: int = opt(2048, "prompt + response cap in tokens (also capped by the model's positions)")
    lr: float = opt(1e-6, "AdamW learning rate (CURE/DAPO: 1e-6)")
    warmup_steps: int = opt(0, "linear warm-up: step s (0-based) trains at lr*s/warmup_steps until s reaches it, as "
                               "verl's constant schedule with warm-up (CURE: 10)")
    weight_decay: float = opt(0.0, "AdamW weight decay (CURE: 0.1)")
    betas: list[float] = opt(None, "AdamW betas", factory=lambda: [0.9, 0.999])
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 = off)")
    ppo_epochs: int = opt(1, "passes over each rollout batch")
    mini_batches: int = opt(1, "optimiser steps per pass (the batch split into this many parts)")
    clip_low: float = opt(0.2, "PPO clip ε_low")
    clip_high: float | None = opt(None, "PPO clip ε_high (null: 0.28 for dapo, clip_low for grpo)")
    dual_clip: float = opt(10.0, "dual-clip constant c for negative advantages (CURE: 10, verl: 3; 0 = off)")
    loss_agg: str = opt("", "loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum-norm or a TRL "
                            "alias (empty: token-mean for dapo, seq-mean-token-mean for grpo)")
    dynamic_sampling: bool | None = opt(None, "drop groups whose filter_metric all agrees and sample more (null: "
                                              "on for dapo, off for grpo)")
    max_sample_batches: int = opt(3, "dynamic sampling: rollout batches per step at most")
    filter_metric: Literal["acc", "reward"] = opt(
        "acc", "what dynamic sampling compares within a group: acc drops groups all correct or all wrong (DAPO's "
               "and CURE's filter_groups.metric=acc), reward drops groups whose total rewards all agree")
    adv_eps: float = opt(1e-6, "ε of the GRPO advantage (verl 1e-6, TRL 1e-4)")
    scale_adv_by_std: bool = opt(True, "divide advantages by the group std (false: Dr.GRPO)")
    kl_coef: float = opt(0.0, "weight of the k3 KL to the reference model (0 = no reference; CURE/DAPO: 0)")
    reference_model: str = opt("", "reference model for the KL (default: the starting policy)")
    entropy_coef: float = opt(0.0, "entropy bonus c_H (one-shot RLVR: 1e-3)")
    pg_coef: float = opt(1.0, "policy-gradient weight (0 with entropy_coef > 0: entropy-only training)")
    top_entropy_rho: float = opt(1.0, "80/20 rule: policy gradient only on the top-ρ entropy tokens of the batch "
                                      "(0.2 in the paper; 1 = every token)")
    rewards: list[str] = opt(None, "rewards to sum: correctness, rpr, overlong, or names passed to train()",
                             factory=lambda: ["correctness"])
    reward_weights: list[float] = opt(None, "weight of each reward (default 1 each)", factory=list)
    correctness_reward: Literal["binary", "signed"] = opt(
        "binary", "the correctness reward: binary = 1/0, signed = +1/-1 (DAPO's math reward, CURE's reward manager)")
    rpr_mode: Literal["add", "wrong_only", "alone"] = opt(
        "add", "how the rpr reward joins correctness (saetune.rl.rewards.combine_rpr): add = summed (the "
               "reference never does), wrong_only = correct answers get correctness, wrong ones their RPR (the "
               "noisy-rewards paper), alone = RPR only (correctness is still logged)")
    overlong_buffer: int = opt(0, "DAPO overlong shaping buffer B for the 'overlong' reward (CURE: 512)")
    one_shot_index: int = opt(-1, "one-shot RLVR: train on this one problem of the stream, repeated (-1 = off)")
    tool: bool = opt(False, "let the policy call the calculator (<calc> EXPR </calc>); tool tokens get no gradient")
    max_tool_calls: int = opt(4, "calculator calls per response at most")
    eval_problems: int = opt(256, "greedy accuracy and mean entropy on this many problems before and after (0 = skip)")
    eval_seed: int = opt(TOY_EVAL_SEED, "seed of the evaluation problems")
    seed: int = opt(0, "seed of the data stream, the samples and the CURE draws")
    trace_every: int = opt(10, "write traces/ for step 1 and every N-th step (0 = never)")
    log_every: int = opt(1, "write a metrics row every N steps")
    checkpoint_every: int = opt(20, "write a resumable checkpoint every N steps (0 = never)")
    keep_checkpoints: int = opt(2, "how many checkpoints to keep")
    threads: int = opt(0, "torch CPU threads (0 = leave torch's setting)")
    device: str = opt("auto", "'auto' (cuda if present), 'cpu' or 'cuda'")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "cure_n1", "cure_n2", "cure_top_k", "ppo_epochs", "mini_batches",
                     "max_sample_batches", "context_size", "lora_r", "lora_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SaetuneError(f"{name} must be an integer of at least 1, got {v!r}")
        if not self.cure and self.group_size < 2:
            raise SaetuneError(f"group_size={self.group_size}: a GRPO group needs at least 2 responses (a group of "
                               "one has no baseline, so its advantage is 0 and nothing is learned)")
        if self.cure and self.cure_n1 < 2 and self.cure_n2 < 1:
            raise SaetuneError("a CURE group needs n1 + n1*n2 ≥ 2 responses")
        for name in ("max_new_tokens", "overlong_buffer", "eval_problems", "trace_every", "checkpoint_every",
                     "keep_checkpoints", "threads", "cure_stage1_steps", "max_tool_calls", "warmup_steps"):
            if getattr(self, name) < 0:
                raise SaetuneError(f"{name} must be 0 or more, got {getattr(self, name)!r}")
        if self.log_every < 1:
            raise SaetuneError(f"log_every must be at least 1, got {self.log_every!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SaetuneError(f"lr must be a positive number, got {self.lr!r}")
        if not 0 < self.top_entropy_rho <= 1:
            raise SaetuneError(f"top_entropy_rho must lie in (0, 1], got {self.top_entropy_rho!r}")
        if self.dual_clip and self.dual_clip <= 1:
            raise SaetuneError(f"dual_clip must be > 1 (CURE 10, verl 3) or 0 for off, got {self.dual_clip!r}")
        if not self.rewards:
            raise SaetuneError("rewards is empty; name at least one (e.g. correctness)")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise SaetuneError(f"{len(self.reward_weights)} reward_weights for {len(self.rewards)} rewards "
                               f"{self.rewards}; give one weight per reward or none")
        if isinstance(self.cure_prompt_window, bool) or not isinstance(self.cure_prompt_window, int) \
                or self.cure_prompt_window < 1:
            raise SaetuneError(f"cure_prompt_window must be an integer of at least 1, got {self.cure_prompt_window!r}")
        if self.rpr_mode != "add" and "rpr" not in self.rewards:
            raise SaetuneError(f"rpr_mode={self.rpr_mode!r} decides how the 'rpr' reward joins correctness, but "
                               f"rewards {self.rewards} has no 'rpr'; add it or leave rpr_mode at 'add'")
        if self.rpr_mode == "wrong_only" and "correctness" not in self.rewards:
            raise SaetuneError(f"rpr_mode='wrong_only' gives wrong answers their RPR, which needs the 'correctness' "
                               f"reward; rewards are {self.rewards}")
        if "overlong" in self.rewards and self.overlong_buffer < 1:
            raise SaetuneError("the 'overlong' reward needs overlong_buffer ≥ 1 (DAPO: 4096, CURE: 512)")
        if self.loss_agg:
            resolve_agg_mode(self.loss_agg)
        if len(self.betas) != 2:
            raise SaetuneError(f"betas must hold two numbers, got {self.betas!r}")

    # settings that the algorithm fills in
    @property
    def eps_high(self) -> float:
        return self.clip_high if self.clip_high is not None else (0.28 if self.algorithm == "dapo" else self.clip_low)

    @property
    def agg(self) -> str:
        return resolve_agg_mode(self.loss_agg) if self.loss_agg else (
            "token-mean" if self.algorithm == "dapo" else "seq-mean-token-mean")

    @property
    def dynamic(self) -> bool:
        return self.dynamic_sampling if self.dynamic_sampling is not None else self.algorithm == "dapo"

    def cure_at(self, step: int) -> bool:
        """Whether 0-based ``step`` runs CURE stage 1 (else plain sampling: stage 2 or no CURE)."""
        return self.cure and (self.cure_stage1_steps == 0 or step < self.cure_stage1_steps)


# ---------------------------------------------------------------------------------------------- data
class PromptStream:
    """Problems ``{"prompt_ids", "prompt", "answer"}`` by index: a pure function of (seed, index)."""

    def __init__(self, cfg: RLConfig, tokenizer):
        self.cfg, self.tok = cfg, tokenizer
        self.rows = None
        if cfg.dataset != "toy":
            from saetune.data import read_records
            self.rows = read_records(cfg.dataset)
            for i, r in enumerate(self.rows[:1]):
                for f in (cfg.problem_field, cfg.answer_field):
                    if f not in r:
                        raise SaetuneError(f"dataset {cfg.dataset!r} row {i} has no field {f!r}; fields: {sorted(r)}")

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.cfg.one_shot_index >= 0:
            i = self.cfg.one_shot_index
        if self.rows is None:
            from saetune.toy import task
            ex = task.example(random.Random(f"saetune-rl:{self.cfg.seed}:{i}"))
            prompt, answer, problem = ex["prompt"], ex["answer"], ex["problem"]
            ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        else:
            from saetune.generation import encode_prompt, render_prompt
            n = len(self.rows)
            epoch, j = divmod(i, n)
            order = list(range(n))
            random.Random(f"saetune-rl:{self.cfg.seed}:epoch{epoch}").shuffle(order)
            row = self.rows[order[j]]
            problem, answer = str(row[self.cfg.problem_field]), row[self.cfg.answer_field]
            prompt = render_prompt(self.tok, problem, self.cfg.template)
            ids = encode_prompt(self.tok, prompt, self.cfg.template)
        return {"prompt_ids": ids, "prompt": prompt, "answer": answer, "problem": problem}


# ---------------------------------------------------------------------------------------------- rewards
def _correctness_fn(dataset: str) -> Callable[..., float]:
    if dataset == "toy":
        from saetune.toy.task import is_correct

        def toy_correct(response: str, answer) -> float:
            return 1.0 if is_correct(response, answer) else 0.0
        return toy_correct
    from saetune.rl.rewards import correctness_reward
    return correctness_reward


def _signed(correct: Callable[..., float]) -> Callable[..., float]:
    def signed_correct(response: str, answer) -> float:  # DAPO's math reward: +1 right, -1 wrong
        return 1.0 if correct(response, answer) > 0.5 else -1.0
    return signed_correct


def reward_specs(cfg: RLConfig, max_new_tokens: int, extra: Mapping[str, Callable] | None = None) -> list[RewardSpec]:
    """The configured rewards as :class:`RewardSpec` s (built-ins, then ``extra`` by name)."""
    correct = _correctness_fn(cfg.dataset)
    if cfg.correctness_reward == "signed":
        correct = _signed(correct)
    builtin: dict[str, Callable] = {"correctness": correct, "rpr": reasoning_pattern_reward}
    if cfg.overlong_buffer:
        buf = min(cfg.overlong_buffer, max_new_tokens)
        builtin["overlong"] = lambda length: float(overlong_penalty([length], max_new_tokens, buf)[0])
    funcs = {**builtin, **dict(extra or {})}
    weights = cfg.reward_weights or [1.0] * len(cfg.rewards)
    specs = []
    for name, w in zip(cfg.rewards, weights):
        if name not in funcs:
            raise SaetuneError(f"unknown reward {name!r}; valid: {', '.join(sorted(funcs))} (pass others to "
                               "saetune.rl.train(..., reward_fns={name: fn}))")
        specs.append(RewardSpec(name, funcs[name], float(w)))
    return specs


# ---------------------------------------------------------------------------------------------- samples
@dataclass
class Sample:
    """One response of a step: ``context_ids`` (prompt, or prompt + prefix for a CURE branch) get
    no gradient; ``response_ids`` are the generated tokens."""

    group: int
    problem: dict[str, Any]
    context_ids: list[int]
    response_ids: list[int]
    policy_mask: list[int]
    logprobs: torch.Tensor
    entropies: torch.Tensor
    text: str
    truncated: bool
    tool_calls: int
    is_branch: bool = False
    source: int = 0
    prefix_len: int = 0
    critical_candidates: list[int] | None = None
    critical_position: int | None = None
    reward: float = 0.0
    parts: dict[str, float] | None = None
    correct: bool = False


def _params(cfg: RLConfig, max_new: int, stop_ids: tuple[int, ...], greedy: bool = False) -> SampleParams:
    return SampleParams(temperature=0.0 if greedy else cfg.temperature, top_p=cfg.top_p, max_new_tokens=max_new,
                        stop_token_ids=stop_ids, context_size=cfg.context_size, max_tool_calls=cfg.max_tool_calls)


def _samples(ro, problems, groups, contexts=None) -> list[Sample]:
    out = []
    for i in range(len(ro)):
        out.append(Sample(groups[i], problems[i], contexts[i] if contexts else ro.prompt_ids[i], ro.response_ids[i],
                          ro.policy_mask[i], ro.logprobs[i], ro.entropies[i], ro.texts[i], ro.truncated[i],
                          ro.tool_calls[i]))
    return out


def cure_window(cfg: RLConfig, max_new: int) -> int:
    """The branch prompt window: ``cure_prompt_window`` (CURE: 1,500 of a 4,096 context), capped at
    ``context_size − max_new`` so that a branch's continuation keeps the whole response budget, as CURE's
    branches do (their prompts fill the prompt width, their responses the response length)."""
    room = cfg.context_size - max_new
    if room < 1:
        raise SaetuneError(f"CURE branches need a prompt window: context_size={cfg.context_size} leaves {room} tokens "
                           f"besides the {max_new} new tokens of a continuation; raise context_size (CURE: 4096 = "
                           "1500 prompt + 2596 response) or lower max_new_tokens")
    return min(cfg.cure_prompt_window, room)


def rollout_groups(policy, tok, cfg: RLConfig, problems: list[dict], params: SampleParams, seed: int,
                   use_cure: bool, gen: torch.Generator, tool=None) -> list[Sample]:
    """Sample the groups of ``problems``: G responses each, or a CURE group (n1 originals + n1·n2 branches)."""
    if not use_cure:
        G = cfg.group_size
        probs = [p for p in problems for _ in range(G)]
        ro = sample(policy, tok, [p["prompt_ids"] for p in probs], params, seed, tool=tool)
        return _samples(ro, probs, [k // G for k in range(len(probs))])
    n1, n2 = cfg.cure_n1, cfg.cure_n2
    probs = [p for p in problems for _ in range(n1)]
    ro = sample(policy, tok, [p["prompt_ids"] for p in probs], params, seed, tool=tool)
    originals = _samples(ro, probs, [k // n1 for k in range(len(probs))])
    window = cure_window(cfg, params.max_new_tokens)
    b_ctx, b_prob, b_src, b_prefix = [], [], [], []
    for k, s in enumerate(originals):
        pos, cands = _cure.select_critical_position(s.entropies, s.response_ids, tok, top_k=cfg.cure_top_k,
                                                    generator=gen)
        s.critical_position, s.critical_candidates = pos, cands
        ctx, plen = _cure.branch_prompt(s.context_ids, s.response_ids, pos, window)
        for _ in range(n2):
            b_ctx.append(ctx)
            b_prob.append(s.problem)
            b_src.append(k)
            b_prefix.append(plen)
    bro = sample(policy, tok, b_ctx, params, seed + 104_729, tool=tool)
    branches = _samples(bro, b_prob, [b_src[j] // n1 for j in range(len(b_ctx))], contexts=b_ctx)
    out = []
    for g, prob in enumerate(problems):
        origs = originals[g * n1:(g + 1) * n1]
        brs = branches[g * n1 * n2:(g + 1) * n1 * n2]
        for j, b in enumerate(brs):
            b.is_branch, b.source, b.prefix_len = True, b_src[g * n1 * n2 + j] - g * n1, b_prefix[g * n1 * n2 + j]
        for i, o in enumerate(origs):
            o.source = i
        # assemble_group checks sizes, sources and prefixes (the no-gradient context of each sample)
        grp = _cure.assemble_group(prob["prompt_ids"], [o.response_ids for o in origs],
                                   [_cure.CureBranch(b.source, origs[b.source].response_ids[:b.prefix_len],
                                                     b.response_ids) for b in brs], n1=n1, n2=n2)
        for s, ctx_len in zip(origs + brs, grp.context_lens):
            if len(s.context_ids) != ctx_len:
                raise SaetuneError(f"CURE group {g}: a sample's context has {len(s.context_ids)} tokens, expected "
                                   f"{ctx_len}")
        out += origs + brs
    return out


def _with_rpr_mode(parts: dict[str, float], specs: list[RewardSpec], mode: str) -> float:
    """The total reward with the weighted correctness and RPR parts joined by :func:`combine_rpr`
    (every other reward is still added)."""
    w = {sp.name: sp.weight for sp in specs}
    rest = sum(w[n] * v for n, v in parts.items() if n not in ("correctness", "rpr"))
    corr = w["correctness"] * parts["correctness"] if "correctness" in parts else 0.0
    return rest + combine_rpr(corr, w["rpr"] * parts["rpr"], mode)


def score_rewards(samples: list[Sample], specs: list[RewardSpec], cfg: RLConfig, tok, step: int) -> None:
    """Fill ``reward``, ``parts`` and ``correct`` of each sample; a failing reward fails the step."""
    for k, s in enumerate(samples):
        text = s.text
        if s.is_branch and cfg.cure_branch_reward == "full":
            text = tok.decode(s.context_ids[len(s.problem["prompt_ids"]):], skip_special_tokens=False) + " " + text
        try:
            total, parts = compose_rewards(specs, response=text, text=text, answer=s.problem["answer"],
                                           prompt=s.problem["prompt"],
                                           problem=s.problem["problem"], length=len(s.response_ids),
                                           tool_calls=s.tool_calls)
        except SaetuneError as e:
            raise SaetuneError(f"step {step}: {e} (sample {k})") from e
        if cfg.rpr_mode != "add" and "rpr" in parts:
            total = _with_rpr_mode(parts, specs, cfg.rpr_mode)
        if not math.isfinite(total):
            raise SaetuneError(f"step {step}: the total reward of sample {k} is {total}; rewards must be finite")
        s.reward, s.parts = total, parts
        s.correct = bool(parts.get("correctness", 0.0) > 0.5) if "correctness" in parts else False


# ---------------------------------------------------------------------------------------------- the update
def batch_tensors(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` and, over the same [B, T], the loss ``mask`` (policy
    tokens of the response), ``old_logprobs`` and ``old_entropies``. Empty responses give empty mask rows."""
    rows = [s.context_ids + s.response_ids for s in samples]
    ids, attn = right_pad(rows, pad_id)  # (B, T)
    B, T = ids.shape
    mask = torch.zeros(B, T, dtype=torch.bool)
    old_lp = torch.zeros(B, T)
    old_ent = torch.zeros(B, T)
    for i, s in enumerate(samples):
        a, n = len(s.context_ids), len(s.response_ids)
        if n:
            mask[i, a:a + n] = torch.tensor(s.policy_mask, dtype=torch.bool)
            old_lp[i, a:a + n] = s.logprobs
            old_ent[i, a:a + n] = s.entropies
    return {"input_ids": ids, "attention_mask": attn, "mask": mask, "old_logprobs": old_lp, "old_entropies": old_ent}


def group_advantages(samples: list[Sample], cfg: RLConfig) -> torch.Tensor:
    """One GRPO advantage per sample over its whole group (a CURE group: originals and branches together)."""
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    if not bool(torch.isfinite(rewards).all()):
        raise SaetuneError("non-finite rewards reached the advantage computation")
    return grpo_advantages(rewards, group_ids=[s.group for s in samples], eps=cfg.adv_eps,
                           scale_by_std=cfg.scale_adv_by_std).float()


def update(policy, opt, params, samples: list[Sample], cfg: RLConfig, pad_id: int, device,
           ref=None, norm_length: int | None = None) -> dict[str, float]:
    """``ppo_epochs`` × ``mini_batches`` clipped policy-gradient steps on ``samples``; averaged metrics.

    ``norm_length``: Dr.GRPO's constant ``L`` of ``seq-mean-token-sum-norm`` — the run's max new
    tokens (verl: the response length, TRL: ``max_completion_length``); never the padded width of a
    mini-batch, which changes from batch to batch and holds the prompt too."""
    if cfg.agg == "seq-mean-token-sum-norm" and not norm_length:
        raise SaetuneError("seq-mean-token-sum-norm divides by a constant of the run: pass norm_length (the max new "
                           "tokens), not the padded width of a batch")
    adv = group_advantages(samples, cfg)  # (B,)
    bt = batch_tensors(samples, pad_id)
    pg_keep = None
    if cfg.top_entropy_rho < 1:
        pg_keep = high_entropy_mask(bt["old_entropies"], bt["mask"], rho=cfg.top_entropy_rho)  # (B, T)
    ref_lp = None
    if ref is not None:
        with torch.no_grad():
            ref_lp, _ = score(ref, bt["input_ids"].to(device), bt["attention_mask"].to(device),
                              bt["mask"].to(device), cfg.temperature)
    B = len(samples)
    n_mb = min(cfg.mini_batches, B)
    bounds = [round(B * k / n_mb) for k in range(n_mb + 1)]
    acc: dict[str, list[float]] = {}
    policy.train()
    for _ in range(cfg.ppo_epochs):
        for k in range(n_mb):
            sl = slice(bounds[k], bounds[k + 1])
            ids, attn, m = (bt[x][sl].to(device) for x in ("input_ids", "attention_mask", "mask"))
            lp, ent = score(policy, ids, attn, m, cfg.temperature)  # (b, T) each, with grad
            loss, met = policy_loss(
                lp, bt["old_logprobs"][sl].to(device), adv[sl].to(device), m, clip_low=cfg.clip_low,
                clip_high=cfg.eps_high, dual_clip=cfg.dual_clip or None, agg=cfg.agg,
                ref_logprobs=ref_lp[sl] if ref_lp is not None else None, kl_coef=cfg.kl_coef,
                entropy=ent if cfg.entropy_coef else None, entropy_coef=cfg.entropy_coef, pg_coef=cfg.pg_coef,
                pg_token_mask=pg_keep[sl].to(device) if pg_keep is not None else None,
                norm_length=norm_length if cfg.agg == "seq-mean-token-sum-norm" else None)
            if not torch.isfinite(loss):
                raise SaetuneError(f"non-finite loss ({loss.item()}); lower lr or check the rewards")
            gn = 0.0
            if loss.requires_grad:  # else: only empty responses in this part, nothing to learn
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                opt.step()
            met.update(loss=float(loss.detach()), grad_norm=float(gn))
            for key, v in met.items():
                acc.setdefault(key, []).append(float(v))
    policy.eval()
    out = {k: sum(v) / len(v) for k, v in acc.items() if not all(math.isnan(x) for x in v)}
    out["adv_abs_mean"] = float(adv.abs().mean())
    if pg_keep is not None:
        out["pg_token_frac"] = float(pg_keep.sum() / bt["mask"].sum().clamp(min=1))
    return out


# ---------------------------------------------------------------------------------------------- traces
def _r(xs, nd=5) -> list[float]:
    return [round(float(x), nd) for x in xs]


def trace_record(s: Sample, tok, step: int, advantage: float | None, kept: bool) -> dict[str, Any]:
    """One ``traces/*.jsonl`` object (DESIGN.md): the response, token by token, and how it was scored."""
    response = tok.decode(s.response_ids, skip_special_tokens=False)
    rec = {
        "step": step, "group": s.group, "prompt": s.problem["prompt"], "answer": str(s.problem["answer"]),
        "response": response, "tokens": [tok.decode([t], skip_special_tokens=False) for t in s.response_ids],
        "token_ids": list(s.response_ids), "logprobs": _r(s.logprobs), "entropies": _r(s.entropies),
        # the tokens the response followed (a branch's prompt + prefix): the Traces page's feature overlay runs
        # prompt_ids + token_ids through the model, which the prompt text re-tokenised would not reproduce
        "prompt_ids": list(s.context_ids),
        "critical_candidates": list(s.critical_candidates or []), "critical_position": s.critical_position,
        "rpr_hits": {k: [list(sp) for sp in v] for k, v in reasoning_pattern_hits(response).items()},
        "reward": s.reward, "reward_parts": dict(s.parts or {}), "correct": s.correct,
        "is_branch": s.is_branch, "source": s.source, "tool_calls": s.tool_calls, "truncated": s.truncated,
        "policy_mask": list(s.policy_mask), "advantage": advantage, "kept": kept,
    }
    if s.is_branch:
        rec["prefix"] = tok.decode(s.context_ids[len(s.problem["prompt_ids"]):], skip_special_tokens=False)
        rec["prefix_len"] = s.prefix_len
    return rec


# ---------------------------------------------------------------------------------------------- checkpoints
def _trainable_state(policy, lora: bool) -> dict[str, torch.Tensor]:
    if lora:
        from peft import get_peft_model_state_dict
        return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(policy).items()}
    return {k: v.detach().clone().contiguous() for k, v in policy.state_dict().items()}


def save_checkpoint(run: RunDir, policy, opt, lora: bool, state: dict, keep: int) -> None:
    """``checkpoints/step_NNNNNNN/`` (weights, optimiser, state.json) then ``latest.json``, atomically."""
    from saetune.optim import save_optimizer
    root = run.path / "checkpoints"
    step = state["step"]
    final, tmp = root / f"step_{step:07d}", root / f".tmp-step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_save_safetensors(tmp / "weights.safetensors", _trainable_state(policy, lora))
    save_optimizer(opt, tmp / "optim")
    atomic_write_json(tmp / "state.json", state)
    atomic_replace_dir(tmp, final)
    atomic_write_json(root / "latest.json", {"step": step, "dir": final.name})
    for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run: RunDir, policy, opt, lora: bool) -> dict | None:
    """Restore the latest checkpoint into ``policy`` and ``opt``; its state dict, or None without one."""
    from safetensors.torch import load_file

    from saetune.optim import load_optimizer
    latest = run.path / "checkpoints" / "latest.json"
    if not latest.exists():
        return None
    d = run.path / "checkpoints" / json.loads(latest.read_text())["dir"]
    sd = load_file(str(d / "weights.safetensors"))
    if lora:
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(policy, sd)
    else:
        policy.load_state_dict(sd)
    load_optimizer(opt, d / "optim")
    return json.loads((d / "state.json").read_text())


# ---------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate_policy(policy, tok, cfg: RLConfig, max_new: int, stop_ids: tuple[int, ...]) -> dict[str, float]:
    """Greedy accuracy and token-mean entropy (of the greedy responses, at ``temperature``) on
    ``eval_problems`` problems: the toy's eval stream (as ``saetune.toy.build.evaluate_toy``), or
    the dataset's rows from the end."""
    n = cfg.eval_problems
    if cfg.dataset == "toy":
        from saetune.toy import task
        exs = task.examples(n, cfg.eval_seed)
        probs = [{"prompt_ids": tok(e["prompt"], add_special_tokens=False)["input_ids"], "answer": e["answer"]}
                 for e in exs]
    else:
        stream = PromptStream(cfg, tok)
        rows = stream.rows[-n:]
        from saetune.generation import encode_prompt, render_prompt
        probs = [{"prompt_ids": encode_prompt(tok, render_prompt(tok, str(r[cfg.problem_field]), cfg.template),
                                              cfg.template), "answer": r[cfg.answer_field]} for r in rows]
    correct = _correctness_fn(cfg.dataset)
    ro_params = _params(cfg, max_new, stop_ids, greedy=True)
    hits, ent_sum, ent_n = 0.0, 0.0, 0
    for a in range(0, len(probs), 64):  # batches of 64, as evaluate_toy: same padding, same greedy tokens
        chunk = probs[a:a + 64]
        ro = sample(policy, tok, [p["prompt_ids"] for p in chunk], ro_params, seed=0, batch_size=64,
                    compute_scores=False)
        hits += sum(correct(t, p["answer"]) for t, p in zip(ro.texts, chunk))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        _, ents = score_responses(policy, ro.prompt_ids, ro.response_ids, pad, cfg.temperature or 1.0)
        ent_sum += sum(float(e.sum()) for e in ents)
        ent_n += sum(e.numel() for e in ents)
    return {"accuracy": hits / max(len(probs), 1), "entropy_mean": ent_sum / max(ent_n, 1), "n": len(probs)}


# ---------------------------------------------------------------------------------------------- the run
def _step_seed(seed: int, step: int, k: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + k * 104_729) % (2**63 - 1)


def _load(cfg: RLConfig, device: str):
    from saetune.models import load_model
    policy, tok = load_model(cfg.model, device=device)
    return policy, tok


def warmup_lr(cfg: RLConfig, step: int) -> float:
    """The learning rate of 0-based ``step``: ``lr·s/warmup_steps`` while ``s < warmup_steps``, then ``lr`` —
    verl's constant schedule with warm-up (stepped once per training step, so its first step has lr 0)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    return cfg.lr


def filter_values(samples: list[Sample], metric: str) -> list[float]:
    """What dynamic sampling compares within a group: ``acc`` (1 correct, 0 wrong: DAPO's and CURE's
    ``filter_groups.metric=acc``) or the total ``reward``."""
    if metric == "reward":
        return [s.reward for s in samples]
    if any("correctness" not in (s.parts or {}) for s in samples):
        raise SaetuneError("filter_metric='acc' drops groups whose answers are all correct or all wrong, which needs "
                           "the 'correctness' reward; add it to rewards or set filter_metric: reward")
    return [float(s.correct) for s in samples]


def train_step(ctx: dict[str, Any], step: int) -> dict[str, Any]:
    """Run 0-based ``step``: rollout, rewards, dynamic sampling, update; returns its metrics row."""
    cfg: RLConfig = ctx["cfg"]
    policy, tok = ctx["policy"], ctx["tok"]
    times = {"rollout": 0.0, "reward": 0.0, "update": 0.0}
    gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step, 99))
    use_cure = cfg.cure_at(step)
    sampled: list[Sample] = []
    kept: list[Sample] = []
    batches = 0
    for k in range(cfg.max_sample_batches):
        start = ctx["cursor"]
        problems = [ctx["stream"][start + j] for j in range(cfg.prompts_per_step)]
        ctx["cursor"] = start + cfg.prompts_per_step
        t0 = time.perf_counter()
        group_base = batches * cfg.prompts_per_step
        with torch.no_grad():
            smp = rollout_groups(policy, tok, cfg, problems, ctx["params"], _step_seed(cfg.seed, step, k), use_cure,
                                 gen, tool=ctx["tool"])
        for s in smp:
            s.group += group_base
        times["rollout"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        score_rewards(smp, ctx["specs"], cfg, tok, step + 1)
        times["reward"] += time.perf_counter() - t0
        batches += 1
        sampled += smp
        if cfg.dynamic:
            keep = dynamic_sampling_filter(filter_values(smp, cfg.filter_metric), [s.group for s in smp])
            kept += [s for s, f in zip(smp, keep.tolist()) if f]
            if len({s.group for s in kept}) >= cfg.prompts_per_step:
                break
        else:
            kept = sampled
            break
    if cfg.dynamic:  # at most prompts_per_step groups, in sampling order
        groups = sorted({s.group for s in kept})[:cfg.prompts_per_step]
        kept = [s for s in kept if s.group in set(groups)]
    row: dict[str, Any] = {"step": step + 1}
    t0 = time.perf_counter()
    lr = warmup_lr(cfg, step)
    for g in ctx["opt"].param_groups:
        g["lr"] = lr
    if kept:
        row.update(update(policy, ctx["opt"], ctx["params_list"], kept, cfg, ctx["pad_id"], ctx["device"], ctx["ref"],
                          norm_length=ctx["max_new"]))
    times["update"] = time.perf_counter() - t0
    ctx["tokens"] += sum(int(sum(s.policy_mask)) for s in kept)
    # metrics over every sampled response of the step
    originals = [s for s in sampled if not s.is_branch]
    bt = batch_tensors(sampled, ctx["pad_id"])
    es = entropy_stats(bt["old_entropies"], bt["mask"])
    lens = [len(s.response_ids) for s in sampled]
    row.update({
        "tokens": ctx["tokens"], "cure": use_cure,
        "reward_mean": sum(s.reward for s in sampled) / len(sampled),
        "accuracy": sum(s.correct for s in originals) / max(len(originals), 1),
        **{f"reward_{k}_mean": sum((s.parts or {}).get(k, 0.0) for s in sampled) / len(sampled)
           for k in (sampled[0].parts or {})},
        **{f"entropy_{k}": v for k, v in es.items() if k != "n_tokens"},
        "response_len_mean": sum(lens) / len(lens), "response_len_max": max(lens),
        "truncated_frac": sum(s.truncated for s in sampled) / len(sampled),
        "tool_calls_mean": sum(s.tool_calls for s in sampled) / len(sampled),
        "groups_sampled": batches * cfg.prompts_per_step, "groups_kept": len({s.group for s in kept}),
        "sample_batches": batches,
    })
    row["lr"] = lr
    if use_cure:
        br = [s for s in sampled if s.is_branch]
        row["branch_accuracy"] = sum(s.correct for s in br) / max(len(br), 1)
        window = cure_window(cfg, ctx["max_new"])
        row["cure_prompt_window"] = window
        pos = {(o.group, o.source): o.critical_position for o in originals}
        # branches whose prefix the window cut short of the critical token
        row["cure_prefix_cut_frac"] = sum(b.prefix_len < pos[b.group, b.source] for b in br) / max(len(br), 1)
        row["cure_no_candidate_frac"] = sum(not s.critical_candidates for s in originals) / max(len(originals), 1)
    row.update({f"seconds_{k}": round(v, 4) for k, v in times.items()})
    row["seconds_step"] = round(sum(times.values()), 4)
    if ctx["run"] is not None and cfg.trace_every and (step == 0 or (step + 1) % cfg.trace_every == 0):
        kept_ids = {id(s) for s in kept}
        adv = dict(zip((id(s) for s in kept), group_advantages(kept, cfg).tolist())) if kept else {}
        lines = [json.dumps(trace_record(s, tok, step + 1, adv.get(id(s)), id(s) in kept_ids)) for s in sampled]
        atomic_write_text(ctx["run"].path / "traces" / f"step_{step + 1:06d}.jsonl", "\n".join(lines) + "\n")
    return row


def train(cfg: RLConfig, out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
          reward_fns: Mapping[str, Callable[..., float]] | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` with GRPO/DAPO (CURE when ``cfg.cure``) into run dir ``out``.

    ``reward_fns`` adds rewards by name (use the names in ``cfg.rewards``); each takes any of the
    keywords ``response``, ``answer``, ``prompt``, ``problem``, ``length``, ``tool_calls``.
    Returns the results (also ``results.json``): greedy accuracy and mean entropy before and
    after, steps, seconds, and ``model_dir`` (the HF model dir ``model/`` of the run).
    """
    from tqdm.auto import tqdm

    from saetune.activations import resolve_device
    from saetune.toy.build import torch_threads
    device = resolve_device(cfg.device)
    run = RunDir.open(out, STAGE, cfg, resume=resume, overwrite=overwrite, seed=cfg.seed, device=device,
                      resume_ignore=("progress", "device", "threads"))
    run.manifest["n_gpus"] = 1 if device.startswith("cuda") else 0
    try:
        with torch_threads(cfg.threads):
            return _train(cfg, run, device, resume, reward_fns, tqdm)
    except KeyboardInterrupt:
        run.fail("interrupted; pass --resume to continue from the last checkpoint")
        raise
    except BaseException as e:
        run.fail(f"{type(e).__name__}: {e}")
        raise


def setup(cfg: RLConfig, device: str = "cpu", reward_fns: Mapping[str, Callable] | None = None,
          run: RunDir | None = None) -> dict[str, Any]:
    """Load the policy (LoRA-wrapped if asked), reference, optimiser, data stream and rewards: the
    state :func:`train_step` works on (also handy in a notebook: ``train_step(setup(cfg), 0)``)."""
    policy, tok = _load(cfg, device)
    if cfg.dataset == "toy":
        from saetune.toy.build import generation_stop_ids, max_new_tokens
        stop_ids = tuple(generation_stop_ids(tok))
        max_new = cfg.max_new_tokens or max_new_tokens()
    else:
        stop_ids = ()
        max_new = cfg.max_new_tokens or 1024
    if cfg.cure:
        cure_window(cfg, max_new)  # fails here, before any sampling, when the context leaves no window
    ref = None
    if cfg.kl_coef:
        from saetune.models import load_model
        ref, _ = load_model(cfg.reference_model or cfg.model, device=device)
        ref.requires_grad_(False)
    lora = cfg.finetune == "lora"
    if lora:
        from peft import LoraConfig, get_peft_model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            policy = get_peft_model(policy, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                       target_modules=list(cfg.target_modules)))
    policy.eval()
    params_list = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params_list, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    tool = None
    if cfg.tool:
        from saetune.rl.tools import Calculator
        tool = Calculator()
    ctx: dict[str, Any] = {
        "cfg": cfg, "policy": policy, "tok": tok, "opt": opt, "params_list": params_list, "ref": ref, "run": run,
        "stream": PromptStream(cfg, tok), "specs": reward_specs(cfg, max_new, reward_fns), "tool": tool,
        "params": _params(cfg, max_new, stop_ids), "device": device, "cursor": 0, "tokens": 0,
        "pad_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        "lora": lora, "max_new": max_new, "stop_ids": stop_ids,
    }
    return ctx


def _train(cfg: RLConfig, run: RunDir, device: str, resume: bool, reward_fns, tqdm) -> dict[str, Any]:
    with run.phase("load"):
        ctx = setup(cfg, device, reward_fns, run)
        policy, tok, opt, lora = ctx["policy"], ctx["tok"], ctx["opt"], ctx["lora"]
        max_new, stop_ids = ctx["max_new"], ctx["stop_ids"]
        run.add_input("model", cfg.model if cfg.model != "toy" else policy.name_or_path)
    start = 0
    if resume:
        state = load_checkpoint(run, policy, opt, lora)
        if state is not None:
            start, ctx["cursor"], ctx["tokens"] = state["step"], state["cursor"], state["tokens"]
    run.truncate_metrics(start)
    if cfg.eval_problems and "eval_before" not in run.manifest:
        with run.phase("eval"):
            run.manifest["eval_before"] = evaluate_policy(policy, tok, cfg, max_new, stop_ids)
        run.write_manifest()
    bar = tqdm(total=cfg.steps, initial=start, desc="rl", unit="step", disable=not cfg.progress)
    t_train, c_train = time.perf_counter(), time.process_time()
    with run.phase("train"):
        for step in range(start, cfg.steps):
            row = train_step(ctx, step)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                run.log({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.2f}")
            bar.update(1)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(run, policy, opt, lora, {"step": step + 1, "cursor": ctx["cursor"],
                                                         "tokens": ctx["tokens"]}, cfg.keep_checkpoints)
    bar.close()
    train_seconds = time.perf_counter() - t_train
    train_cpu_seconds = time.process_time() - c_train  # this process's CPU time: honest on a shared machine
    with run.phase("save"):
        final = policy.merge_and_unload() if lora else policy
        tmp = run.path / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        final.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        atomic_replace_dir(tmp, run.path / "model")
        run.add_artifact("model", "model")
    after = None
    if cfg.eval_problems:
        with run.phase("eval"):
            after = evaluate_policy(final, tok, cfg, max_new, stop_ids)
    before = run.manifest.get("eval_before")
    rows = run.metrics()
    results = {
        "accuracy_before": before["accuracy"] if before else None,
        "accuracy_after": after["accuracy"] if after else None,
        "entropy_before": before["entropy_mean"] if before else None,
        "entropy_after": after["entropy_mean"] if after else None,
        "eval_problems": cfg.eval_problems, "steps": cfg.steps, "tokens": ctx["tokens"],
        "train_seconds": round(train_seconds, 3), "train_cpu_seconds": round(train_cpu_seconds, 3),
        "final_reward_mean": rows[-1]["reward_mean"] if rows else None,
        "model_dir": str(run.path / "model"), "cure": cfg.cure, "finetune": cfg.finetune,
    }
    atomic_write_json(run.path / "results.json", results)
    shutil.rmtree(run.path / "checkpoints", ignore_errors=True)
    run.finish(results=results, steps=cfg.steps)
    results["wall_seconds"] = run.manifest["wall_seconds"]
    return results
