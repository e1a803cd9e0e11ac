"""verl integration: saetune's names registered in verl's registries and exercised through verl's
own code paths on CPU (no Ray cluster, no GPU). Where verl's rollout server would run, a stand-in
generates fixed tokens; those tests say so in their names."""

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import verl  # make test installs it (the Makefile's verl target); no skip: a missing engine fails here
from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

import saetune.rl.integrations.verl_plugin as plugin  # noqa: E402
from saetune.errors import SaetuneError  # noqa: E402
from saetune.rl.integrations import verl_algos  # noqa: E402


def _compose(overrides=()):
    from hydra import compose, initialize_config_dir
    cfg_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=cfg_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


@pytest.fixture(scope="module")
def recipe_cfg():
    from saetune.rl.integrations.verl_run import load_verl_recipe
    recipe = load_verl_recipe("dapo_math")
    return _compose(recipe["overrides"] + ["data.train_files=t.parquet", "data.val_files=v.parquet",
                                           "actor_rollout_ref.model.path=toy"])


@pytest.fixture(scope="module")
def toy_tok():
    from transformers import AutoTokenizer

    from saetune.toy.build import BASE_DIR
    return AutoTokenizer.from_pretrained(str(BASE_DIR))


def test_import_verl_registers_saetune_through_the_entry_point():
    code = ("import verl\n"
            "from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY\n"
            "from verl.experimental.reward_loop.reward_manager.registry import REWARD_MANAGER\n"
            "from verl.experimental.agent_loop.agent_loop import _agent_loop_registry\n"
            "print(sorted(k for k in [*ADV_ESTIMATOR_REGISTRY, *POLICY_LOSS_REGISTRY, *REWARD_MANAGER, "
            "*_agent_loop_registry] if 'saetune' in k))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    names = eval(out.stdout.strip().splitlines()[-1])
    assert names == sorted([*plugin.ADV_ESTIMATORS, *plugin.POLICY_LOSSES, plugin.REWARD_MANAGER, *plugin.AGENT_LOOPS])


def test_register_twice_is_a_no_op():
    plugin.register()
    assert core_algos.get_adv_estimator_fn("saetune_grpo") is verl_algos.grpo_advantage
    assert core_algos.get_policy_loss_fn("saetune_dapo") is verl_algos.dapo_policy_loss


def _rewards_batch(seed=0, groups=(4, 4, 3, 2), width=7):
    g = torch.Generator().manual_seed(seed)
    n = sum(groups)
    uid = np.asarray([f"p{i}" for i, s in enumerate(groups) for _ in range(s)], dtype=object)
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).float()  # (N, T)
    scores = torch.randint(0, 2, (n,), generator=g).float() + 0.1 * torch.rand(n, generator=g)
    tlr = torch.zeros(n, width)
    tlr[torch.arange(n), lengths - 1] = scores  # verl puts the outcome reward on the last valid token
    return tlr, mask, uid


@pytest.mark.parametrize("norm", [True, False])
def test_saetune_grpo_equals_verl_grpo_through_verls_compute_advantage(norm):
    from verl.trainer.ppo.ray_trainer import compute_advantage
    from verl.trainer.config import AlgoConfig
    tlr, mask, uid = _rewards_batch()
    ref, _ = core_algos.compute_grpo_outcome_advantage(tlr, mask, uid, norm_adv_by_std_in_grpo=norm)
    data = DataProto.from_dict(tensors={"token_level_rewards": tlr, "response_mask": mask}, non_tensors={"uid": uid})
    cfg = AlgoConfig(adv_estimator="saetune_grpo", norm_adv_by_std_in_grpo=norm)
    out = compute_advantage(data, adv_estimator="saetune_grpo", norm_adv_by_std_in_grpo=norm, config=cfg)
    torch.testing.assert_close(out.batch["advantages"], ref, rtol=1e-5, atol=1e-6)
    if not norm:
        dr, _ = verl_algos.dr_grpo_advantage(tlr, mask, index=uid)
        torch.testing.assert_close(dr, ref, rtol=1e-5, atol=1e-6)


def test_saetune_grpo_gives_a_group_of_one_zero_and_names_a_missing_uid():
    tlr, mask, _ = _rewards_batch(groups=(3, 1))
    uid = np.asarray(["a", "a", "a", "b"], dtype=object)
    adv, _ = verl_algos.grpo_advantage(tlr, mask, index=uid)
    assert adv[3].abs().sum() == 0 and adv[:3].abs().sum() > 0  # verl's grpo passes b's raw reward through
    with pytest.raises(SaetuneError, match="uid"):
        verl_algos.grpo_advantage(tlr, mask, index=None)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("dp", [1, 2])
def test_saetune_dapo_loss_and_gradient_equal_verls_vanilla(recipe_cfg, agg, dp):
    from verl.utils.config import omega_conf_to_dataclass
    actor = omega_conf_to_dataclass(recipe_cfg.actor_rollout_ref.actor)
    assert actor.clip_ratio_c == 10.0 and actor.clip_ratio_high == 0.28 and actor.policy_loss.loss_mode == "saetune_dapo"
    g = torch.Generator().manual_seed(3)
    b, t = 6, 9
    mask = (torch.arange(t)[None] < torch.randint(1, t + 1, (b,), generator=g)[:, None]).float()
    mask[2] = 0  # a fully masked row: verl leaves it out of the sequence count
    old = -torch.rand(b, t, generator=g) * 3
    adv = torch.randn(b, t, generator=g) * 2
    base = old + torch.randn(b, t, generator=g) * 0.6  # ratios on both sides of every clip
    n_tok, n_seq = int(mask.sum()), int((mask.sum(-1) > 0).sum())
    actor.global_batch_info.clear()  # verl fills this dict in place before each loss call
    if dp > 1:
        actor.global_batch_info.update({"dp_size": dp, "batch_num_tokens": n_tok * dp + 5,
                                        "global_batch_size": n_seq * dp + 1})
    losses, grads = [], []
    for fn in (verl_algos.dapo_policy_loss, core_algos.compute_policy_loss_vanilla):
        lp = base.clone().requires_grad_(True)
        loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask.bool(),
                           loss_agg_mode=agg, config=actor)
        loss.backward()
        losses.append(loss.detach())
        grads.append(lp.grad)
        assert set(metrics) >= {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0


def test_saetune_dapo_refuses_rollout_weights(recipe_cfg):
    from verl.utils.config import omega_conf_to_dataclass
    actor = omega_conf_to_dataclass(recipe_cfg.actor_rollout_ref.actor)
    x = torch.zeros(2, 3)
    with pytest.raises(SaetuneError, match="rollout importance weights"):
        verl_algos.dapo_policy_loss(x, x, x, torch.ones(2, 3), config=actor, rollout_is_weights=torch.ones(2, 3))


def test_recipe_composes_with_verls_config_and_every_name_resolves(recipe_cfg):
    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
    from verl.trainer.ppo.reward import resolve_reward_manager_cls
    from saetune.rl.integrations.verl_reward import SaetuneRewardManager
    assert core_algos.get_adv_estimator_fn(recipe_cfg.algorithm.adv_estimator) is verl_algos.grpo_advantage
    assert core_algos.get_policy_loss_fn(recipe_cfg.actor_rollout_ref.actor.policy_loss.loss_mode) is \
        verl_algos.dapo_policy_loss
    assert resolve_reward_manager_cls(recipe_cfg) is SaetuneRewardManager is get_reward_manager_cls("saetune")
    assert recipe_cfg.reward.reward_kwargs.overlong_buffer_len == 512


def test_verl_train_dry_run_and_missing_keys(capsys):
    from saetune.cli import main
    assert main(["verl-train", "dapo_math", "data.train_files=a.parquet", "--dry-run"]) == 2
    assert "data.val_files" in capsys.readouterr().err
    assert main(["verl-train", "dapo_math", "--dry-run", "data.train_files=a.parquet", "data.val_files=b.parquet",
                 "actor_rollout_ref.model.path=m", "actor_rollout_ref.rollout.n=4"]) == 0
    cmd = capsys.readouterr().out
    assert "-m verl.trainer.main_ppo" in cmd and cmd.rstrip().endswith("actor_rollout_ref.rollout.n=4")
    assert "algorithm.adv_estimator=saetune_grpo" in cmd


def test_verl_data_rows_read_by_verls_dataset(tmp_path, toy_tok):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from saetune.rl.integrations.verl_run import write_verl_dataset
    info = write_verl_dataset("toy", tmp_path / "train.parquet", limit=6, rpr_weight=0.25)
    assert info["rows"] == 6
    with pytest.raises(SaetuneError, match="parquet"):
        write_verl_dataset("toy", tmp_path / "train.jsonl")
    cfg = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 64, "filter_overlong_prompts": False,
                            "truncation": "error", "return_raw_chat": True})
    ds = RLHFDataset(data_files=[str(tmp_path / "train.parquet")], tokenizer=toy_tok, config=cfg)
    assert len(ds) == 6
    row = ds[0]
    assert row["data_source"] == "saetune/toy" and row["extra_info"]["rpr_weight"] == 0.25
    from saetune.toy.task import examples
    assert row["reward_model"]["ground_truth"] == examples(6, 0)[0]["answer"]


def _one_row(tok, prompt: str, response: str, width_p=32, width_r=64, gold="12", rpr_weight=None):
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    prompts = torch.full((1, width_p), tok.pad_token_id or 0)
    prompts[0, width_p - len(p):] = torch.tensor(p)
    responses = torch.full((1, width_r), tok.pad_token_id or 0)
    responses[0, :len(r)] = torch.tensor(r)
    attn = torch.zeros(1, width_p + width_r, dtype=torch.long)
    attn[0, width_p - len(p):width_p + len(r)] = 1
    extra = {} if rpr_weight is None else {"rpr_weight": rpr_weight}
    return DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": attn},
        non_tensors={"data_source": np.asarray(["saetune/toy"], dtype=object),
                     "reward_model": np.asarray([{"ground_truth": gold}], dtype=object),
                     "extra_info": np.asarray([extra], dtype=object)}), len(r)


def test_saetune_reward_manager_loaded_by_verl_scores_correctness_rpr_and_overlong(recipe_cfg, toy_tok):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import load_reward_manager
    right = "<think> 7 * 1 = 7 . wait , 7 + 5 = 12 . therefore the answer is 12 . </think> <answer> 12 </answer>"
    wrong = right.replace("<answer> 12", "<answer> 13")

    async def score(cfg, text, **kw):
        mgr = load_reward_manager(cfg, toy_tok)
        data, n = _one_row(toy_tok, "User : compute ( 7 * 1 ) + 5 . Assistant :", text, **kw)
        return await mgr.run_single(data), n

    cfg = OmegaConf.merge(recipe_cfg, {"reward": {"reward_kwargs": {"max_resp_len": 4096, "overlong_buffer_len": 512}}})
    (good, _), (bad, _) = asyncio.run(score(cfg, right)), asyncio.run(score(cfg, wrong))
    assert good["reward_score"] == 1.0 and bad["reward_score"] == -1.0  # the recipe takes DAPO's +-1
    assert good["reward_extra_info"]["overlong_penalty"] == 0.0
    from saetune.rl.rewards import reasoning_pattern_reward
    rpr = reasoning_pattern_reward(toy_tok.decode(toy_tok(right, add_special_tokens=False)["input_ids"]))
    assert rpr > 0
    weighted, _ = asyncio.run(score(cfg, right, rpr_weight=0.5))
    assert weighted["reward_score"] == pytest.approx(1.0 + 0.5 * rpr)
    short = OmegaConf.merge(recipe_cfg, {"reward": {"reward_kwargs": {"max_resp_len": 16, "overlong_buffer_len": 8}}})
    over, n = asyncio.run(score(short, right))
    assert n > 8 and over["reward_score"] == pytest.approx(1.0 + min(-(n - 8) / 8, 0.0))
    with pytest.raises(SaetuneError, match="overlong_buffer_len"):
        load_reward_manager(OmegaConf.merge(recipe_cfg, {"reward": {"reward_kwargs": {
            "max_resp_len": 8, "overlong_buffer_len": 16}}}), toy_tok)


def _rollout(tok, n_orig=4, width_p=24, width_r=40, seed=0):
    """A verl-shaped rollout of n_orig toy responses to one prompt (uid 'q0') and their entropies."""
    from saetune.toy.task import examples
    ex = examples(n_orig, seed)
    rows = [_one_row(tok, ex[0]["prompt"], e["response"], width_p, width_r)[0] for e in ex]
    batch = DataProto.concat(rows)
    batch.non_tensor_batch["uid"] = np.asarray(["q0"] * n_orig, dtype=object)
    ent = torch.rand(batch.batch["responses"].shape, generator=torch.Generator().manual_seed(seed))
    return batch, ent


def test_cure_branch_prompts_follow_saetune_cure_on_a_verl_batch(toy_tok):
    from saetune.rl.cure import branch_prompt, select_critical_position
    from saetune.rl.integrations.verl_cure import BRANCH_AGENT, cure_branch_prompts
    batch, ent = _rollout(toy_tok)
    out = cure_branch_prompts(batch, ent, toy_tok, n2=3, top_k=20, seed=7)
    assert len(out) == 12
    gen = torch.Generator().manual_seed(7)
    p_width = batch.batch["prompts"].shape[1]
    for b in range(4):
        attn = batch.batch["attention_mask"][b]
        prompt = batch.batch["prompts"][b][attn[:p_width].bool()].tolist()
        n = int(attn[p_width:].sum())
        resp = batch.batch["responses"][b, :n]
        pos, cands = select_critical_position(ent[b, :n], resp, toy_tok, top_k=20, generator=gen)
        ids, k = branch_prompt(prompt, resp.tolist(), pos, p_width)
        assert cands and pos in cands
        for j in range(3):  # the n2 requests of one original are adjacent
            r = 3 * b + j
            assert list(out.non_tensor_batch["cure_prompt_ids"][r]) == ids
            assert out.non_tensor_batch["cure_position"][r] == pos and out.non_tensor_batch["cure_prefix_len"][r] == k
            assert out.non_tensor_batch["uid"][r] == "q0" and out.non_tensor_batch["agent_name"][r] == BRANCH_AGENT
            m = out.batch["attention_mask"][r].bool()
            assert out.batch["input_ids"][r][m].tolist() == ids  # left-padded to the prompt window
    with pytest.raises(SaetuneError, match="entropys"):
        cure_branch_prompts(batch, ent[:, :5], toy_tok)


class StandInServer:
    """Stands in for verl's rollout server (vLLM/SGLang need GPUs): returns fixed continuations."""

    def __init__(self, tokens):
        self.tokens, self.requests = tokens, []

    async def generate(self, request_id, prompt_ids, sampling_params, **_):
        from verl.workers.rollout.replica import TokenOutput
        self.requests.append(list(prompt_ids))
        return TokenOutput(token_ids=list(self.tokens), log_probs=[-0.5] * len(self.tokens))


def test_cure_branch_agent_loop_with_stand_in_server_then_one_grpo_group(recipe_cfg, toy_tok):
    """The agent loop is built the way verl's AgentLoopWorker builds it (hydra, from the registry)
    with a stand-in server; the branches then join the originals in one GRPO group."""
    import hydra
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, _agent_loop_registry
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from saetune.rl.cure import CureBranch, assemble_group
    from saetune.rl.integrations.verl_cure import BRANCH_AGENT, cure_branch_prompts, cure_concat
    batch, ent = _rollout(toy_tok)
    requests = cure_branch_prompts(batch, ent, toy_tok, n2=3, seed=1)
    cont = toy_tok(" 12 . </think> <answer> 12 </answer>", add_special_tokens=False)["input_ids"]
    server = StandInServer(cont)

    async def run_all():
        outs = []
        for i in range(len(requests)):
            loop = hydra.utils.instantiate(_agent_loop_registry[BRANCH_AGENT], trainer_config=DictConfigWrap(recipe_cfg),
                                           server_manager=server, tokenizer=toy_tok, processor=None,
                                           dataset_cls=RLHFDataset, data_config=DictConfigWrap(recipe_cfg.data))
            kw = {k: v[i] for k, v in requests.non_tensor_batch.items() if k != "agent_name"}
            outs.append(await loop.run({"temperature": 1.0}, **kw))
        return outs

    outs = asyncio.run(run_all())
    assert server.requests == [list(x) for x in requests.non_tensor_batch["cure_prompt_ids"]]
    assert all(o.prompt_ids == server.requests[i] and o.response_ids == cont for i, o in enumerate(outs))

    # the branch rollout as verl pads it (prompt window | response width), then one group of 4 + 12
    p_w, r_w = batch.batch["prompts"].shape[1], batch.batch["responses"].shape[1]
    rows = []
    for o in outs:
        prompts = torch.zeros(1, p_w, dtype=torch.long)
        prompts[0, p_w - len(o.prompt_ids):] = torch.tensor(o.prompt_ids)
        resp = torch.zeros(1, r_w, dtype=torch.long)
        resp[0, :len(o.response_ids)] = torch.tensor(o.response_ids)
        attn = torch.zeros(1, p_w + r_w, dtype=torch.long)
        attn[0, p_w - len(o.prompt_ids):p_w + len(o.response_ids)] = 1
        rows.append(DataProto.from_dict(tensors={"prompts": prompts, "responses": resp, "attention_mask": attn}))
    branches = DataProto.concat(rows)
    for k in ("uid", "data_source", "reward_model", "extra_info"):
        branches.non_tensor_batch[k] = requests.non_tensor_batch[k]
    group = cure_concat(batch, branches)
    assert len(group) == 16 and group.non_tensor_batch["is_cure_branch"].sum() == 12
    rewards = torch.tensor([1.0, 0, 0, 1] + [1.0, 0, 1] * 4)
    mask = group.batch["attention_mask"][:, p_w:].float()
    tlr = torch.zeros_like(mask)
    tlr[torch.arange(16), mask.sum(-1).long() - 1] = rewards
    adv, _ = verl_algos.grpo_advantage(tlr, mask, index=group.non_tensor_batch["uid"])
    prefixes = [list(x) for x in requests.non_tensor_batch["cure_prompt_ids"]]
    p0 = batch.batch["prompts"][0][batch.batch["attention_mask"][0, :p_w].bool()].tolist()
    originals = [batch.batch["responses"][b, :int(batch.batch["attention_mask"][b, p_w:].sum())].tolist()
                 for b in range(4)]
    cg = assemble_group(p0, originals, [CureBranch(i // 3, prefixes[i][len(p0):], cont) for i in range(12)])
    torch.testing.assert_close(adv[:, 0], cg.group_advantages(rewards))  # one advantage over all 16, as CURE
    bad = DataProto.from_dict(tensors={"prompts": branches.batch["prompts"][:, 1:], "responses": branches.batch["responses"],
                                       "attention_mask": branches.batch["attention_mask"][:, 1:]})
    with pytest.raises(SaetuneError, match="wide"):
        cure_concat(batch, bad)


@pytest.mark.parametrize("dp", [1, 2])
def test_saetune_dapo_through_verls_engine_ppo_loss_equals_vanilla(recipe_cfg, dp):
    """verl's engine-side ``ppo_loss`` (the function its actor workers call) with flat per-token
    log-probs, as the model engine returns them, and loss_mode saetune_dapo vs vanilla."""
    from omegaconf import OmegaConf
    from verl.utils import tensordict_utils as tu
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.utils.losses import ppo_loss
    from verl_batches import engine_batch
    b, p, r = 4, 5, 6
    eb = engine_batch([2, 5, 3, 1], [6, 2, 4, 1], p, r, seed=11, spread=0.7)
    attn, rmask, old, adv, flat = eb["attn"], eb["rmask"], eb["old"], eb["adv"], eb["flat"]
    out = {}
    for mode in ("saetune_dapo", "vanilla"):
        actor = omega_conf_to_dataclass(OmegaConf.merge(recipe_cfg.actor_rollout_ref.actor,
                                                        {"policy_loss": {"loss_mode": mode}}))
        td = tu.get_tensordict(
            {"prompts": torch.zeros(b, p, dtype=torch.long), "responses": torch.zeros(b, r, dtype=torch.long),
             "attention_mask": attn, "response_mask": rmask, "old_log_probs": old, "advantages": adv},
            non_tensor_dict={"dp_size": dp, "batch_num_tokens": int(rmask.sum()) * dp + 3, "global_batch_size": b * dp})
        x = flat.clone().requires_grad_(True)
        loss, metrics = ppo_loss(actor, {"log_probs": x}, td)
        loss.backward()
        out[mode] = (loss.detach(), x.grad, metrics)
    torch.testing.assert_close(out["saetune_dapo"][0], out["vanilla"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["saetune_dapo"][1], out["vanilla"][1], rtol=1e-5, atol=1e-7)
    assert out["vanilla"][1].abs().sum() > 0 and "actor/pg_loss" in out["saetune_dapo"][2]
