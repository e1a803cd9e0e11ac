"""The ``saetune`` command line. Every verb is a thin shell over a Python function taking the
stage's config dataclass; the dataclass fields are the flags, documented once."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from . import __version__
from . import config as _config
from .errors import SaetuneError


def _verb(sub, name: str, cls: type, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=(cls.__doc__ or help).strip(),
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", metavar="YAML", help="YAML config or shipped recipe name; flags override it")
    p.add_argument("--out", metavar="DIR", help="run dir to write (default runs/<stage>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (its config.yaml is used)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run dir")
    _config.add_arguments(p, cls)
    if "progress" not in _config.config_fields(cls):
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    p.set_defaults(cls=cls, stage=name)
    return p


def _command(stage: str) -> str:
    """The command that makes (and resumes) a run dir of ``stage``."""
    return "saetune " + {"toy": "toy build"}.get(stage, stage)


def _check_resume_stage(run_dir: str, stage: str) -> None:
    """Refuse ``--resume`` of a dir another verb wrote, naming that verb, before its config is read as ours."""
    d = Path(run_dir)
    if not d.is_dir():
        raise SaetuneError(f"cannot resume {run_dir!r}: {'it is a file' if d.exists() else 'no such directory'}; "
                           f"pass the run dir of an earlier `{_command(stage)}`")
    mf = d / "manifest.json"
    if not mf.exists():
        if stage == "demo":
            return
        if any((sub / "manifest.json").exists() for sub in d.iterdir() if sub.is_dir()):
            what, cmd = ("a demo", "saetune demo --resume") if (d / "config.yaml").exists() else (
                "a pipeline", "saetune pipeline RECIPE --resume")
            raise SaetuneError(f"cannot resume {run_dir!r} with `{_command(stage)}`: it holds {what} (a parent dir of "
                               f"sub-runs), not a '{stage}' run; continue it with `{cmd} {run_dir}`, or resume one of "
                               "its sub-run dirs with its own verb")
        return  # no manifest at all: the config.yaml check below explains
    try:
        found = json.loads(mf.read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return  # unreadable manifest: RunDir.open reports it
    if found and (stage == "demo" or found != stage):
        raise SaetuneError(f"cannot resume {run_dir!r} with `{_command(stage)}`: it holds a '{found}' run, made by "
                           f"`{_command(found)}`; continue it with `{_command(found)} --resume {run_dir}`, or pass "
                           f"the run dir of an earlier `{_command(stage)}`")


def _resolve(args: argparse.Namespace) -> tuple[Any, str | None, bool]:
    cls = args.cls
    overrides = _config.overrides_from_args(args, cls)
    path = args.config
    out = args.out
    resume = bool(args.resume)
    if resume:
        if out and Path(out) != Path(args.resume):
            raise SaetuneError(f"--out {out!r} and --resume {args.resume!r} name different dirs; pass only --resume")
        out = args.resume
        _check_resume_stage(args.resume, args.stage)
        if path is None:
            saved = Path(args.resume) / "config.yaml"
            if not saved.exists():
                raise SaetuneError(f"cannot resume {args.resume!r}: it holds no config.yaml (is it a saetune run dir?)")
            path = saved
    return _config.load_config(cls, path, overrides), out, resume


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


def _stage(module: str, fn: str) -> Callable:
    """A verb that resolves its config and runs ``module.fn(cfg, out, resume=, overwrite=)``, printing the result."""
    def cmd(args) -> None:
        import importlib
        run = getattr(importlib.import_module(module), fn)
        cfg, out, resume = _resolve(args)
        _print_json(run(cfg, out, resume=resume, overwrite=args.overwrite))
    return cmd


cmd_cache = _stage("saetune.activations", "cache")
cmd_train_sae = _stage("saetune.sae_trainer", "train_sae")
cmd_tune = _stage("saetune.tuning", "tune")
cmd_merge = _stage("saetune.attach", "merge")
cmd_attach = _stage("saetune.attach", "attach")
cmd_features = _stage("saetune.analysis.feature_build", "features")
cmd_rl = _stage("saetune.rl.trainer", "train")


def cmd_toy_build(args) -> None:
    from .toy.build import build_toy
    cfg, out, resume = _resolve(args)
    stats = build_toy(cfg, out or "runs/toy-base", resume=resume, overwrite=args.overwrite, progress=args.progress)
    _print_json(stats)







def cmd_eval(args) -> None:
    from .evaluate import compare, format_table, run
    if args.compare:
        print(format_table(compare(args.compare, metric=args.metric, allow_mixed_presets=args.allow_mixed_presets)))
        return
    cfg, out, resume = _resolve(args)
    results = run(cfg, out, resume=resume, overwrite=args.overwrite)
    _print_json({name: {k: e[k] for k in ("n", "samples_per_problem", "pass@1", "avg@k", "pass@k", "ci95",
                                          "unparsable_gold", "problems_per_s")} for name, e in results.items()})



def cmd_explore(args) -> None:
    from saetune.app import explore
    sys.exit(explore(args.run_dir, host=args.host, port=args.port, replace_process=True))


def cmd_pipeline(args) -> None:
    from .pipeline import run_pipeline
    out = args.resume or args.out
    if not out:
        from .runs import default_run_dir
        out = default_run_dir(Path(args.recipe).stem.replace("_", "-"))
    _print_json(run_pipeline(args.recipe, out, resume=bool(args.resume), overwrite=args.overwrite, only=args.only))



def cmd_verl_data(args) -> None:
    from saetune.rl.integrations.verl_run import write_verl_dataset
    _print_json(write_verl_dataset(args.source, args.out, limit=args.limit, rpr_weight=args.rpr_weight,
                                   seed=args.seed, split=args.split, rpr_mode=args.rpr_mode))


def cmd_verl_train(args) -> None:
    import subprocess
    from saetune.rl.integrations.verl_run import format_command, verl_command
    overrides = [o for o in args.overrides if o != "--dry-run"]  # the flag may come after the overrides
    cmd = verl_command(args.recipe, overrides)
    print(format_command(cmd), flush=True)
    if not (args.dry_run or "--dry-run" in args.overrides):
        sys.exit(subprocess.call(cmd))


def cmd_eval_sae(args) -> None:
    from .sae_eval import eval_sae
    cfg, out, resume = _resolve(args)
    eval_sae(cfg, out, resume=resume, overwrite=args.overwrite)  # prints the quality table and the run dir


def cmd_demo(args) -> None:
    from .demo_pipeline import demo
    cfg, out, resume = _resolve(args)
    demo(cfg, out, resume=resume, overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    from .activations import CacheConfig
    from .attach import AttachConfig, MergeConfig
    from .demo_pipeline import DemoConfig
    from .toy.build import ToyBuildConfig
    from .sae_trainer import TrainSAEConfig
    from .tuning import TuneConfig

    parser = argparse.ArgumentParser(prog="saetune", description=(
        "saetune: sparse autoencoders, SAE-Tuning and RL tools for reasoning models. "
        "Each verb writes one run dir (config.yaml, manifest.json, metrics.jsonl, artifacts)."))
    parser.add_argument("--version", action="version", version=f"saetune {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    p = _verb(sub, "demo", DemoConfig, "Resa's SAE-Tuning end to end on the toy model, on a CPU: RL-trained "
                                       "source → its activations → SAE → SAE-Tuning of the base → merge → controls "
                                       "→ greedy accuracy of each → feature data, in a summary table")
    p.set_defaults(fn=cmd_demo)

    toy = sub.add_parser("toy", help="the built-in model organism (a tiny arithmetic reasoning model)")
    toy_sub = toy.add_subparsers(dest="toy_verb", metavar="ACTION")
    toy_sub.required = True
    p = _verb(toy_sub, "build", ToyBuildConfig, "pre-train the toy model from scratch into a HF model dir")
    p.set_defaults(fn=cmd_toy_build, stage="toy")

    p = _verb(sub, "cache", CacheConfig, "capture activations into an on-disk store")
    p.set_defaults(fn=cmd_cache)
    p = _verb(sub, "train-sae", TrainSAEConfig, "train SAEs on a model's activations (store or on the fly)")
    p.set_defaults(fn=cmd_train_sae)
    from .sae_eval import EvalSAEConfig
    p = _verb(sub, "eval-sae", EvalSAEConfig, "SAEBench's core metrics (ce_loss_score, kl_div_score, explained "
              "variance, L0, alive, density) and one quality table for one or several SAEs on any model")
    p.set_defaults(fn=cmd_eval_sae)
    p = sub.add_parser("pipeline", help="run a pipeline recipe (e.g. resa_still_v5): one sub-run per stage",
                       description="Run the stages of a pipeline recipe (a shipped name or a YAML path) into one "
                                   "parent dir; '{stage}' in a setting names an earlier stage's run dir.")
    p.add_argument("recipe", help="pipeline recipe: resa_still_v5, resa_deepscaler_v3, resa_modularity, or a path")
    p.add_argument("--out", metavar="DIR", help="parent run dir (default runs/<recipe>-<timestamp>)")
    p.add_argument("--resume", metavar="DIR", help="continue the pipeline in DIR (complete stages are kept)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing parent dir")
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    p.set_defaults(fn=cmd_pipeline)
    p = _verb(sub, "tune", TuneConfig, "SAE-Tuning (Resa Stage II): LoRA through a frozen SAE bottleneck")
    p.set_defaults(fn=cmd_tune)
    p = _verb(sub, "merge", MergeConfig, "merge a LoRA adapter into its model (merged/ with a model card)")
    p.set_defaults(fn=cmd_merge)
    p = _verb(sub, "attach", AttachConfig, "put an adapter onto another model, or hook an SAE in while generating")
    p.set_defaults(fn=cmd_attach)
    from .evaluate import EvalConfig
    p = _verb(sub, "eval", EvalConfig, "sample and grade a model on math benchmarks (pass@k); --compare tabulates runs")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="print a table of these eval run dirs (or "
                   "parents of eval run dirs) instead of evaluating")
    p.add_argument("--metric", default="pass@1", help="metric of the --compare table: pass@1, avg@k or pass@k:K")
    p.add_argument("--allow-mixed-presets", action="store_true", help="--compare: show runs of different eval presets "
                   "side by side (refused otherwise: their numbers do not compare); the table then says so")
    p.set_defaults(fn=cmd_eval)
    from saetune.analysis.feature_build import FeaturesConfig
    p = _verb(sub, "features", FeaturesConfig, "precompute per-feature explorer data (density, histograms, contexts, "
              "logit effects, neighbours, think-token features)")
    p.set_defaults(fn=cmd_features)
    from saetune.rl.trainer import RLConfig
    p = _verb(sub, "rl", RLConfig, "GRPO/DAPO RL (CURE optional) with verifiable rewards; writes model/, metrics, traces")
    p.set_defaults(fn=cmd_rl)
    p = sub.add_parser("verl-data", help="write a benchmark or the toy task as verl's RL parquet",
                       description="One row per problem: data_source, prompt (chat), ability, reward_model "
                                   "(ground_truth) and extra_info (index; rpr_weight, rpr_mode when given).")
    p.add_argument("source", help="toy, a benchmark name (math500, aime24, ...), a JSONL/Parquet file or a hub id")
    p.add_argument("--out", required=True, metavar="FILE.parquet", help="parquet file to write")
    p.add_argument("--limit", type=int, default=0, help="keep the first N problems (toy: draw N, default 1024)")
    p.add_argument("--rpr-weight", type=float, default=None,
                   help="weight of the reasoning-pattern reward per row (default: 0 with rpr mode add, else 1)")
    p.add_argument("--rpr-mode", choices=["add", "wrong_only", "alone"], default=None,
                   help="how RPR joins correctness: wrong_only = wrong answers get their RPR (the noisy-rewards "
                        "paper), alone = RPR only, add = summed (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the toy problems")
    p.add_argument("--split", default="train", help="dataset split to read (hub ids) and record")
    p.set_defaults(fn=cmd_verl_data)
    p = sub.add_parser("verl-train", help="run verl's PPO trainer with a saetune verl recipe (dapo_math)",
                       description="python -m verl.trainer.main_ppo with the recipe's Hydra overrides, then yours "
                                   "(later ones win). Needs pip install saetune[verl] and GPUs.")
    p.add_argument("recipe", help="shipped verl recipe (dapo_math) or a YAML path")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="Hydra overrides for verl")
    p.add_argument("--dry-run", action="store_true", help="print the command and stop")
    p.set_defaults(fn=cmd_verl_train)
    p = sub.add_parser("explore", help="open the Streamlit explorer on a run dir or a pipeline dir",
                       description="Run the Streamlit explorer headless (no usage statistics) on RUN_DIR.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run dir or a pipeline's parent dir (e.g. runs/demo-…)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=8501, help="port to serve on")
    p.set_defaults(fn=cmd_explore)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.fn(args)
        return 0
    except SaetuneError as e:
        print(f"saetune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saetune: interrupted; continue with --resume RUN_DIR", file=sys.stderr)
        return 130
    except Exception as e:  # no raw traceback for CLI users unless asked
        if os.environ.get("SAETUNE_DEBUG"):
            raise
        print(f"saetune: internal error: {type(e).__name__}: {e}\n"
              "(set SAETUNE_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
