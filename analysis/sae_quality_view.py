"""The SAE quality page's data: one table for every SAE a run dir evaluated, and their density histograms.

Rows come from ``saetune eval-sae`` run dirs (``results.json``: one entry per SAE, labelled) and from
``train-sae`` run dirs (``results.json``: one entry per SAE, labelled here ``run`` or ``run/name``), in a
single run dir or a pipeline's parent dir. Columns and their meanings are :mod:`saetune.sae_quality`'s.
Pure functions of what the run dirs hold; nothing here needs Streamlit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from saetune.sae_quality import column_meanings

from .html import esc
from .rundirs import Discovery, discover, read_json

QUALITY_STAGES = ("eval-sae", "train-sae")


def quality_rows(d: Discovery | str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Result rows of every eval-sae / train-sae run in ``d`` (each with ``label`` and ``run``), and sentences
    about runs whose results could not be read (half-written, from an older saetune without these metrics)."""
    d = d if isinstance(d, Discovery) else discover(d)
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for r in d.runs:
        if r.stage not in QUALITY_STAGES:
            continue
        res = read_json(r.path / "results.json")
        if not isinstance(res, dict):
            problems.append(f"{r.name}: no readable results.json yet ({r.status})")
            continue
        entries = {k: v for k, v in res.items() if isinstance(v, dict)}
        for name, v in entries.items():
            if r.stage == "eval-sae":
                label = str(v.get("label") or name)
                if d.kind == "pipeline":
                    label = f"{r.name}: {label}"
            else:
                label = r.name if len(entries) == 1 else f"{r.name}/{name}"
            rows.append({**v, "label": label, "run": r.name, "stage": r.stage})
        if r.stage == "train-sae" and entries and not any("frac_alive" in v for v in entries.values()):
            problems.append(f"{r.name}: its results.json predates the SAEBench metrics (no ce_loss_score, "
                            "kl_div_score, frac_alive); `saetune eval-sae --sae " + str(r.path) + "` measures them")
    return rows, problems


def meanings_markdown(df: pd.DataFrame) -> str:
    """What each column of ``df`` means, as a markdown list."""
    return "\n".join(f"- **{c}**: {m}" for c, m in column_meanings(df).items() if m)


def histogram_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that carry a density histogram."""
    return [r for r in rows if isinstance(r.get("density_histogram"), dict)
            and r["density_histogram"].get("counts")]


def density_figure(rows: Sequence[dict[str, Any]]):
    """log10 firing density of every SAE's latents, one outlined histogram per SAE (dead latents, which have no
    log, counted in the legend). Labels escaped: plotly renders some HTML."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for r in histogram_rows(rows):
        h = r["density_histogram"]
        e = np.asarray(h["edges"], dtype=float)
        c = np.asarray(h["counts"], dtype=float)
        total = c.sum() + h.get("dead", 0)
        x = np.repeat(e, 2)[1:-1]  # a step outline: several SAEs stay readable on one axis
        y = np.repeat(c, 2)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{esc(r['label'])} ({h.get('dead', 0)} of "
                                                              f"{int(total)} never fire)",
                                 hovertemplate="log10 density %{x:.2f}: %{y} latents<extra></extra>"))
    fig.update_layout(title="firing density of the latents over the evaluation tokens", height=320,
                      xaxis_title="log10 density (share of tokens a latent fires on)", yaxis_title="latents",
                      legend={"orientation": "h", "y": -0.25}, margin={"l": 40, "r": 10, "t": 40, "b": 40})
    return fig


def liveness_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Plain sentences on liveness per SAE: fired at least once over how many tokens, and a training-time dead
    window that could not trigger."""
    out = []
    for r in rows:
        parts = []
        if r.get("frac_alive") is not None:
            parts.append(f"{r['frac_alive']:.1%} of {r.get('d_sae', '?')} latents fire at least once over "
                         f"{r.get('n_tokens', 0):,} evaluation tokens")
        if r.get("frac_alive_train") is not None:
            parts.append(f"{r['frac_alive_train']:.1%} over {r.get('n_alive_train_tokens', 0):,} training tokens")
        if r.get("dead_window_could_trigger") is False:
            parts.append(f"the training-time dead window ({r.get('dead_tokens', 0):,} tokens) was longer than the "
                         "run, so its dead fraction could not count anything")
        if parts:
            out.append(f"{r['label']}: " + "; ".join(parts) + ".")
    return out


CONCEPTS_FILE = "concepts.csv"


def concept_frame(d: Discovery | str | Path) -> pd.DataFrame | None:
    """Which latents carry which toy concept: every eval-sae run's ``concepts.csv`` (one row per SAE × concept ×
    rank: ``sae``, ``concept``, ``rank``, ``latent``, ``mean_diff``, ``sae_acc``, ``k1_acc``, from
    :func:`saetune.probing.concept_latents`), concatenated, or None when no run in ``d`` probed."""
    d = d if isinstance(d, Discovery) else discover(d)
    frames = []
    for r in d.runs:
        path = r.path / CONCEPTS_FILE
        if r.stage != "eval-sae" or not path.is_file():
            continue
        try:
            df = pd.read_csv(path)
        except (OSError, ValueError, pd.errors.ParserError):
            continue  # half-written or foreign: the quality table above still shows the scalars
        if d.kind == "pipeline" and "sae" in df:
            df["sae"] = r.name + ": " + df["sae"].astype(str)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else None
