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
from .verbs import GROUPS, VERBS, Verb, command as _command


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


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="pipeline recipe: resa_still_v5, resa_deepscaler_v3, resa_modularity, or a path")
    p.add_argument("--out", metavar="DIR", help="parent run dir (default runs/<recipe>-<timestamp>)")
    p.add_argument("--resume", metavar="DIR", help="continue the pipeline in DIR (complete stages are kept)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing parent dir")
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="print a table of these eval run dirs (or "
                   "parents of eval run dirs) instead of evaluating")
    p.add_argument("--metric", default="pass@1", help="metric of the --compare table: pass@1, avg@k or pass@k:K")
    p.add_argument("--allow-mixed-presets", action="store_true", help="--compare: show runs of different eval presets "
                   "side by side (refused otherwise: their numbers do not compare); the table then says so")


def _verl_data_args(p: argparse.ArgumentParser) -> None:
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


def _verl_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="shipped verl recipe (dapo_math) or a YAML path")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="Hydra overrides for verl")
    p.add_argument("--dry-run", action="store_true", help="print the command and stop")


def _explore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run dir or a pipeline's parent dir (e.g. runs/demo-…)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=8501, help="port to serve on")


def _handler(v: Verb) -> Callable:
    """The function ``saetune <v.name>`` runs: ``cli.<v.cli>``, or the generic stage runner."""
    return globals()[v.cli] if v.cli else _stage(v.module, v.function)


def build_parser() -> argparse.ArgumentParser:
    """One sub-command per verb of :data:`saetune.verbs.VERBS`, in its order."""
    import importlib

    parser = argparse.ArgumentParser(prog="saetune", description=(
        "saetune: sparse autoencoders, SAE-Tuning and RL tools for reasoning models. "
        "Each verb writes one run dir (config.yaml, manifest.json, metrics.jsonl, artifacts)."))
    parser.add_argument("--version", action="version", version=f"saetune {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    groups: dict[str, Any] = {}
    for v in VERBS:
        where, name = sub, v.name
        if " " in v.name:  # "toy build": an action of the "toy" group
            group, name = v.name.split(" ", 1)
            if group not in groups:
                g = sub.add_parser(group, help=GROUPS[group])
                groups[group] = g.add_subparsers(dest=f"{group}_verb", metavar="ACTION")
                groups[group].required = True
            where = groups[group]
        if v.config:
            p = _verb(where, name, getattr(importlib.import_module(v.module), v.config), v.help)
            p.set_defaults(stage=v.stage_name)
        else:
            p = where.add_parser(name, help=v.help, description=v.description or None)
        if v.arguments:
            globals()[v.arguments](p)
        p.set_defaults(fn=_handler(v))
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
