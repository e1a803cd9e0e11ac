"""Plotly figures for the analysis API and the explorer (pure functions of data).

Text from models or datasets that ends up in a figure (token strings in axes and hover text)
is HTML-escaped: plotly renders a subset of HTML in labels.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .html import esc

#: metrics.jsonl keys that are bookkeeping, not curves
NOT_CURVES = {"step", "tokens", "time", "wall", "epoch"}


def activation_histogram(edges: Sequence[float], counts: Sequence[int], title: str = "activation histogram"):
    """Bars of a feature's non-zero activation counts over bin ``edges`` [B+1]."""
    import plotly.graph_objects as go

    e = np.asarray(edges, dtype=float)
    c = np.asarray(counts)
    fig = go.Figure(go.Bar(x=(e[:-1] + e[1:]) / 2, y=c, width=np.diff(e) if len(e) > 1 else None,
                           marker_color="rgb(255,140,0)", hovertemplate="act %{x:.3g}: %{y}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="activation", yaxis_title="tokens", bargap=0.02, height=260,
                      margin={"l": 40, "r": 10, "t": 40, "b": 40})
    return fig


def density_histogram(table: pd.DataFrame, bins: int = 40):
    """Histogram of log10 firing density over all features (dead features counted in the title)."""
    import plotly.graph_objects as go

    ld = table["log10_density"].replace(-np.inf, np.nan).dropna()
    dead = int((table["density"] <= 0).sum())
    fig = go.Figure(go.Histogram(x=ld, nbinsx=bins, marker_color="rgb(30,120,230)"))
    fig.update_layout(title=f"feature density (log10; {dead} of {len(table)} never fire)", height=260,
                      xaxis_title="log10 density", yaxis_title="features", margin={"l": 40, "r": 10, "t": 40, "b": 40})
    return fig


def logit_effects_figure(df: pd.DataFrame, title: str = "direct logit effects"):
    """Horizontal bars of the top ± logit effects (``FeatureData.logits`` table)."""
    import plotly.graph_objects as go

    d = df.sort_values("effect")
    labels = [f"{esc(repr(t))} ({s})" for t, s in zip(d["token"], d["sign"])]
    fig = go.Figure(go.Bar(x=d["effect"], y=labels, orientation="h",
                           marker_color=["rgb(30,120,230)" if v > 0 else "rgb(220,40,60)" for v in d["effect"]]))
    fig.update_layout(title=title, height=max(240, 22 * len(d) + 60), margin={"l": 10, "r": 10, "t": 40, "b": 30},
                      xaxis_title="logit effect")
    return fig


def metric_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Numeric keys of metrics rows that are worth a curve (in first-seen order)."""
    keys: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.setdefault(k, None)
    return list(keys)


def metrics_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """metrics.jsonl rows as a DataFrame sorted by step (later rows win on repeated steps)."""
    df = pd.DataFrame(list(rows))
    if df.empty or "step" not in df:
        return df
    return df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)


def _finite(values) -> pd.Series:
    """Numbers of a metrics column; strings, None and ±inf become NaN."""
    return pd.to_numeric(pd.Series(values), errors="coerce").replace([np.inf, -np.inf], np.nan)


def _yaxis_for(values: np.ndarray, log: bool) -> dict[str, Any]:
    """y-axis settings for one metric panel: log only when every value is > 0, exponent tick
    labels (``3e-4``, not ``300µ``), and an explicit range around a flat series — plotly pads an
    all-equal axis by ±1, which draws a constant lr of 3e-4 as a line at 0."""
    log = log and bool((values > 0).all())
    axis: dict[str, Any] = {"type": "log" if log else "linear", "exponentformat": "e", "showexponent": "all"}
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi)):
        if log:
            axis["range"] = [math.log10(lo) - 0.5, math.log10(hi) + 0.5]
        else:
            pad = 0.2 * abs(lo) if lo != 0 else 1.0
            axis["range"] = [lo - pad, hi + pad]
    return axis


# One colour per run, by the run's position in ``runs`` (plotly's default qualitative order).
_RUN_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def _empty_figure(title: str | None):
    """A short figure with only a title: nothing to draw, and the title says why."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(title=title, height=200)
    return fig


def _finite_series(frames: dict[str, pd.DataFrame], keys: Sequence[str],
                   x: str) -> dict[str, list[tuple[int, str, pd.DataFrame]]]:
    """Metric → ``(run index, run, finite points)`` for each run logging that metric against ``x``.

    Metrics (and runs) without a finite ``(x, y)`` point are absent.
    """
    series: dict[str, list[tuple[int, str, pd.DataFrame]]] = {}
    for k in keys:
        for n, (name, df) in enumerate(frames.items()):
            if k in df and x in df:
                d = pd.DataFrame({"x": _finite(df[x]), "y": _finite(df[k])}).dropna()
                if len(d):
                    series.setdefault(k, []).append((n, name, d))
    return series


def _draw_metric_panel(fig, k: str, runs: list[tuple[int, str, pd.DataFrame]], x: str, row: int, col: int,
                       log: bool, in_legend: set[str]) -> None:
    """Metric ``k``'s curves (one per run) in subplot ``(row, col)``; a run's first curve shows in the legend.

    ``in_legend`` is the runs already in the legend; updated in place.
    """
    import plotly.graph_objects as go

    for n, name, d in runs:
        colour = _RUN_COLOURS[n % len(_RUN_COLOURS)]
        fig.add_trace(go.Scatter(x=d["x"], y=d["y"], mode="lines" if len(d) > 1 else "markers",
                                 name=esc(name), legendgroup=esc(name), showlegend=name not in in_legend,
                                 line={"color": colour}, marker={"color": colour, "size": 8},
                                 hovertemplate=esc(name) + f"<br>{esc(x)} %{{x}}<br>{esc(k)} %{{y:.4g}}"
                                               "<extra></extra>"), row=row, col=col)
        in_legend.add(name)
    values = np.concatenate([d["y"].to_numpy(dtype=float) for _, _, d in runs])
    fig.update_yaxes(row=row, col=col, **_yaxis_for(values, log))
    fig.update_xaxes(title_text=x, row=row, col=col)


def training_curves(runs: dict[str, Sequence[dict[str, Any]]], keys: Sequence[str] | None = None,
                    x: str = "step", log_y: Sequence[str] = ("loss", "fvu", "mse", "kl")):
    """One subplot per metric, each on its own y axis; one curve per run (``{run name: metrics rows}``).

    Every run gets a legend entry at its first curve, whichever panel that is (the legend group
    toggles all of its curves). A series of one point is drawn as a marker (a one-point line draws
    nothing: the activation cache logs ``capture_seconds`` once). Metrics without a finite value
    against ``x`` are left out and named in the title.
    """
    from plotly.subplots import make_subplots

    frames = {name: metrics_frame(rows) for name, rows in runs.items()}
    if keys is None:
        keys = metric_keys([r for rows in runs.values() for r in rows])
    keys = list(keys)
    if not keys:
        return _empty_figure("no metrics logged yet")
    series = _finite_series(frames, keys, x)
    drawn = [k for k in keys if k in series]
    left_out = [k for k in keys if k not in series]
    note = esc(f"not drawn, no finite value against {x}: {', '.join(left_out)}") if left_out else None
    if not drawn:
        return _empty_figure(note)
    cols = 2 if len(drawn) > 1 else 1
    nrows = math.ceil(len(drawn) / cols)
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=[esc(k) for k in drawn],
                        vertical_spacing=0.12 / max(1, nrows / 3))
    in_legend: set[str] = set()
    for j, k in enumerate(drawn):
        _draw_metric_panel(fig, k, series[k], x, j // cols + 1, j % cols + 1, any(t in k for t in log_y), in_legend)
    fig.update_layout(height=260 * nrows + 40, margin={"l": 40, "r": 10, "t": 60 if note else 40, "b": 40},
                      title=note)
    return fig


def reasoning_counts_figure(counts: pd.DataFrame, gmm: dict[str, list[float]] | None = None,
                            threshold: float | None = None):
    """Reasoning features per layer (bars, each labelled with its count), with the mixture's
    density scaled to the counts. A layer counting 0 is also drawn as a marker on the axis: a bar
    of height 0 is invisible, and one SAE layer with no reasoning feature drew an empty chart."""
    import plotly.graph_objects as go

    from .reasoning_features import gmm_density

    fig = go.Figure(go.Bar(x=counts["layer"], y=counts["count"], name="reasoning features",
                           text=[str(int(n)) for n in counts["count"]], textposition="outside", cliponaxis=False,
                           hovertext=[esc(h) for h in counts["hook"]], marker_color="rgb(122,43,226)"))
    zero = counts[counts["count"] == 0]
    if len(zero):
        fig.add_trace(go.Scatter(x=zero["layer"], y=zero["count"], mode="markers", name="no reasoning feature",
                                 hovertext=[esc(h) for h in zero["hook"]], cliponaxis=False,
                                 marker={"symbol": "diamond-open", "size": 10, "color": "rgb(122,43,226)"}))
    top = float(counts["count"].max()) if len(counts) else 0.0
    if gmm is not None and len(counts):
        xs = np.linspace(counts["layer"].min() - 1, counts["layer"].max() + 1, 300)
        curve = gmm_density(gmm, xs) * counts["count"].sum()
        top = max(top, float(curve.max()))
        fig.add_trace(go.Scatter(x=xs, y=curve, mode="lines",
                                 name="3-component GMM" if len(gmm["means"]) == 3 else "GMM"))
        for m in gmm["means"]:
            fig.add_vline(x=m, line_dash="dot", annotation_text=f"{m:.1f}")
    t = "" if threshold is None else f" (threshold {threshold:g})"
    if len(counts):  # layers are integers: one tick per layer (up to ~20 ticks), room for the bar labels
        lo, hi = int(counts["layer"].min()), int(counts["layer"].max())
        fig.update_xaxes(tickmode="linear", tick0=0, dtick=max(1, math.ceil((hi - lo) / 20)),
                         range=[lo - 1, hi + 1])
        fig.update_yaxes(range=[0, max(1.0, top * 1.15)])
    fig.update_layout(title=esc("features firing on <think> and </think> only" + t), xaxis_title="layer",
                      yaxis_title="features", height=320, margin={"l": 40, "r": 10, "t": 40, "b": 40})
    return fig


def threshold_sweep_figure(sweep: pd.DataFrame):
    """Count of reasoning features against the threshold, one line per layer."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for (hook, layer), d in sweep.groupby(["hook", "layer"], sort=True):
        fig.add_trace(go.Scatter(x=d["threshold"], y=d["count"], mode="lines+markers", name=esc(f"L{layer} {hook}")))
    fig.update_yaxes(rangemode="tozero")  # all-zero counts: [0, 1], not plotly's [-1, 1]
    fig.update_layout(title="effect of the threshold", xaxis_title="threshold", yaxis_title="reasoning features",
                      height=280, margin={"l": 40, "r": 10, "t": 40, "b": 40})
    return fig


def comparison_figure(table: pd.DataFrame, metric: str = "accuracy"):
    """Bars of ``metric`` per model row of a comparison table, with CI whiskers when present."""
    import plotly.graph_objects as go

    d = table.dropna(subset=[metric]) if metric in table else table.iloc[0:0]
    err = None
    if {"ci_lo", "ci_hi"} <= set(d.columns) and d[["ci_lo", "ci_hi"]].notna().all().all() and len(d):
        err = {"type": "data", "symmetric": False, "array": d["ci_hi"] - d[metric], "arrayminus": d[metric] - d["ci_lo"]}
    labels = [esc(f"{m} · {b}") if "benchmark" in d else esc(m) for m, b in
              zip(d.get("model", d.index), d.get("benchmark", [""] * len(d)))]
    fig = go.Figure(go.Bar(x=labels, y=d[metric] if len(d) else [], error_y=err, marker_color="rgb(30,120,230)"))
    fig.update_layout(title=esc(metric), height=300, margin={"l": 40, "r": 10, "t": 40, "b": 80})
    return fig
