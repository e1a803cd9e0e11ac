"""``saetune pipeline RECIPE``: several stages from one YAML recipe, one parent run dir.

A pipeline recipe lists stages; each names a verb, optionally a per-verb recipe to start from,
and settings. ``{stage}`` in a setting is replaced by that earlier stage's run dir, so a recipe
reads like the paper's procedure::

    pipeline: resa-still-v5
    stages:
      - {name: sae,   verb: train-sae, config: resa_stage1}
      - {name: tune,  verb: tune,  set: {sae: "{sae}", ...}}
      - {name: merge, verb: merge, set: {adapter: "{tune}"}}
      - {name: eval,  verb: eval,  set: {model: "{merge}", ...}}

The parent dir gets one sub-run per stage; a complete stage is kept on ``--resume``, a
partial one resumes. ``expected`` (optional) holds the published numbers the run should match.
:func:`run_steps` is that stage runner; ``saetune demo`` runs its own recipe (Python steps) through it too.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import config as _config
from .errors import SaetuneError
from .io import atomic_write_json, check_writable_dir
from .verbs import pipeline_verbs

# verb → (module, config class, run function) of every verb a recipe may name (saetune.verbs marks them
# pipeline=True); every run function is f(cfg, out, resume=, overwrite=)
VERBS: dict[str, tuple[str, str, str]] = pipeline_verbs()


def verb_api(verb: str) -> tuple[type, Callable]:
    if verb not in VERBS:
        raise SaetuneError(f"unknown pipeline verb {verb!r}; valid: {', '.join(VERBS)}")
    mod, cls, fn = VERBS[verb]
    m = importlib.import_module(mod)
    return getattr(m, cls), getattr(m, fn)


@dataclass
class Stage:
    name: str
    verb: str
    cfg: Any


def stage_state(path: Path) -> str:
    """'missing', 'complete', or 'partial' for a sub-run dir. A run that stopped before doing any work counts
    as missing: it starts afresh (with the recipe as it is now), since resuming would repeat the old settings."""
    from .runs import unworked_run
    mf = path / "manifest.json"
    if not mf.exists():
        return "missing" if not path.exists() or not any(path.iterdir()) else "partial"
    if unworked_run(path):
        return "missing"
    return "complete" if json.loads(mf.read_text()).get("status") == "complete" else "partial"


@dataclass
class Step:
    """One sub-run as Python: ``run(path, partial)`` makes the run dir ``path`` (resumes it when ``partial``);
    ``doing`` is said while it runs (``[name] doing …``)."""
    name: str
    doing: str
    run: Callable[[Path, bool], Any]


def _verb_step(st: Stage) -> Callable[[Path, bool], Any]:
    def run(path: Path, partial: bool) -> Any:
        _, fn = verb_api(st.verb)
        return fn(st.cfg, path, resume=partial, overwrite=False)
    return run


def run_steps(parent: Path, steps: list[Step], time_kept: bool = False) -> dict[str, float]:
    """Run each step into ``parent/<name>`` in order: a complete sub-run is kept, a partial one resumes, a missing
    one starts (:func:`stage_state`). Returns the seconds of each step that ran (with ``time_kept``, of each kept
    one too, which is then printed as well)."""
    import time
    seconds: dict[str, float] = {}
    for st in steps:
        path = parent / st.name
        state = stage_state(path)
        t0 = time.perf_counter()
        if state == "complete":
            print(f"[{st.name}] already complete, kept")
            if not time_kept:
                continue
        else:
            print(f"[{st.name}] {st.doing} …", flush=True)
            st.run(path, state == "partial")
        seconds[st.name] = round(time.perf_counter() - t0, 2)
        print(f"[{st.name}] {seconds[st.name]:.1f} s", flush=True)
    return seconds


def _substitute(value: Any, dirs: dict[str, str], stage: str) -> Any:
    if isinstance(value, str):
        def repl(m: re.Match) -> str:
            if m.group(1) not in dirs:
                raise SaetuneError(f"stage {stage!r} refers to {{{m.group(1)}}}, which is not an earlier stage "
                                   f"(earlier: {', '.join(dirs) or 'none'})")
            return dirs[m.group(1)]
        return re.sub(r"\{([A-Za-z0-9_-]+)\}", repl, value)
    if isinstance(value, list):
        return [_substitute(v, dirs, stage) for v in value]
    return value


def load_pipeline(recipe: str | Path, parent: str | Path) -> tuple[dict[str, Any], list[Stage]]:
    """Read a pipeline recipe and build each stage's config (``{stage}`` → ``parent/stage``)."""
    path = _config.resolve_recipe(recipe)
    data = _config.read_yaml(path)
    if "stages" not in data or not isinstance(data["stages"], list) or not data["stages"]:
        raise SaetuneError(f"{str(path)!r} is not a pipeline recipe: it needs a non-empty 'stages' list "
                           "(per-verb recipes are passed with --config to their verb)")
    dirs: dict[str, str] = {}
    stages = []
    for i, st in enumerate(data["stages"]):
        if not isinstance(st, dict) or "name" not in st or "verb" not in st:
            raise SaetuneError(f"{str(path)!r}: stage {i} needs 'name' and 'verb' (got {st!r})")
        unknown = set(st) - {"name", "verb", "config", "set"}
        if unknown:
            raise SaetuneError(f"{str(path)!r}: stage {st['name']!r} has unknown keys {sorted(unknown)}; valid: "
                               "name, verb, config, set")
        name = str(st["name"])
        if name in dirs:
            raise SaetuneError(f"{str(path)!r}: two stages are named {name!r}")
        cls, _ = verb_api(st["verb"])
        settings = {k: _substitute(v, dirs, name) for k, v in (st.get("set") or {}).items()}
        try:
            cfg = _config.load_config(cls, st.get("config"), settings)
        except SaetuneError as e:
            raise SaetuneError(f"{str(path)!r}: stage {name!r} ({st['verb']}): {e}") from None
        stages.append(Stage(name, st["verb"], cfg))
        dirs[name] = str(Path(parent) / name)
    return data, stages


def run_pipeline(recipe: str | Path, out: str | Path, resume: bool = False, overwrite: bool = False,
                 only: list[str] | None = None) -> dict[str, Any]:
    """Run the stages of ``recipe`` into ``out/<stage>``; returns ``summary.json``'s dict."""
    parent = Path(out)
    if parent.exists() and any(parent.iterdir()) and not (resume or overwrite):
        raise SaetuneError(f"output dir {str(parent)!r} is not empty; pass --resume to continue the pipeline, "
                           "--overwrite to replace it, or choose another --out")
    check_writable_dir(parent)
    data, stages = load_pipeline(recipe, parent)  # a bad recipe is refused before anything is deleted
    if overwrite and parent.exists() and any(parent.iterdir()):
        from .runs import check_overwrite_parent, config_paths
        own = [(parent / s.name).resolve() for s in stages]  # "{stage}" settings name the stages' own dirs
        inputs = [p for s in stages for p in config_paths(s.cfg)
                  if not any(q == Path(p).resolve() or q in Path(p).resolve().parents for q in own)]
        check_overwrite_parent(parent, "pipeline", [str(_config.resolve_recipe(recipe)), *inputs])
        shutil.rmtree(parent)
    if only:
        names = [s.name for s in stages]
        bad = [o for o in only if o not in names]
        if bad:
            raise SaetuneError(f"--only names unknown stages {bad}; stages: {', '.join(names)}")
    parent.mkdir(parents=True, exist_ok=True)
    seconds = run_steps(parent, [Step(st.name, st.verb, _verb_step(st)) for st in stages
                                 if not only or st.name in only])
    summary = {"pipeline": data.get("pipeline", Path(str(recipe)).stem), "stages": [s.name for s in stages],
               "seconds": seconds, "expected": data.get("expected")}
    atomic_write_json(parent / "summary.json", summary)
    return summary
