"""Numbers comparable with the papers (RL): Dr.GRPO's constant normaliser, dynamic sampling on
accuracy and DAPO's ±1 reward, how RPR joins correctness, CURE's prompt window and run settings
(SPEC_RL.md). The trainer's steps run on the toy with a stand-in rollout where only the data matters."""

import asyncio
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from saetune.errors import SaetuneError
from saetune.rl import step as S
from saetune.rl import trainer as T
from saetune.rl.rewards import combine_rpr, reasoning_pattern_reward
from saetune.rl.trainer import RLConfig

TINY = dict(prompts_per_step=2, group_size=4, context_size=256, eval_problems=0, progress=False, threads=1,
            trace_every=0, checkpoint_every=0, lr=1e-4, max_sample_batches=1)
RIGHT = "<think> 7 * 1 = 7 . 7 + 5 = 12 . </think> <answer> 12 </answer>"
WRONG = "<think> 7 * 1 = 7 . 7 + 5 = 13 . </think> <answer> 13 </answer>"
WAIT = "<think> wait , 7 + 5 = 12 . therefore , 12 . </think> <answer> {} </answer>"


def _sample(ctx, prob, group, text):
    ids = list(ctx.tok(text, add_special_tokens=False)["input_ids"])
    n = len(ids)
    return T.Sample(group, prob, list(prob["prompt_ids"]), ids, [1] * n, torch.full((n,), -1.0),
                    torch.full((n,), 0.5), text, False, 0)


def _stand_in_rollout(texts_per_group):
    """Replaces rollout_groups: group k of the step answers with texts_per_group[k] (gold answer '12')."""
    def rollout(policy, tok, cfg, problems, params, seed, use_cure, gen, tool=None):
        ctx = SimpleNamespace(tok=tok)
        out = []
        for g, (prob, texts) in enumerate(zip(problems, texts_per_group)):
            prob = {**prob, "answer": "12"}
            out += [_sample(ctx, prob, g, t) for t in texts]
        return out
    return rollout


# ---------------------------------------------------------------------------------------------- 9. Dr.GRPO
def test_dr_grpo_normaliser_is_the_runs_max_new_tokens_in_every_mini_batch(monkeypatch):
    ctx = T.setup(RLConfig(**{**TINY, "algorithm": "grpo", "loss_agg": "dr_grpo", "mini_batches": 2}))
    calls = []
    real = S.policy_loss

    def spy(*a, **kw):
        calls.append((kw.get("norm_length"), a[3].shape[-1]))
        return real(*a, **kw)

    monkeypatch.setattr(S, "policy_loss", spy)
    # two groups of different lengths; the batch is padded to its longest prompt + response (30), not 48
    monkeypatch.setattr(S, "rollout_groups", _stand_in_rollout([[RIGHT, WRONG, RIGHT, WRONG],
                                                                ["<answer> 12 </answer>", "<answer> 1 </answer>"] * 2]))
    T.train_step(ctx, 0)
    assert len(calls) == 2 and all(width not in (0, 48) for _, width in calls), calls
    assert all(norm == ctx.max_new == 48 for norm, _ in calls), calls


def test_dr_grpo_loss_is_the_token_sum_over_max_new_tokens():
    """On-policy (ratio 1) the Dr.GRPO loss is mean_b(−Â_b·n_b)/L with L the max new tokens (48 on the toy),
    whatever the batch's padded width (prompt 13 + response 14 = 27 here)."""
    from saetune.rl.rollout import score_responses
    ctx = T.setup(RLConfig(**{**TINY, "algorithm": "grpo", "loss_agg": "seq-mean-token-sum-norm"}))
    prob = {**ctx.stream[0], "answer": "12"}
    a, b = _sample(ctx, prob, 0, RIGHT), _sample(ctx, prob, 0, "<answer> 1 </answer>")
    lps, _ = score_responses(ctx.policy, [a.context_ids, b.context_ids], [a.response_ids, b.response_ids],
                             ctx.pad_id, 1.0)
    a.logprobs, b.logprobs = lps
    a.reward, b.reward = 1.0, 0.0
    n_a, n_b = len(a.response_ids), len(b.response_ids)
    args = (ctx.policy, ctx.opt, ctx.params_list, [a, b], ctx.cfg, ctx.pad_id, "cpu")
    with pytest.raises(SaetuneError, match="norm_length"):
        T.update(*args)
    met = T.update(*args, norm_length=ctx.max_new)
    adv = 1 / math.sqrt(2)  # rewards (1, 0): (r − 0.5) / std, std = √0.5
    want = (-adv * n_a + adv * n_b) / 2 / 48
    assert len(a.context_ids) + n_a != 48
    assert met["pg_loss"] == pytest.approx(want, rel=1e-4)


def test_verl_dr_grpo_uses_verls_constant_through_its_engine_loss():
    """saetune_dapo and verl's vanilla, through verl's engine-side ppo_loss, with seq-mean-token-sum-norm:
    the same loss and gradient with the actor's loss_scale_factor set (a constant) and unset (the response
    width, which verl's rollout pads to the response length)."""
    from omegaconf import OmegaConf
    from verl.utils import tensordict_utils as tu
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.utils.losses import ppo_loss

    import saetune.rl.integrations.verl_plugin  # noqa: F401  (registers saetune_dapo)
    from verl_batches import engine_batch
    b, p, r = 3, 4, 7
    eb = engine_batch([2, 4, 1], [7, 3, 5], p, r, seed=5, spread=0.5)
    attn, rmask, old, adv, flat = eb["attn"], eb["rmask"], eb["old"], eb["adv"], eb["flat"]
    base = _recipe_cfg().actor_rollout_ref.actor
    for lsf in (None, 4096):
        out = {}
        for mode in ("saetune_dapo", "vanilla"):
            actor = omega_conf_to_dataclass(OmegaConf.merge(base, {
                "policy_loss": {"loss_mode": mode}, "loss_agg_mode": "seq-mean-token-sum-norm",
                "loss_scale_factor": lsf, "clip_ratio_c": 10.0}))
            td = tu.get_tensordict(
                {"prompts": torch.zeros(b, p, dtype=torch.long), "responses": torch.zeros(b, r, dtype=torch.long),
                 "attention_mask": attn, "response_mask": rmask, "old_log_probs": old, "advantages": adv},
                non_tensor_dict={"dp_size": 1, "batch_num_tokens": int(rmask.sum()), "global_batch_size": b})
            x = flat.clone().requires_grad_(True)
            loss, _ = ppo_loss(actor, {"log_probs": x}, td)
            loss.backward()
            out[mode] = (loss.detach(), x.grad)
        torch.testing.assert_close(out["saetune_dapo"][0], out["vanilla"][0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out["saetune_dapo"][1], out["vanilla"][1], rtol=1e-5, atol=1e-8)
        if lsf is None:
            unset = out["vanilla"][0]
    assert out["vanilla"][0] == pytest.approx(float(unset) * r / 4096, rel=1e-5)  # it is the divisor


def _recipe_cfg(extra=()):
    from saetune.rl.integrations.verl_run import load_verl_recipe
    return _compose(load_verl_recipe("dapo_math")["overrides"] + ["data.train_files=t.parquet",
                                                                  "data.val_files=v.parquet",
                                                                  "actor_rollout_ref.model.path=toy", *extra])


def _compose(overrides=()):
    import verl
    from hydra import compose, initialize_config_dir
    cfg_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=cfg_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


# ---------------------------------------------------------------------------------------------- 10. filter, ±1
def test_dynamic_sampling_filters_groups_on_accuracy_by_default(monkeypatch):
    # group 0: all correct, but RPR differs (so its total rewards differ); group 1: half right
    texts = [[RIGHT, WAIT.format(12), RIGHT, WAIT.format(12)], [RIGHT, WRONG, RIGHT, WRONG]]
    monkeypatch.setattr(S, "rollout_groups", _stand_in_rollout(texts))
    kept = {}
    for metric in ("acc", "reward"):
        cfg = RLConfig(**{**TINY, "algorithm": "dapo", "rewards": ["correctness", "rpr"], "filter_metric": metric})
        assert cfg.dynamic and RLConfig().filter_metric == "acc"
        row = T.train_step(T.setup(cfg), 0)
        kept[metric] = row["groups_kept"]
    assert kept == {"acc": 1, "reward": 2}  # DAPO / CURE drop the all-correct group whatever its RPR
    assert T.filter_values([], "acc") == []
    ctx = T.setup(RLConfig(**{**TINY, "rewards": ["rpr"]}))
    with pytest.raises(SaetuneError, match="filter_metric='acc'.*correctness"):
        T.train_step(ctx, 0)


def test_signed_correctness_is_dapos_plus_minus_one_and_recorded():
    from saetune.config import to_dict
    cfg = RLConfig(**{**TINY, "correctness_reward": "signed"})
    assert RLConfig().correctness_reward == "binary"
    assert to_dict(cfg)["correctness_reward"] == "signed" and to_dict(cfg)["filter_metric"] == "acc"
    ctx = T.setup(cfg)
    prob = {**ctx.stream[0], "answer": "12"}
    smp = [_sample(ctx, prob, 0, RIGHT), _sample(ctx, prob, 0, WRONG)]
    T.score_rewards(smp, ctx.specs, cfg, ctx.tok, step=1)
    assert [s.reward for s in smp] == [1.0, -1.0] and [s.correct for s in smp] == [True, False]
    with pytest.raises(SaetuneError, match="correctness_reward"):
        from saetune.config import load_config
        load_config(RLConfig, None, {"correctness_reward": "pm1"})


# ---------------------------------------------------------------------------------------------- 11. RPR
def test_combine_rpr_modes_follow_the_reference():
    assert combine_rpr(1.0, 0.4, "wrong_only") == 1.0  # correct: its correctness reward
    assert combine_rpr(0.0, 0.4, "wrong_only") == 0.4  # wrong: its RPR instead of 0
    assert combine_rpr(-1.0, 0.4, "wrong_only") == 0.4  # wrong under DAPO's ±1 too
    assert combine_rpr(1.0, 0.4, "alone") == 0.4 and combine_rpr(0.0, 0.4, "alone") == 0.4
    assert combine_rpr(1.0, 0.4, "add") == pytest.approx(1.4)
    with pytest.raises(SaetuneError, match="unknown rpr mode 'sum'"):
        combine_rpr(1.0, 0.4, "sum")
    with pytest.raises(SaetuneError, match="rpr must be a finite number"):
        combine_rpr(1.0, math.nan, "add")


@pytest.mark.parametrize("mode", ["add", "wrong_only", "alone"])
def test_trainer_rewards_join_rpr_by_mode(mode):
    cfg = RLConfig(**{**TINY, "rewards": ["correctness", "rpr"], "reward_weights": [1.0, 0.5], "rpr_mode": mode})
    ctx = T.setup(cfg)
    prob = {**ctx.stream[0], "answer": "12"}
    right, wrong = WAIT.format(12), WAIT.format(13)
    smp = [_sample(ctx, prob, 0, right), _sample(ctx, prob, 0, wrong)]
    T.score_rewards(smp, ctx.specs, cfg, ctx.tok, step=1)
    rpr = reasoning_pattern_reward(wrong)
    assert rpr > 0 and reasoning_pattern_reward(right) == rpr
    want = {"add": [1.0 + 0.5 * rpr, 0.5 * rpr], "wrong_only": [1.0, 0.5 * rpr], "alone": [0.5 * rpr, 0.5 * rpr]}
    assert [s.reward for s in smp] == pytest.approx(want[mode])
    assert [s.correct for s in smp] == [True, False]  # correctness is still graded and logged


def test_rpr_mode_needs_its_rewards():
    assert RLConfig().rpr_mode == "add"
    with pytest.raises(SaetuneError, match="no 'rpr'"):
        RLConfig(rpr_mode="wrong_only")
    with pytest.raises(SaetuneError, match="needs the 'correctness'"):
        RLConfig(rpr_mode="wrong_only", rewards=["rpr"])
    RLConfig(rpr_mode="alone", rewards=["rpr"], filter_metric="reward")


def test_trl_reward_joins_rpr_like_the_reference():
    from saetune.rl.integrations import trl as R
    right = r"Wait, let me check. Therefore the answer is \boxed{12}."
    wrong = right.replace("12", "13")
    rpr = reasoning_pattern_reward(wrong)
    assert rpr > 0
    out = R.correctness_or_rpr_reward(prompts=None, completions=[right, wrong], completion_ids=None,
                                      answer=["12", "12"])
    assert R.correctness_or_rpr_reward.__name__ == "correctness_or_rpr"
    assert out == pytest.approx([1.0, rpr])
    alone = R.make_rpr_reward("alone")
    assert alone(prompts=None, completions=[right, wrong]) == pytest.approx([rpr, rpr])  # no gold needed
    add = R.make_rpr_reward("add", rpr_weight=0.5)
    assert add(prompts=None, completions=[right, wrong], answer=["12", "12"]) == pytest.approx([1 + rpr / 2, rpr / 2])
    with pytest.raises(SaetuneError, match="unknown rpr mode"):
        R.make_rpr_reward("both")


def test_verl_score_joins_rpr_by_mode_and_reports_acc():
    from saetune.rl.integrations.verl import compute_score
    right, wrong = WAIT.format(12), WAIT.format(13)
    rpr = reasoning_pattern_reward(wrong)
    assert compute_score("saetune/toy", right, "12", {"rpr_mode": "wrong_only"})["score"] == 1.0
    w = compute_score("saetune/toy", wrong, "12", {"rpr_mode": "wrong_only"})
    assert w["score"] == pytest.approx(rpr) and w["acc"] == 0.0 and w["correctness"] == 0.0  # weight 1 by default
    assert compute_score("saetune/toy", right, "12", {"rpr_mode": "alone", "rpr_weight": 0.5})["score"] == \
        pytest.approx(0.5 * rpr)
    assert compute_score("saetune/toy", right, "12")["acc"] == 1.0
    signed = compute_score("saetune/toy", wrong, "12", {"correctness_reward": "signed"})
    assert signed["score"] == -1.0 and signed["acc"] == 0.0
    with pytest.raises(SaetuneError, match="rpr_mode"):
        compute_score("saetune/toy", right, "12", {"rpr_mode": "sum"})


def test_verl_reward_manager_takes_rpr_mode_from_its_kwargs(tmp_path):
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl import DataProto
    from verl.trainer.ppo.reward import load_reward_manager

    from saetune.rl.integrations.verl_run import write_verl_dataset
    from saetune.toy.build import BASE_DIR
    import saetune.rl.integrations.verl_plugin  # noqa: F401
    tok = AutoTokenizer.from_pretrained(str(BASE_DIR))
    wrong = WAIT.format(13)

    def one_row(text, extra):
        p = tok("User : compute ( 7 * 1 ) + 5 . Assistant :", add_special_tokens=False)["input_ids"]
        r = tok(text, add_special_tokens=False)["input_ids"]
        attn = torch.ones(1, len(p) + len(r), dtype=torch.long)
        return DataProto.from_dict(
            tensors={"prompts": torch.tensor([p]), "responses": torch.tensor([r]), "attention_mask": attn},
            non_tensors={"data_source": np.asarray(["saetune/toy"], dtype=object),
                         "reward_model": np.asarray([{"ground_truth": "12"}], dtype=object),
                         "extra_info": np.asarray([extra], dtype=object)})

    cfg = _recipe_cfg(["+reward.reward_kwargs.rpr_mode=wrong_only"])
    mgr = load_reward_manager(cfg, tok)
    rpr = reasoning_pattern_reward(tok.decode(tok(wrong, add_special_tokens=False)["input_ids"]))
    out = asyncio.run(mgr.run_single(one_row(wrong, {})))
    assert out["reward_score"] == pytest.approx(rpr) and out["reward_extra_info"]["acc"] == 0.0
    out = asyncio.run(mgr.run_single(one_row(wrong, {"rpr_mode": "add", "rpr_weight": 0.0})))  # the row wins
    assert out["reward_score"] == -1.0  # the recipe's DAPO correctness (±1), no RPR added
    with pytest.raises(SaetuneError, match="rpr_mode"):
        load_reward_manager(OmegaConf.merge(cfg, {"reward": {"reward_kwargs": {"rpr_mode": "sum"}}}), tok)
    # verl-data writes the mode per row, and no rpr settings unless asked
    import pandas as pd
    write_verl_dataset("toy", tmp_path / "a.parquet", limit=2, rpr_mode="wrong_only")
    write_verl_dataset("toy", tmp_path / "b.parquet", limit=2)
    assert pd.read_parquet(tmp_path / "a.parquet")["extra_info"][0]["rpr_mode"] == "wrong_only"
    assert "rpr_weight" not in pd.read_parquet(tmp_path / "b.parquet")["extra_info"][0]
    with pytest.raises(SaetuneError, match="rpr_mode"):
        write_verl_dataset("toy", tmp_path / "c.parquet", limit=2, rpr_mode="sum")


def test_verl_data_cli_takes_rpr_mode(tmp_path, capsys):
    from saetune.cli import main
    assert main(["verl-data", "toy", "--out", str(tmp_path / "t.parquet"), "--limit", "2",
                 "--rpr-mode", "wrong_only"]) in (0, None)
    import pandas as pd
    assert pd.read_parquet(tmp_path / "t.parquet")["extra_info"][0]["rpr_mode"] == "wrong_only"


# ---------------------------------------------------------------------------------------------- 12. CURE
def test_cure_branch_prompt_is_cut_to_the_window_and_keeps_the_response_budget(monkeypatch):
    cfg = RLConfig(**{**TINY, "cure": True, "cure_prompt_window": 16})
    ctx = T.setup(cfg)
    calls = []
    real = S.sample

    def spy(policy, tok, prompts, params, seed, **kw):
        calls.append(([list(p) for p in prompts], params))
        return real(policy, tok, prompts, params, seed, **kw)

    monkeypatch.setattr(S, "sample", spy)
    problems = [ctx.stream[i] for i in range(2)]
    with torch.no_grad():
        smp = T.rollout_groups(ctx.policy, ctx.tok, cfg, problems, ctx.params, 3, True,
                               torch.Generator().manual_seed(0))
    assert len(calls) == 2
    branch_prompts, params = calls[1]
    assert all(len(p) <= 16 for p in branch_prompts) and max(len(p) for p in branch_prompts) == 16
    # the continuation keeps the full response budget: max new tokens, with room in the context
    assert params.max_new_tokens == ctx.max_new == 48 and params.max_total_tokens - 16 >= 48
    origs = {(s.group, s.source): s for s in smp if not s.is_branch}
    cut = 0
    for b in (s for s in smp if s.is_branch):
        o = origs[b.group, b.source]
        k = min(o.critical_position, 16 - len(o.context_ids))  # the first window tokens are kept
        assert b.context_ids == o.context_ids + o.response_ids[:k] and b.prefix_len == k
        cut += k < o.critical_position
    assert cut > 0  # the window did cut some prefixes short of their critical token


def test_cure_window_defaults_to_the_reference_and_fits_the_context():
    assert RLConfig().cure_prompt_window == 1500
    assert T.cure_window(RLConfig(context_size=4096), 4096 - 1500) == 1500  # CURE: 1,500 + 2,596
    assert T.cure_window(RLConfig(context_size=256), 48) == 208  # the toy: what 48 new tokens leave of 256
    with pytest.raises(SaetuneError, match="context_size=256 leaves 0 tokens"):
        T.cure_window(RLConfig(context_size=256), 256)
    with pytest.raises(SaetuneError, match="cure_prompt_window"):
        RLConfig(cure_prompt_window=0)


def test_warmup_is_verls_linear_schedule_from_zero(monkeypatch):
    cfg = RLConfig(lr=1e-6, warmup_steps=10)
    assert [T.warmup_lr(cfg, s) for s in (0, 1, 5, 10, 50)] == pytest.approx([0.0, 1e-7, 5e-7, 1e-6, 1e-6])
    assert T.warmup_lr(RLConfig(lr=1e-6), 0) == 1e-6
    monkeypatch.setattr(S, "rollout_groups", _stand_in_rollout([[RIGHT, WRONG] * 2] * 2))
    ctx = T.setup(RLConfig(**{**TINY, "warmup_steps": 4}))
    row = T.train_step(ctx, 1)
    assert row["lr"] == pytest.approx(1e-4 / 4) and ctx.opt.param_groups[0]["lr"] == pytest.approx(1e-4 / 4)


def test_cure_recipes_take_cures_settings():
    from saetune.config import load_config
    toy = load_config(RLConfig, "toy_rl")
    assert toy.cure and toy.cure_prompt_window == 208 and toy.filter_metric == "acc"
    # the toy's recorded figures come from its unchanged training settings (the recipe says why)
    assert (toy.weight_decay, toy.warmup_steps, toy.algorithm, toy.lr) == (0.0, 0, "grpo", 1e-5)
    cfg = _recipe_cfg()
    optim = cfg.actor_rollout_ref.actor.optim
    assert optim.weight_decay == 0.1 and optim.lr_warmup_steps == 10 and optim.lr == 1e-6
    assert cfg.algorithm.filter_groups.enable and cfg.algorithm.filter_groups.metric == "acc"
