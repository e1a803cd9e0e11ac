"""SAE-Tuning comparison tables: base / source / SAE-tuned / controls, with time and cost.

Two sources, both optional: every ``eval/results.json`` under a run or pipeline dir (DESIGN.md:
``{benchmark: {"n", "samples_per_problem", "pass@1", "avg@k", "pass@k", "ci95"}}``), and a
pipeline's ``summary.json`` (a list of row dicts under ``table``/``rows``/``comparison``, or a
``{model: accuracy | {"accuracy", "ci95", "n"}}`` mapping under ``accuracy``), used for models
no ``results.json`` covers. Time and cost come from the manifest of the
run that produced each result and, for a trained model, of the stage that trained it (the eval
manifest's ``model_run``, else the sibling sub-run named like the model). A row is labelled by
the eval manifest's ``label`` (base, source, SAE-tuned, control, …), else by its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from .rundirs import Discovery, discover, read_json

COLUMNS = ["model", "benchmark", "accuracy", "ci_lo", "ci_hi", "n", "samples", "pass@k", "train_s", "eval_s",
           "gpu_hours", "cost_usd", "source"]


def _results_files(root: Path, max_depth: int = 4) -> list[Path]:
    out = []
    for p in sorted(root.rglob("results.json")):
        rel = p.relative_to(root)
        if len(rel.parts) <= max_depth and ("eval" in rel.parts[:-1] or p.parent.name == "eval"):
            out.append(p)
    return out


def _manifest_above(path: Path, root: Path) -> dict[str, Any]:
    for d in [path.parent, *path.parents]:
        m = read_json(d / "manifest.json")
        if isinstance(m, dict):
            return m
        if d == root or root not in d.parents:
            break
    return {}


def _model_name(results: Path, root: Path) -> str:
    rel = results.parent.relative_to(root).parts
    parts = [p for p in rel if p != "eval"]
    return "/".join(parts) if parts else (root.name if rel else "eval")


def _training_cost(d: Discovery, model: str) -> tuple[float | None, float | None, float | None]:
    """(wall s, GPU-hours, $) of the sub-run named like the model's first path part, if any."""
    head = model.split("/")[0]
    r = d.find(head)
    if r is None or r.path.name == "eval":
        return None, None, None
    m = r.manifest
    return m.get("wall_seconds"), m.get("gpu_hours"), m.get("estimated_cost_usd")


def comparison_table(path: str | Path | Discovery) -> pd.DataFrame:
    """One row per (model, benchmark): accuracy (pass@1), CI, sample counts, time and cost.

    The explorer's view (Compare page): ``eval/results.json`` files are found up to 4 levels under
    ``path`` (an unreadable one is skipped) and a pipeline's ``summary.json`` rows fill in models
    none of them covers. The wide table of ``saetune eval --compare`` (one row per eval run, one
    column per benchmark, a chosen metric in percent, mixed presets refused) is
    :func:`saetune.evaluate.compare`; the two read run dirs differently, so neither is built on the other.
    """
    d = path if isinstance(path, Discovery) else discover(path)
    rows: list[dict[str, Any]] = []
    if d.kind in ("run", "pipeline"):
        for f in _results_files(d.root):
            res = read_json(f)
            if not isinstance(res, dict):
                continue
            m = _manifest_above(f, d.root)
            model = m.get("label") or _model_name(f, d.root)
            src = m.get("model_run") if isinstance(m.get("model_run"), dict) else None
            train_s, gpu_h, cost = ((src.get("wall_seconds"), src.get("gpu_hours"), src.get("estimated_cost_usd"))
                                    if src else _training_cost(d, _model_name(f, d.root)))
            for bench, r in res.items():
                if not isinstance(r, dict) or not any(k in r for k in ("pass@1", "accuracy")):
                    continue
                ci = r.get("ci95") or [None, None]
                pk = r.get("pass@k") or {}
                rows.append({
                    "model": model, "benchmark": bench, "accuracy": r.get("pass@1", r.get("accuracy")),
                    "ci_lo": ci[0], "ci_hi": ci[1], "n": r.get("n"), "samples": r.get("samples_per_problem"),
                    "pass@k": ", ".join(f"{k}: {v:.3f}" for k, v in pk.items() if isinstance(v, (int, float))) or None,
                    "train_s": train_s, "eval_s": m.get("wall_seconds"),
                    "gpu_hours": (gpu_h or 0) + (m.get("gpu_hours") or 0) if (gpu_h is not None or m) else None,
                    "cost_usd": (cost or 0) + (m.get("estimated_cost_usd") or 0) if (cost is not None or m) else None,
                    "source": str(f.relative_to(d.root)),
                })
    have = {r["model"] for r in rows}
    rows += [r for r in summary_rows(d.summary or {}) if r["model"] not in have]
    rows.sort(key=lambda r: _role(str(r["model"])))  # stable: base, source, SAE-tuned, controls, others
    return pd.DataFrame(rows, columns=COLUMNS)


def _role(model: str) -> int:
    m = model.lower()
    if m.startswith("base") or m == "toy-base":
        return 0
    if m.startswith("source"):
        return 1
    if "tune" in m:
        return 2
    return 3 if m.startswith("control") else 4


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Comparison rows a pipeline wrote into ``summary.json`` itself."""
    rows = []
    for key in ("table", "rows", "comparison"):
        t = summary.get(key)
        if isinstance(t, list):
            for r in t:
                if isinstance(r, dict):
                    row = {c: r.get(c) for c in COLUMNS}
                    row["model"] = r.get("model", r.get("name"))
                    row["accuracy"] = r.get("accuracy", r.get("pass@1", r.get("exact_match")))
                    row["train_s"] = r.get("train_s", r.get("seconds", r.get("wall_seconds")))
                    row["cost_usd"] = r.get("cost_usd", r.get("estimated_cost_usd"))
                    row["source"] = f"summary.json:{key}"
                    rows.append(row)
            if rows:
                return rows
    acc = summary.get("accuracy")
    if isinstance(acc, dict):
        secs = summary.get("seconds") or {}
        for model, v in acc.items():
            if isinstance(v, dict):
                ci = v.get("ci95") or [None, None]
                rows.append({**{c: None for c in COLUMNS}, "model": model, "accuracy": v.get("accuracy"),
                             "ci_lo": ci[0], "ci_hi": ci[1], "n": v.get("n"), "train_s": secs.get(model),
                             "source": "summary.json:accuracy"})
            elif isinstance(v, (int, float)):
                rows.append({**{c: None for c in COLUMNS}, "model": model, "accuracy": v,
                             "train_s": secs.get(model), "source": "summary.json:accuracy"})
    elif isinstance(summary.get("toy_accuracy"), (int, float)):
        rows.append({**{c: None for c in COLUMNS}, "model": "toy-base", "benchmark": "toy (greedy)",
                     "accuracy": summary["toy_accuracy"], "source": "summary.json:toy_accuracy"})
    return rows


def stage_times(d: Discovery) -> pd.DataFrame:
    """Wall time, GPU-hours and cost per stage (sub-runs' manifests, plus summary.json's ``seconds``)."""
    rows = [{"stage": r.name, "status": r.status, "wall_s": r.manifest.get("wall_seconds"),
             "gpu_hours": r.manifest.get("gpu_hours"), "cost_usd": r.manifest.get("estimated_cost_usd")}
            for r in d.runs]
    seen = {r["stage"] for r in rows}
    for k, v in ((d.summary or {}).get("seconds") or {}).items():
        if k not in seen and isinstance(v, (int, float)):
            rows.append({"stage": k, "status": "(summary)", "wall_s": v, "gpu_hours": None, "cost_usd": None})
    return pd.DataFrame(rows, columns=["stage", "status", "wall_s", "gpu_hours", "cost_usd"])
