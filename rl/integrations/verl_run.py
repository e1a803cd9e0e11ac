"""Run verl with saetune's pieces: its dataset files and its recipes.

- :func:`write_verl_dataset` writes a benchmark (or the toy task) as verl's RL parquet: one row
  per problem with ``data_source``, ``prompt`` (chat messages), ``ability``,
  ``reward_model = {"style": "rule", "ground_truth": answer}`` and ``extra_info``
  (``index``, and ``rpr_weight`` / ``rpr_mode`` when given) — the fields verl's ``RLHFDataset``
  and reward managers read.
- :func:`verl_command` turns a recipe (``saetune/recipes/verl/*.yaml``: a list of Hydra
  overrides for ``verl.trainer.main_ppo`` and the overrides a user must add) into the command
  line; ``saetune verl-train RECIPE key=value ...`` runs it.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from saetune.errors import SaetuneError

__all__ = ["RECIPES_DIR", "load_verl_recipe", "verl_command", "write_verl_dataset"]

import saetune.recipes as _recipes

RECIPES_DIR = Path(_recipes.__file__).resolve().parent / "verl"

TOY_SOURCE = "saetune/toy"


def _rows(source: str, limit: int, seed: int, split: str) -> tuple[str, list[dict[str, str]]]:
    if source == "toy":
        from saetune.toy.task import examples
        return TOY_SOURCE, [{"problem": ex["problem"], "answer": ex["answer"]} for ex in examples(limit or 1024, seed)]
    from saetune.benchmarks import load_benchmark, resolve_benchmark
    name, src, sp, pf, af = resolve_benchmark(source)
    kw = {k: v for k, v in (("split", sp or split), ("problem_field", pf), ("answer_field", af)) if v}
    return name, load_benchmark(src, limit=limit, **kw)


def write_verl_dataset(source: str, out: str | Path, *, limit: int = 0, rpr_weight: float | None = None,
                       seed: int = 0, split: str = "train", rpr_mode: str | None = None) -> dict[str, Any]:
    """Write ``source`` (``toy``, a benchmark name, a local JSONL/Parquet, or a hub id) as verl parquet.

    ``limit`` keeps the first rows (for ``toy``: how many problems to draw, default 1,024, from
    ``random.Random(seed)``). ``rpr_weight`` and ``rpr_mode``, when given, go into every row's
    ``extra_info``: how saetune's reward manager weighs the reasoning-pattern reward and joins it
    with correctness (:func:`saetune.rl.rewards.combine_rpr`; ``wrong_only`` with weight 1 is the
    "noisy rewards" paper's; unset, the manager's ``reward_kwargs`` or its defaults apply). The
    file is written atomically.
    """
    import math

    import pandas as pd

    from saetune.rl.rewards import RPR_MODES
    if rpr_weight is not None and not (isinstance(rpr_weight, (int, float)) and math.isfinite(rpr_weight)
                                       and rpr_weight >= 0):
        raise SaetuneError(f"rpr_weight must be a finite number ≥ 0, got {rpr_weight!r}")
    if rpr_mode is not None and rpr_mode not in RPR_MODES:
        raise SaetuneError(f"rpr_mode must be one of {', '.join(RPR_MODES)}, got {rpr_mode!r}")
    rpr = {**({} if rpr_weight is None else {"rpr_weight": float(rpr_weight)}),
           **({} if rpr_mode is None else {"rpr_mode": rpr_mode})}
    out = Path(out)
    if out.suffix != ".parquet":
        raise SaetuneError(f"verl reads parquet; name the output *.parquet, got {str(out)!r}")
    data_source, rows = _rows(source, int(limit), int(seed), split)
    records = [{
        "data_source": data_source,
        "prompt": [{"role": "user", "content": r["problem"]}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": r["answer"]},
        "extra_info": {"index": i, **rpr, "split": split},
    } for i, r in enumerate(rows)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pd.DataFrame.from_records(records).to_parquet(tmp, index=False)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return {"path": str(out), "rows": len(records), "data_source": data_source}


def load_verl_recipe(name: str) -> dict[str, Any]:
    """A verl recipe by shipped name (``dapo_rpr``) or path: ``{"overrides": [...], "required": [...]}``."""
    path = Path(name)
    if not path.exists():
        path = RECIPES_DIR / f"{name}.yaml"
    if not path.exists():
        shipped = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise SaetuneError(f"verl recipe {name!r} is neither a file nor a shipped recipe ({', '.join(shipped)})")
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe.get("overrides"), list) or not all(isinstance(o, str) and "=" in o
                                                                  for o in recipe["overrides"]):
        raise SaetuneError(f"verl recipe {str(path)!r} needs 'overrides': a list of 'key=value' strings")
    recipe.setdefault("required", [])
    return recipe


def verl_command(name: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``python -m verl.trainer.main_ppo`` with the recipe's overrides, then ``extra`` (later wins).

    Every key in the recipe's ``required`` list must be set by ``extra`` (data files, model
    path): the error names the missing keys.
    """
    recipe = load_verl_recipe(name)
    bad = [e for e in extra if "=" not in e]
    if bad:
        raise SaetuneError(f"verl overrides are key=value, got {bad}")
    given = {e.split("=", 1)[0].lstrip("+~") for e in extra}
    missing = [k for k in recipe["required"] if k not in given]
    if missing:
        raise SaetuneError(f"recipe {name!r} needs {', '.join(k + '=...' for k in missing)} "
                           f"(e.g. data.train_files=train.parquet from `saetune verl-data`)")
    return [sys.executable, "-m", "verl.trainer.main_ppo", *recipe["overrides"], *extra]


def format_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
