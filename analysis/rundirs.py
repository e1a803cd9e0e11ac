"""Find and read run dirs without ever raising on a half-written one.

A *run dir* holds ``manifest.json`` (DESIGN.md); a *pipeline dir* (``saetune demo``, recipes)
holds one sub-run per stage plus ``summary.json``. Every reader here accepts either and
returns plain data: a missing file is ``None`` or an empty list, a half-written JSON file is
reported in :attr:`RunInfo.problems`, never raised, so the explorer can show a sentence
instead of a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from saetune.errors import SaetuneError
from saetune.runs import resolve_recorded

MANIFEST = "manifest.json"
SUMMARY = "summary.json"


def read_json(path: str | Path) -> Any | None:
    """The parsed JSON file, or None when it is missing or not (yet) valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; lines cut by a kill or not JSON objects are skipped."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_config(run: str | Path) -> dict[str, Any] | None:
    """``config.yaml`` of a run dir as a dict, or None."""
    import yaml
    try:
        data = yaml.safe_load((Path(run) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def mtime_key(path: str | Path) -> float:
    """Latest modification time of ``path`` and its direct children (a cache key; 0 if absent)."""
    p = Path(path)
    try:
        t = p.stat().st_mtime
    except OSError:
        return 0.0
    if p.is_dir():
        for c in p.iterdir():
            try:
                t = max(t, c.stat().st_mtime)
            except OSError:
                pass
    return t


@dataclass
class RunInfo:
    """One stage's run dir, as far as it could be read."""

    path: Path
    name: str  # the sub-run's name inside its pipeline dir, else the dir's own name
    stage: str | None
    status: str  # complete | running | failed | partial (no readable manifest)
    manifest: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def has(self, rel: str) -> bool:
        return (self.path / rel).exists()


def run_info(path: str | Path, name: str | None = None) -> RunInfo:
    """Read one run dir's manifest into a :class:`RunInfo` (never raises)."""
    p = Path(path)
    mf = read_json(p / MANIFEST)
    problems = []
    if mf is None or not isinstance(mf, dict):
        problems.append(f"{p / MANIFEST} is missing or not valid JSON (the stage may still be writing it)")
        return RunInfo(p, name or p.name, None, "partial", {}, problems)
    status = str(mf.get("status") or "partial")
    if status == "running":
        problems.append(f"{p.name}: the stage is still running (or was killed); its artifacts may be incomplete")
    elif status == "failed":
        problems.append(f"{p.name}: the stage failed: {mf.get('error', 'no reason recorded')}")
    return RunInfo(p, name or p.name, mf.get("stage"), status, mf, problems)


@dataclass
class Discovery:
    """What a user-given path holds: one run dir, or a pipeline dir with sub-runs."""

    root: Path
    kind: str  # "run" | "pipeline" | "empty" | "missing"
    runs: list[RunInfo]
    summary: dict[str, Any] | None
    message: str = ""  # what to tell the user when nothing usable is there

    def by_stage(self, stage: str) -> list[RunInfo]:
        return [r for r in self.runs if r.stage == stage]

    def find(self, name_or_stage: str) -> RunInfo | None:
        for r in self.runs:
            if r.name == name_or_stage:
                return r
        found = self.by_stage(name_or_stage)
        return found[0] if found else None

    def with_artifact(self, rel: str) -> list[RunInfo]:
        """Runs holding ``rel`` (e.g. ``features``, ``eval/results.json``, ``traces``)."""
        return [r for r in self.runs if r.has(rel)]


def discover(path: str | Path | None) -> Discovery:
    """Accept a single run dir or a pipeline parent dir; list its runs (never raises).

    A pipeline dir's sub-runs are its direct children holding ``manifest.json``, the run dirs one
    level further down in a child without one (``eval/<label>/``, named ``eval/<label>``), and,
    when a stage died before writing its manifest, any child dir named in ``summary.json``'s
    ``stages`` (shown as partial).
    """
    if path is None or str(path).strip() == "":
        return Discovery(Path("."), "missing", [], None,
                         "No run dir given. Start the explorer with `saetune explore RUN_DIR` "
                         "(or set SAETUNE_RUN_DIR).")
    root = Path(path).expanduser()
    if not root.is_dir():
        return Discovery(root, "missing", [], None, f"Run dir {str(root)!r} does not exist.")
    summary = read_json(root / SUMMARY)
    summary = summary if isinstance(summary, dict) else None
    if (root / MANIFEST).exists():
        return Discovery(root, "run", [run_info(root)], summary)
    children = sorted(c for c in root.iterdir() if c.is_dir() and not c.name.startswith("."))
    runs = []
    named = set(((summary or {}).get("stages") or {}).keys()) if summary else set()
    for c in children:
        if (c / MANIFEST).exists():
            runs.append(run_info(c))
            continue
        subs = sorted(g for g in c.iterdir() if g.is_dir() and (g / MANIFEST).exists())
        if subs:  # a group of sub-runs, e.g. eval/<label>/
            runs += [run_info(g, name=f"{c.name}/{g.name}") for g in subs]
        elif c.name in named:
            runs.append(run_info(c))  # a stage that died before its manifest: shown as partial
    if runs:
        return Discovery(root, "pipeline", runs, summary)
    return Discovery(root, "empty", [], summary,
                     f"{str(root)!r} holds no saetune run: no manifest.json in it or in its sub-dirs. "
                     "Point the explorer at a run dir (e.g. runs/demo-…/sae) or a pipeline dir "
                     "(e.g. runs/demo-…).")


def runs_table(d: Discovery) -> pd.DataFrame:
    """One row per run: name, stage, status, wall time, GPU-hours, cost, start time, path."""
    rows = []
    for r in d.runs:
        m = r.manifest
        rows.append({
            "run": r.name, "stage": r.stage, "status": r.status,
            "wall_s": m.get("wall_seconds", round(sum((m.get("phases") or {}).values()), 3) if m else None),
            "gpu_hours": m.get("gpu_hours"), "cost_usd": m.get("estimated_cost_usd"),
            "device": m.get("device"), "start": m.get("start_time"), "path": str(r.path),
        })
    return pd.DataFrame(rows, columns=["run", "stage", "status", "wall_s", "gpu_hours", "cost_usd", "device",
                                       "start", "path"])


def configs_side_by_side(runs: list[RunInfo]) -> pd.DataFrame:
    """Config keys as rows, one column per run (missing keys empty); values shown as text."""
    cols = {}
    for r in runs:
        cfg = read_config(r.path) or {}
        cols[r.name] = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in cfg.items()}
    df = pd.DataFrame(cols)
    return df.astype(object).where(df.notna(), "").astype(str) if len(df) else df


def resolve_recorded_path(recorded: str | None, run: str | Path) -> Path | None:
    """A path recorded in ``run`` found again from here (:func:`saetune.runs.resolve_recorded`: relative to the
    run dir, or, in older runs, to the cwd they ran in, which a moved pipeline dir still finds); None if nowhere."""
    found = resolve_recorded(recorded, run)
    return Path(found) if found and Path(found).exists() else None


def find_saes(path: str | Path, hooks: list[str] | None = None) -> tuple[dict[str, Path], Path | None]:
    """SAE dirs by hook name under ``path`` (SAE dir, train-sae run dir, or multi-hook dir), and
    the train-sae run dir when there is one (for the model and dataset it recorded)."""
    p = Path(path)
    if not p.exists():
        raise SaetuneError(f"SAE path {str(p)!r} does not exist; pass a train-sae run dir or an SAE dir")
    run = None
    if (p / "manifest.json").exists() and (p / "sae").is_dir():
        run, p = p, p / "sae"
    if (p / "cfg.json").exists():
        cfg = read_json(p / "cfg.json")
        if not isinstance(cfg, dict):
            raise SaetuneError(f"{str(p / 'cfg.json')!r} is not valid JSON (is the SAE still being written?)")
        name = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or p.name
        found = {name: p}
    else:
        found = {c.name: c for c in sorted(p.iterdir()) if c.is_dir() and (c / "cfg.json").exists()} if p.is_dir() else {}
    if not found:
        raise SaetuneError(f"{str(p)!r} holds no SAE (no cfg.json in it or in a sub-directory)")
    if hooks:
        missing = [h for h in hooks if h not in found]
        if missing:
            raise SaetuneError(f"no SAE for hook {missing[0]!r} in {str(p)!r}; it holds: {', '.join(found)}")
        found = {h: found[h] for h in hooks}
    if run is None and (p.parent / "manifest.json").exists():
        run = p.parent
    return found, run


def recorded_model(sae_dirs: dict[str, Path], run: Path | None) -> str:
    """The model an SAE was trained on, found from its run's config or its cfg.json metadata."""
    candidates = []
    if run is not None:  # the manifest's input is the model actually used (config.yaml's may be a default)
        man = read_json(run / MANIFEST)
        used = ((man.get("inputs") or {}).get("model") or {}).get("path") if isinstance(man, dict) else None
        candidates += [(used, run), ((read_config(run) or {}).get("model"), run)]
    for d in sae_dirs.values():
        cfg = read_json(d / "cfg.json")
        meta = (cfg.get("metadata") or {}) if isinstance(cfg, dict) else {}
        candidates.append((meta.get("model_name"), d))
    for rec, where in candidates:
        if rec == "toy":
            return "toy"
        found = resolve_recorded_path(rec, where)
        if found is not None:
            return str(found)
    names = [c for c, _ in candidates if c]
    raise SaetuneError("cannot find the model the SAE was trained on" + (f" (recorded: {names[0]!r})" if names else "")
                       + "; pass --model PATH")
