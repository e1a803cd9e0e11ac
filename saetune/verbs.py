"""The one list of ``saetune`` verbs: each names its module, config class, function and help once.

Three things are built from :data:`VERBS` so they cannot drift apart:

- the command line (:func:`saetune.cli.build_parser`): one sub-command per verb, in this order, its flags the
  config dataclass's fields (plus any extra arguments ``cli.<arguments>`` adds);
- the pipeline's stage table (:data:`saetune.pipeline.VERBS`): every verb with ``pipeline=True``, whose
  function is ``f(cfg, out, resume=, overwrite=)``;
- the lazy top-level exports of :mod:`saetune` (``exports``: names of ``module`` that ``saetune.<name>`` gives).

This module imports nothing heavy: ``import saetune`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verb:
    """One ``saetune`` verb.

    ``name`` is what the user types (``"toy build"``: an action of the ``toy`` group, see :data:`GROUPS`);
    ``stage`` the manifest's stage name of the run dirs it writes (default: ``name``). ``module``/``config``/
    ``function``: where its config dataclass and its Python function live. ``cli``: the handler in
    :mod:`saetune.cli` (``""``: resolve the config and print ``function(cfg, out, resume=, overwrite=)`` as
    JSON); ``arguments``: a function in :mod:`saetune.cli` adding the verb's own arguments (the only ones when
    there is no ``config``). ``pipeline``: usable as a stage of ``saetune pipeline``.
    """

    name: str
    help: str
    module: str = ""
    config: str = ""
    function: str = ""
    description: str = ""
    cli: str = ""
    arguments: str = ""
    stage: str = ""
    pipeline: bool = False
    exports: tuple[str, ...] = ()

    @property
    def stage_name(self) -> str:
        return self.stage or self.name


# groups of verbs typed as two words (``saetune toy build``): group → its help
GROUPS: dict[str, str] = {"toy": "the built-in model organism (a tiny arithmetic reasoning model)"}

VERBS: tuple[Verb, ...] = (
    Verb("demo", "Resa's SAE-Tuning end to end on the toy model, on a CPU: RL-trained source → its activations → "
                 "SAE → SAE-Tuning of the base → merge → controls → greedy accuracy of each → feature data, in a "
                 "summary table",
         module="saetune.demo_pipeline", config="DemoConfig", function="demo", cli="cmd_demo", exports=("demo",)),
    Verb("toy build", "pre-train the toy model from scratch into a HF model dir",
         module="saetune.toy.build", config="ToyBuildConfig", function="build_toy", cli="cmd_toy_build",
         stage="toy"),
    Verb("cache", "capture activations into an on-disk store",
         module="saetune.activations", config="CacheConfig", function="cache", pipeline=True,
         exports=("cache", "CacheConfig")),
    Verb("train-sae", "train SAEs on a model's activations (store or on the fly)",
         module="saetune.sae_trainer", config="TrainSAEConfig", function="train_sae", pipeline=True,
         exports=("train_sae", "TrainSAEConfig")),
    Verb("eval-sae", "SAEBench's core metrics (ce_loss_score, kl_div_score, explained variance, L0, alive, density) "
                     "and one quality table for one or several SAEs on any model",
         module="saetune.sae_eval", config="EvalSAEConfig", function="eval_sae", cli="cmd_eval_sae", pipeline=True,
         exports=("eval_sae", "EvalSAEConfig")),
    Verb("pipeline", "run a pipeline recipe (e.g. resa_still_v5): one sub-run per stage",
         description="Run the stages of a pipeline recipe (a shipped name or a YAML path) into one parent dir; "
                     "'{stage}' in a setting names an earlier stage's run dir.",
         module="saetune.pipeline", function="run_pipeline", cli="cmd_pipeline", arguments="_pipeline_args",
         exports=("run_pipeline",)),
    Verb("tune", "SAE-Tuning (Resa Stage II): LoRA through a frozen SAE bottleneck",
         module="saetune.tuning", config="TuneConfig", function="tune", pipeline=True,
         exports=("tune", "TuneConfig")),
    Verb("merge", "merge a LoRA adapter into its model (merged/ with a model card)",
         module="saetune.merging", config="MergeConfig", function="merge", pipeline=True, exports=("merge",)),
    Verb("attach", "put an adapter onto another model, or hook an SAE in while generating",
         module="saetune.attach", config="AttachConfig", function="attach", pipeline=True),
    Verb("eval", "sample and grade a model on math benchmarks (pass@k); --compare tabulates runs",
         module="saetune.evaluate", config="EvalConfig", function="run", cli="cmd_eval", arguments="_eval_args",
         pipeline=True),
    Verb("features", "precompute per-feature explorer data (density, histograms, contexts, logit effects, "
                     "neighbours, think-token features)",
         module="saetune.analysis.feature_build", config="FeaturesConfig", function="features", pipeline=True),
    Verb("rl", "GRPO/DAPO RL (CURE optional) with verifiable rewards; writes model/, metrics, traces",
         module="saetune.rl.trainer", config="RLConfig", function="train", pipeline=True),
    Verb("verl-data", "write a benchmark or the toy task as verl's RL parquet",
         description="One row per problem: data_source, prompt (chat), ability, reward_model (ground_truth) and "
                     "extra_info (index; rpr_weight, rpr_mode when given).",
         module="saetune.rl.integrations.verl_run", function="write_verl_dataset", cli="cmd_verl_data",
         arguments="_verl_data_args"),
    Verb("verl-train", "run verl's PPO trainer with a saetune verl recipe (dapo_math)",
         description="python -m verl.trainer.main_ppo with the recipe's Hydra overrides, then yours (later ones "
                     "win). Needs pip install saetune[verl] and GPUs.",
         module="saetune.rl.integrations.verl_run", function="verl_command", cli="cmd_verl_train",
         arguments="_verl_train_args"),
    Verb("explore", "open the Streamlit explorer on a run dir or a pipeline dir",
         description="Run the Streamlit explorer headless (no usage statistics) on RUN_DIR.",
         module="saetune.app", function="explore", cli="cmd_explore", arguments="_explore_args"),
)

BY_NAME: dict[str, Verb] = {v.name: v for v in VERBS}


def pipeline_verbs() -> dict[str, tuple[str, str, str]]:
    """verb → (module, config class, run function) of every verb a pipeline recipe may name."""
    return {v.name: (v.module, v.config, v.function) for v in VERBS if v.pipeline}


def lazy_exports() -> dict[str, tuple[str, str]]:
    """``saetune.<name>`` → (module, attribute) for every name a verb exports."""
    return {name: (v.module, name) for v in VERBS for name in v.exports}


def command(stage: str) -> str:
    """The command that makes (and resumes) a run dir of ``stage`` (``"toy"`` → ``"saetune toy build"``)."""
    for v in VERBS:
        if v.stage_name == stage:
            return "saetune " + v.name
    return "saetune " + stage
