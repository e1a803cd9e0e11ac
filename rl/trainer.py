"""``saetune rl``: a single-node GRPO / DAPO trainer, with CURE, for any HF causal LM.

This module holds the config, the prompt stream, the rewards, checkpoints, evaluation and the run in
phases (:func:`_set_up`, :func:`_train_loop`, :func:`_finish`); the step itself lives in
:mod:`saetune.rl.step` (its names are re-exported here). One step (the formulas live in the pure
modules beside this one):

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
from saetune.generation import pad_token_id
from saetune.io import atomic_replace_dir, atomic_write_json
from saetune.models import LORA_TARGETS, resolve_device, torch_threads
from saetune.rl.advantages import overlong_penalty
from saetune.rl.losses import resolve_agg_mode
from saetune.rl.rewards import RewardSpec, reasoning_pattern_reward
from saetune.rl.rollout import sample, score_responses
# the step and its pieces live in saetune.rl.step; re-exported here, where they were first defined
from saetune.rl.step import (RLState, Sample, _params, batch_tensors, cure_window, filter_values,  # noqa: F401
                             group_advantages, rollout_groups, score_rewards, trace_record, train_step, update,
                             warmup_lr)
from saetune.runs import Checkpoints, RunDir

STAGE = "rl"
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



# ---------------------------------------------------------------------------------------------- checkpoints
def _trainable_state(policy, lora: bool) -> dict[str, torch.Tensor]:
    if lora:
        from peft import get_peft_model_state_dict
        return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(policy).items()}
    return {k: v.detach().clone().contiguous() for k, v in policy.state_dict().items()}


def save_checkpoint(ckpts: Checkpoints, st: RLState, step: int) -> None:
    """``checkpoints/step_NNNNNNN/``: ``weights.safetensors`` (the trainable weights: all, or the LoRA adapters),
    ``optim.*`` and ``state.json`` (step, data cursor, tokens); see :class:`saetune.runs.Checkpoints`. No RNG
    state: every draw of a step is seeded from (seed, step)."""
    ckpts.save(step, {"weights": _trainable_state(st.policy, st.lora)}, {"cursor": st.cursor, "tokens": st.tokens},
               optimizers={"optim": st.opt})


def load_checkpoint(ckpts: Checkpoints, st: RLState) -> int:
    """Restore the latest checkpoint into ``st`` (weights, optimiser, cursor, tokens); its step, 0 without one."""
    ck = ckpts.load()
    if ck is None:
        return 0
    sd = ck.tensors("weights")
    if st.lora:
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(st.policy, sd)
    else:
        st.policy.load_state_dict(sd)
    ck.load_optimizer(st.opt, "optim")
    st.cursor, st.tokens = int(ck.meta["cursor"]), int(ck.meta["tokens"])
    return ck.step


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
    pad = pad_token_id(tok, policy)
    hits, ent_sum, ent_n = 0.0, 0.0, 0
    for a in range(0, len(probs), 64):  # batches of 64, as evaluate_toy: same padding, same greedy tokens
        chunk = probs[a:a + 64]
        ro = sample(policy, tok, [p["prompt_ids"] for p in chunk], ro_params, seed=0, batch_size=64,
                    compute_scores=False)
        hits += sum(correct(t, p["answer"]) for t, p in zip(ro.texts, chunk))
        _, ents = score_responses(policy, ro.prompt_ids, ro.response_ids, pad, cfg.temperature or 1.0)
        ent_sum += sum(float(e.sum()) for e in ents)
        ent_n += sum(e.numel() for e in ents)
    return {"accuracy": hits / max(len(probs), 1), "entropy_mean": ent_sum / max(ent_n, 1), "n": len(probs)}



# ---------------------------------------------------------------------------------------------- the run
def _load(cfg: RLConfig, device: str):
    from saetune.models import load_model
    policy, tok = load_model(cfg.model, device=device)
    return policy, tok


def train(cfg: RLConfig, out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
          reward_fns: Mapping[str, Callable[..., float]] | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` with GRPO/DAPO (CURE when ``cfg.cure``) into run dir ``out``.

    ``reward_fns`` adds rewards by name (use the names in ``cfg.rewards``); each takes any of the
    keywords ``response``, ``answer``, ``prompt``, ``problem``, ``length``, ``tool_calls``.
    Returns the results (also ``results.json``): greedy accuracy and mean entropy before and
    after, steps, seconds, and ``model_dir`` (the HF model dir ``model/`` of the run).
    """
    device = resolve_device(cfg.device)
    with RunDir.open(out, STAGE, cfg, resume=resume, overwrite=overwrite, seed=cfg.seed, device=device,
                     resume_ignore=("progress", "device", "threads")) as run:
        run.manifest["n_gpus"] = 1 if device.startswith("cuda") else 0
        ckpts = Checkpoints(run, keep=cfg.keep_checkpoints)  # the run's one view of its checkpoints
        with torch_threads(cfg.threads):
            st, start = _set_up(cfg, run, ckpts, device, resume, reward_fns)
            seconds = _train_loop(st, ckpts, start)
            return _finish(st, ckpts, *seconds)


def _reference(cfg: RLConfig, device: str):
    """The frozen reference model of the KL (``kl_coef`` > 0), or None."""
    if not cfg.kl_coef:
        return None
    from saetune.models import load_model
    ref, _ = load_model(cfg.reference_model or cfg.model, device=device)
    ref.requires_grad_(False)
    return ref


def _with_lora(cfg: RLConfig, policy):
    """``policy`` with LoRA adapters (initialised from ``cfg.seed``, the caller's RNG untouched)."""
    from peft import LoraConfig, get_peft_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return get_peft_model(policy, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                 target_modules=list(cfg.target_modules)))


def setup(cfg: RLConfig, device: str = "cpu", reward_fns: Mapping[str, Callable] | None = None,
          run: RunDir | None = None) -> RLState:
    """Load the policy (LoRA-wrapped if asked), reference, optimiser, data stream and rewards: the
    :class:`RLState` that :func:`train_step` works on (also handy in a notebook: ``train_step(setup(cfg), 0)``)."""
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
    ref = _reference(cfg, device)
    lora = cfg.finetune == "lora"
    if lora:
        policy = _with_lora(cfg, policy)
    policy.eval()
    params_list = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params_list, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    tool = None
    if cfg.tool:
        from saetune.rl.tools import Calculator
        tool = Calculator()
    return RLState(cfg=cfg, policy=policy, tok=tok, opt=opt, params_list=params_list, ref=ref, run=run,
                   stream=PromptStream(cfg, tok), specs=reward_specs(cfg, max_new, reward_fns), tool=tool,
                   params=_params(cfg, max_new, stop_ids), device=device,
                   pad_id=pad_token_id(tok, policy),
                   lora=lora, max_new=max_new, stop_ids=stop_ids)


def _set_up(cfg: RLConfig, run: RunDir, ckpts: Checkpoints, device: str, resume: bool,
            reward_fns) -> tuple[RLState, int]:
    """The state (:func:`setup`), restored from the latest checkpoint on resume, and the greedy evaluation before
    training (once per run); ``(state, first step)``."""
    with run.phase("load"):
        st = setup(cfg, device, reward_fns, run)
        run.add_input("model", cfg.model if cfg.model != "toy" else st.policy.name_or_path)
    start = load_checkpoint(ckpts, st) if resume else 0
    run.truncate_metrics(start)
    if cfg.eval_problems and "eval_before" not in run.manifest:
        with run.phase("eval"):
            run.manifest["eval_before"] = evaluate_policy(st.policy, st.tok, cfg, st.max_new, st.stop_ids)
        run.write_manifest()
    return st, start


def _train_loop(st: RLState, ckpts: Checkpoints, start: int) -> tuple[float, float]:
    """Steps ``start`` … ``steps − 1`` (:func:`train_step`), a metrics row every ``log_every``, a checkpoint every
    ``checkpoint_every``; ``(wall seconds, this process's CPU seconds)``."""
    from tqdm.auto import tqdm
    cfg, run = st.cfg, st.run
    bar = tqdm(total=cfg.steps, initial=start, desc="rl", unit="step", disable=not cfg.progress)
    t_train, c_train = time.perf_counter(), time.process_time()
    with run.phase("train"):
        for step in range(start, cfg.steps):
            row = train_step(st, step)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                run.log({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.2f}")
            bar.update(1)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(ckpts, st, step + 1)
    bar.close()
    # this process's CPU time: honest on a shared machine
    return time.perf_counter() - t_train, time.process_time() - c_train


def _finish(st: RLState, ckpts: Checkpoints, train_seconds: float, train_cpu_seconds: float) -> dict[str, Any]:
    """``model/`` (LoRA merged in), the greedy evaluation after, ``results.json``; the run marked complete."""
    cfg, run = st.cfg, st.run
    with run.phase("save"):
        final = st.policy.merge_and_unload() if st.lora else st.policy
        tmp = run.path / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        final.save_pretrained(str(tmp))
        st.tok.save_pretrained(str(tmp))
        atomic_replace_dir(tmp, run.path / "model")
        run.add_artifact("model", "model")
    after = None
    if cfg.eval_problems:
        with run.phase("eval"):
            after = evaluate_policy(final, st.tok, cfg, st.max_new, st.stop_ids)
    before = run.manifest.get("eval_before")
    rows = run.metrics()
    results = {
        "accuracy_before": before["accuracy"] if before else None,
        "accuracy_after": after["accuracy"] if after else None,
        "entropy_before": before["entropy_mean"] if before else None,
        "entropy_after": after["entropy_mean"] if after else None,
        "eval_problems": cfg.eval_problems, "steps": cfg.steps, "tokens": st.tokens,
        "train_seconds": round(train_seconds, 3), "train_cpu_seconds": round(train_cpu_seconds, 3),
        "final_reward_mean": rows[-1]["reward_mean"] if rows else None,
        "model_dir": str(run.path / "model"), "cure": cfg.cure, "finetune": cfg.finetune,
    }
    atomic_write_json(run.path / "results.json", results)
    ckpts.clear()
    run.finish(results=results, steps=cfg.steps)
    results["wall_seconds"] = run.manifest["wall_seconds"]
    return results
