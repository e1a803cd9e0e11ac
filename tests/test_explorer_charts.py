"""The explorer's charts as plotly figure objects: what a browser would draw wrong is asserted
on the figure JSON (legend entries, axis ranges and ticks, colour-bar and legend placement).

Where a setting is left unset, the helpers below resolve it the way plotly.js 3 does: a
horizontal legend sits at y = −0.1 (below the plot, over the x tick labels), a vertical colour
bar at x = 1.02, y = 0.5 with len 1, and an axis whose values are all equal is padded by ±1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from explorer_fixtures import trace_records
from saetune.analysis import plots, reasoning_features as rf, traces as tr


def _panels(fig) -> dict[str, str]:
    """y-axis id ('y', 'y2', …) → the metric its subplot shows (subplot titles are in panel order)."""
    return {("y" if j == 0 else f"y{j + 1}"): a.text for j, a in enumerate(fig.layout.annotations)}


def _axis(fig, yid: str):
    return fig.layout["yaxis" if yid == "y" else "yaxis" + yid[1:]]


def _shown_range(axis, values) -> tuple[float, float]:
    """The y range a browser shows on a linear axis: the explicit range, else plotly.js's autorange
    (all-equal values padded by ±1)."""
    if axis.range is not None:
        return tuple(axis.range)
    lo, hi = float(np.min(values)), float(np.max(values))
    return (lo - 1, hi + 1) if lo == hi else (lo, hi)


def _integer_ticks(axis) -> bool:
    """Ticks only at integers: a linear tick mode from an integer start with an integer step ≥ 1,
    or explicit integer tick values."""
    if axis.tickmode == "array":
        return axis.tickvals is not None and all(float(v).is_integer() for v in axis.tickvals)
    return (axis.tickmode == "linear" and axis.dtick is not None and float(axis.dtick).is_integer()
            and axis.dtick >= 1 and float(axis.tick0 or 0).is_integer())


# ---- Runs page: training curves ------------------------------------------------------------

@pytest.fixture
def pipeline_runs():
    """Three stages as a pipeline logs them: the cache once, the SAE and the tune every few steps."""
    return {
        "cache": [{"step": 4, "tokens": 4096, "capture_seconds": 12.5}],
        "sae": [{"step": s, "tokens": 1024 * s, "fvu": 0.5 / s, "l0": 8.0 + s} for s in range(1, 6)],
        "tune": [{"step": s, "tokens": 512 * s, "loss": 3.0 / s, "lr": 3e-4, "kl": 0.1 * (s - 1),
                  "grad_norm": float("nan")} for s in range(1, 6)],
    }


def test_every_curve_is_labelled_by_its_own_run(pipeline_runs):
    fig = plots.training_curves(pipeline_runs)
    legend = [t.name for t in fig.data if t.showlegend is not False]
    assert sorted(legend) == ["cache", "sae", "tune"]  # each run once, not only the first panel's run
    panels = _panels(fig)
    for t in fig.data:
        metric = panels[t.yaxis]
        logged = [r[metric] for r in pipeline_runs[t.name] if metric in r]
        assert logged and list(t.y) == pytest.approx(logged), (t.name, metric)
        assert t.legendgroup == t.name


def test_a_metric_logged_once_is_drawn_and_an_empty_one_left_out_with_a_note(pipeline_runs):
    fig = plots.training_curves(pipeline_runs)
    cache = [t for t in fig.data if t.name == "cache"]
    assert len(cache) == 1 and list(cache[0].y) == [12.5]
    assert "markers" in cache[0].mode  # a one-point line draws nothing
    assert all(len(t.y) > 0 for t in fig.data)
    assert "grad_norm" not in _panels(fig).values()
    assert "grad_norm" in fig.layout.title.text


def test_each_metric_has_its_own_readable_y_axis(pipeline_runs):
    fig = plots.training_curves(pipeline_runs)
    panels = _panels(fig)
    by_metric = {m: y for y, m in panels.items()}
    lr_axis = _axis(fig, by_metric["lr"])
    lo, hi = _shown_range(lr_axis, [3e-4])
    assert lo <= 3e-4 <= hi and hi - lo < 10 * 3e-4  # not plotly's ±1 padding, where 3e-4 sits at "0"
    assert lr_axis.exponentformat == "e"
    assert sorted(panels.values()) == ["capture_seconds", "fvu", "kl", "l0", "loss", "lr"]
    assert all(_axis(fig, y).matches is None for y in panels)  # one y axis each, none shared
    assert _axis(fig, by_metric["loss"]).type == "log"
    fig_kl = plots.training_curves(pipeline_runs, ["kl"])
    assert fig_kl.layout.yaxis.type == "linear"  # kl logged 0 at step 1: a log axis would drop it


def test_no_finite_metric_says_so():
    fig = plots.training_curves({"tune": [{"step": 1, "tokens": 1, "grad_norm": float("inf")}]})
    assert not fig.data and "grad_norm" in fig.layout.title.text


# ---- Traces page: entropy heatmap ----------------------------------------------------------

@pytest.mark.parametrize("n_tokens", [22, 100])
def test_entropy_heatmap_colourbar_legend_and_row_ticks(n_tokens):
    rec = dict(trace_records()[0])
    rec["entropies"] = [0.1 * (i % 7) for i in range(n_tokens)]
    fig = tr.entropy_heatmap(rec)
    heat = fig.data[0]
    assert heat.type == "heatmap" and {t.name for t in fig.data[1:]} == {"CURE candidates", "critical token"}
    rows = heat.z.shape[0]
    assert rows == math.ceil(n_tokens / 32)

    x_end = (fig.layout.xaxis.domain or (0, 1))[1]
    y0, y1 = fig.layout.yaxis.domain or (0, 1)
    cb = heat.colorbar
    assert (cb.orientation or "v") == "v" and (cb.lenmode or "fraction") == "fraction"
    cx, anchor = (1.02 if cb.x is None else cb.x), cb.xanchor or "left"
    assert cx >= x_end and anchor == "left"  # right of the plot area
    cy, length = (0.5 if cb.y is None else cb.y), (1.0 if cb.len is None else cb.len)
    bottom = {"middle": cy - length / 2, "bottom": cy, "top": cy - length}[cb.yanchor or "middle"]
    assert y0 - 1e-9 <= bottom and bottom + length <= y1 + 1e-9  # within the rows' height, not below the x axis

    lg = fig.layout.legend
    ly = (-0.1 if lg.orientation == "h" else 1.0) if lg.y is None else lg.y
    lx = (0.0 if lg.orientation == "h" else 1.02) if lg.x is None else lg.x
    assert ly >= y1 or lx >= x_end  # above or beside the plot, never over the x tick labels
    if lg.orientation == "h":
        assert ly >= y1 and lg.yanchor == "bottom"

    assert _integer_ticks(fig.layout.yaxis) and _integer_ticks(fig.layout.xaxis)
    assert fig.layout.yaxis.autorange == "reversed"


# ---- Reasoning features page ---------------------------------------------------------------

def _one_layer(features):
    return {"hooks": {"model.layers.2": {"layer": 2, "d_sae": 256, "features": features}}}


def test_one_layer_without_reasoning_features_is_drawn():
    counts = rf.reasoning_counts(_one_layer([[7, 0.5, 0.4, 0.9]]), 0.0)  # fires elsewhere too: count 0
    assert counts["count"].tolist() == [0]
    fig = plots.reasoning_counts_figure(counts, None, 0.0)
    visible = [t for t in fig.data if t.type == "scatter" and "markers" in (t.mode or "")]
    assert any(list(t.x) == [2] and list(t.y) == [0] for t in visible)  # a height-0 bar alone is invisible
    assert list(fig.data[0].text) == ["0"]
    lo, hi = fig.layout.yaxis.range
    assert lo == 0 and hi >= 1  # plotly's all-zero autorange is [-1, 1]
    assert _integer_ticks(fig.layout.xaxis)  # not 1.6, 1.8, 2, 2.2, 2.4
    xlo, xhi = fig.layout.xaxis.range
    assert xlo < 2 < xhi


def test_one_layer_bar_is_drawn_with_its_count():
    counts = rf.reasoning_counts(_one_layer([[3, 1.0, 2.0, 0.0], [4, 1.0, 2.0, 0.0]]), 0.0)
    fig = plots.reasoning_counts_figure(counts, None, 0.0)
    bar = fig.data[0]
    assert bar.type == "bar" and list(bar.x) == [2] and list(bar.y) == [2] and list(bar.text) == ["2"]
    assert len(fig.data) == 1  # no zero-count markers
    xlo, xhi = fig.layout.xaxis.range
    assert xhi - xlo >= 2  # a lone bar does not fill the plot's width
    assert fig.layout.yaxis.range[1] > 2  # room for the label above the bar
    assert _integer_ticks(fig.layout.xaxis)


def test_threshold_sweep_of_zero_counts_starts_at_zero():
    sweep = rf.threshold_sweep(_one_layer([[7, 0.5, 0.4, 0.9]]), np.linspace(0, 1, 5))
    fig = plots.threshold_sweep_figure(sweep)
    assert len(fig.data) == 1 and list(fig.data[0].y) == [0] * 5 and "markers" in fig.data[0].mode
    assert fig.layout.yaxis.rangemode == "tozero"
