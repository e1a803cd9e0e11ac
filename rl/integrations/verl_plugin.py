"""Register saetune's pieces in verl's registries (imported, the registrations happen).

With saetune installed, verl loads this module by itself: saetune declares it under verl's
``verl.plugins`` entry-point group, which ``import verl`` loads (unless
``VERL_USE_EXTERNAL_PLUGINS=none``); every Ray worker that imports verl therefore sees the
same names. The names:

==========================================  ==================================================
``algorithm.adv_estimator=saetune_grpo``     GRPO in float64 over the uid groups
                                             (``norm_adv_by_std_in_grpo=False`` → Dr.GRPO)
``algorithm.adv_estimator=saetune_dr_grpo``  Dr.GRPO, no std division
``…actor.policy_loss.loss_mode=saetune_dapo`` DAPO clip-higher + dual clip, verl's aggregation
``reward.reward_manager.name=saetune``       correctness + RPR (+ DAPO overlong penalty)
agent loop ``saetune_cure_branch``           CURE branch generation from prompt tokens
==========================================  ==================================================
"""

from __future__ import annotations

__all__ = ["ADV_ESTIMATORS", "POLICY_LOSSES", "REWARD_MANAGER", "AGENT_LOOPS", "register"]

ADV_ESTIMATORS = ("saetune_grpo", "saetune_dr_grpo")
POLICY_LOSSES = ("saetune_dapo",)
REWARD_MANAGER = "saetune"
AGENT_LOOPS = ("saetune_cure_branch",)


def register() -> None:
    """Register every saetune name with verl; a second call is a no-op."""
    from verl.experimental.agent_loop.agent_loop import register as register_agent_loop
    from verl.experimental.reward_loop.reward_manager import register as register_reward_manager
    from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss

    from . import verl_algos, verl_cure, verl_reward

    register_adv_est("saetune_grpo")(verl_algos.grpo_advantage)
    register_adv_est("saetune_dr_grpo")(verl_algos.dr_grpo_advantage)
    register_policy_loss("saetune_dapo")(verl_algos.dapo_policy_loss)
    register_reward_manager(REWARD_MANAGER)(verl_reward.SaetuneRewardManager)
    register_agent_loop(verl_cure.BRANCH_AGENT)(verl_cure.CureBranchAgentLoop)


register()
