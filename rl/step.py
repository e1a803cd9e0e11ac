"""One RL step — sample, rollout groups, rewards, dynamic sampling, update, trace records — and the
state it works on (:class:`RLState`, built by :func:`saetune.rl.trainer.setup`).

:func:`train_step` runs 0-based step ``s`` in phases:

1. :func:`sample_step` — batches of ``prompts_per_step`` prompts from the stream's cursor,
   :func:`rollout_groups` (G responses each, or a CURE group: n1 originals, a critical token per
   original, n2 branches each), :func:`score_rewards`; with dynamic sampling, groups whose
   ``filter_metric`` all agrees are dropped and more batches sampled, up to ``max_sample_batches``.
2. :func:`update` — GRPO advantages per group (:func:`group_advantages`), ``ppo_epochs`` ×
   ``mini_batches`` clipped policy-gradient steps at the warm-up lr (:func:`warmup_lr`).
3. :func:`step_metrics` — the metrics row over every sampled response.
4. :func:`write_traces` — ``traces/step_NNNNNN.jsonl`` (:func:`trace_record`, DESIGN.md's schema).

Every random draw of step ``s`` is seeded from ``(seed, s)`` (:func:`step_seed`), so a resumed run
replays the same samples as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from saetune.errors import SaetuneError
from saetune.io import atomic_write_text
from saetune.rl import cure as _cure
from saetune.rl.advantages import dynamic_sampling_filter, grpo_advantages
from saetune.rl.entropy import entropy_stats, high_entropy_mask
from saetune.rl.losses import policy_loss
from saetune.rl.rewards import RewardSpec, combine_rpr, compose_rewards, reasoning_pattern_hits
from saetune.rl.rollout import SampleParams, right_pad, sample, score

if TYPE_CHECKING:
    from saetune.rl.trainer import PromptStream, RLConfig
    from saetune.runs import RunDir


# ---------------------------------------------------------------------------------------------- state
@dataclass
class RLState:
    """What a step works on: the policy and its optimiser, the data stream and its cursor, the rewards and the
    sampling settings. :func:`saetune.rl.trainer.setup` builds it (also handy in a notebook:
    ``train_step(setup(cfg), 0)``); ``cursor`` and ``tokens`` advance with each step and go into checkpoints."""

    cfg: RLConfig
    policy: Any  # the HF causal LM (peft-wrapped under LoRA)
    tok: Any
    opt: torch.optim.Optimizer
    params_list: list[torch.nn.Parameter]  # the trainable parameters
    ref: Any  # the reference model of the KL, or None
    run: RunDir | None  # traces are written only with a run dir
    stream: PromptStream
    specs: list[RewardSpec]
    tool: Any  # a Calculator, or None
    params: SampleParams
    device: str
    pad_id: int
    lora: bool
    max_new: int  # the response cap: also Dr.GRPO's constant norm_length
    stop_ids: tuple[int, ...]
    cursor: int = 0  # index of the next prompt in the stream
    tokens: int = 0  # policy tokens trained on so far


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
                        stop_token_ids=stop_ids, max_total_tokens=cfg.context_size, max_tool_calls=cfg.max_tool_calls)


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
    n1 = cfg.cure_n1
    probs = [p for p in problems for _ in range(n1)]
    ro = sample(policy, tok, [p["prompt_ids"] for p in probs], params, seed, tool=tool)
    originals = _samples(ro, probs, [k // n1 for k in range(len(probs))])
    branches = _cure_branches(policy, tok, cfg, originals, params, seed, gen, tool)
    return _assemble_cure_groups(cfg, problems, originals, branches)


def _cure_branches(policy, tok, cfg: RLConfig, originals: list[Sample], params: SampleParams, seed: int,
                   gen: torch.Generator, tool) -> list[Sample]:
    """CURE stage 1's branches: a critical token per original (drawn with ``gen``; recorded on it), then ``n2``
    continuations of prompt + prefix up to that token, the branch prompt cut to :func:`cure_window`."""
    n1, n2 = cfg.cure_n1, cfg.cure_n2
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
    for j, b in enumerate(branches):  # source: the original's index within its group
        b.is_branch, b.source, b.prefix_len = True, b_src[j] % n1, b_prefix[j]
    return branches


def _assemble_cure_groups(cfg: RLConfig, problems: list[dict], originals: list[Sample],
                          branches: list[Sample]) -> list[Sample]:
    """Each problem's originals then its branches, checked by :func:`saetune.rl.cure.assemble_group` (sizes,
    sources and each sample's no-gradient context)."""
    n1, n2 = cfg.cure_n1, cfg.cure_n2
    out = []
    for g, prob in enumerate(problems):
        origs = originals[g * n1:(g + 1) * n1]
        brs = branches[g * n1 * n2:(g + 1) * n1 * n2]
        for i, o in enumerate(origs):
            o.source = i
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
            met = _minibatch_step(policy, opt, params, cfg, bt, adv, sl, device, ref_lp, pg_keep, norm_length)
            for key, v in met.items():
                acc.setdefault(key, []).append(float(v))
    policy.eval()
    out = {k: sum(v) / len(v) for k, v in acc.items() if not all(math.isnan(x) for x in v)}
    out["adv_abs_mean"] = float(adv.abs().mean())
    if pg_keep is not None:
        out["pg_token_frac"] = float(pg_keep.sum() / bt["mask"].sum().clamp(min=1))
    return out


def _minibatch_step(policy, opt, params, cfg: RLConfig, bt: dict[str, torch.Tensor], adv: torch.Tensor, sl: slice,
                    device, ref_lp: torch.Tensor | None, pg_keep: torch.Tensor | None,
                    norm_length: int | None) -> dict[str, Any]:
    """One optimiser step on rows ``sl`` of the batch ``bt``: :func:`saetune.rl.losses.policy_loss`, backward,
    clip, step; the loss's metrics with ``loss`` and ``grad_norm``."""
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
    return met


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



# ---------------------------------------------------------------------------------------------- the step
def step_seed(seed: int, step: int, k: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + k * 104_729) % (2**63 - 1)



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



def train_step(st: RLState, step: int) -> dict[str, Any]:
    """Run 0-based ``step``: rollout, rewards, dynamic sampling, update, traces; returns its metrics row."""
    cfg = st.cfg
    times = {"rollout": 0.0, "reward": 0.0, "update": 0.0}
    use_cure = cfg.cure_at(step)
    sampled, kept, batches = sample_step(st, step, use_cure, times)
    t0 = time.perf_counter()
    lr = warmup_lr(cfg, step)
    for g in st.opt.param_groups:
        g["lr"] = lr
    row: dict[str, Any] = {"step": step + 1}
    if kept:
        row.update(update(st.policy, st.opt, st.params_list, kept, cfg, st.pad_id, st.device, st.ref,
                          norm_length=st.max_new))
    times["update"] = time.perf_counter() - t0
    st.tokens += sum(int(sum(s.policy_mask)) for s in kept)
    row.update(step_metrics(st, sampled, kept, batches, use_cure))
    row["lr"] = lr
    if use_cure:
        row.update(cure_metrics(cfg, sampled, st.max_new))
    row.update({f"seconds_{k}": round(v, 4) for k, v in times.items()})
    row["seconds_step"] = round(sum(times.values()), 4)
    if st.run is not None and cfg.trace_every and (step == 0 or (step + 1) % cfg.trace_every == 0):
        write_traces(st, step, sampled, kept)
    return row


def sample_step(st: RLState, step: int, use_cure: bool,
                times: dict[str, float]) -> tuple[list[Sample], list[Sample], int]:
    """Sample and reward batches of ``prompts_per_step`` groups from the cursor (advancing it) until
    ``prompts_per_step`` groups survive dynamic sampling (at most ``max_sample_batches`` batches; one without
    it). ``(every sample, the kept ones in sampling order, batches sampled)``; adds seconds to ``times``."""
    cfg = st.cfg
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, 99))
    sampled: list[Sample] = []
    kept: list[Sample] = []
    batches = 0
    for k in range(cfg.max_sample_batches):
        start = st.cursor
        problems = [st.stream[start + j] for j in range(cfg.prompts_per_step)]
        st.cursor = start + cfg.prompts_per_step
        t0 = time.perf_counter()
        group_base = batches * cfg.prompts_per_step
        with torch.no_grad():
            smp = rollout_groups(st.policy, st.tok, cfg, problems, st.params, step_seed(cfg.seed, step, k), use_cure,
                                 gen, tool=st.tool)
        for s in smp:
            s.group += group_base
        times["rollout"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        score_rewards(smp, st.specs, cfg, st.tok, step + 1)
        times["reward"] += time.perf_counter() - t0
        batches += 1
        sampled += smp
        if not cfg.dynamic:
            return sampled, sampled, batches
        keep = dynamic_sampling_filter(filter_values(smp, cfg.filter_metric), [s.group for s in smp])
        kept += [s for s, f in zip(smp, keep.tolist()) if f]
        if len({s.group for s in kept}) >= cfg.prompts_per_step:
            break
    groups = set(sorted({s.group for s in kept})[:cfg.prompts_per_step])  # at most prompts_per_step groups
    return sampled, [s for s in kept if s.group in groups], batches


def step_metrics(st: RLState, sampled: list[Sample], kept: list[Sample], batches: int,
                 use_cure: bool) -> dict[str, Any]:
    """The metrics row's body over every sampled response of the step (accuracy over the originals)."""
    cfg = st.cfg
    originals = [s for s in sampled if not s.is_branch]
    bt = batch_tensors(sampled, st.pad_id)
    es = entropy_stats(bt["old_entropies"], bt["mask"])
    lens = [len(s.response_ids) for s in sampled]
    return {
        "tokens": st.tokens, "cure": use_cure,
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
    }


def cure_metrics(cfg: RLConfig, sampled: list[Sample], max_new: int) -> dict[str, Any]:
    """CURE stage 1's row keys: branch accuracy, the prompt window, how often it cut a prefix short of the
    critical token, and how often an original had no valid candidate."""
    originals = [s for s in sampled if not s.is_branch]
    br = [s for s in sampled if s.is_branch]
    pos = {(o.group, o.source): o.critical_position for o in originals}
    return {
        "branch_accuracy": sum(s.correct for s in br) / max(len(br), 1),
        "cure_prompt_window": cure_window(cfg, max_new),
        # branches whose prefix the window cut short of the critical token
        "cure_prefix_cut_frac": sum(b.prefix_len < pos[b.group, b.source] for b in br) / max(len(br), 1),
        "cure_no_candidate_frac": sum(not s.critical_candidates for s in originals) / max(len(originals), 1),
    }


def write_traces(st: RLState, step: int, sampled: list[Sample], kept: list[Sample]) -> None:
    """``traces/step_NNNNNN.jsonl`` of 0-based ``step``: every sampled response, with its advantage if kept."""
    kept_ids = {id(s) for s in kept}
    adv = dict(zip((id(s) for s in kept), group_advantages(kept, st.cfg).tolist())) if kept else {}
    lines = [json.dumps(trace_record(s, st.tok, step + 1, adv.get(id(s)), id(s) in kept_ids)) for s in sampled]
    atomic_write_text(st.run.path / "traces" / f"step_{step + 1:06d}.jsonl", "\n".join(lines) + "\n")
