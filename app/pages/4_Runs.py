"""Runs: every stage's status, curves of every metric, configs side by side."""

from __future__ import annotations

import streamlit as st

from saetune.analysis import plots, rundirs
from saetune.app import _common as ui

d = ui.header("Runs", "status, metrics curves, configs")
if d is not None:
    with ui.guard("the runs"):
        st.dataframe(rundirs.runs_table(d), hide_index=True)
        names = [r.name for r in d.runs]
        with_metrics = [r.name for r in d.runs if ui.metrics(r.path)]
        chosen = st.multiselect("runs to plot", names, default=with_metrics[:4], key="runs")
        runs = {r.name: ui.metrics(r.path) for r in d.runs if r.name in chosen}
        keys = plots.metric_keys([row for rows in runs.values() for row in rows])
        if not keys:
            st.info("The chosen runs logged no metrics (metrics.jsonl) yet.")
        else:
            picked = st.multiselect("metrics", keys, default=keys[:6], key="metrics:" + ",".join(chosen))
            x = st.radio("x axis", ["step", "tokens"], horizontal=True, key="x")
            st.plotly_chart(plots.training_curves(runs, picked, x=x), key="curves")
        st.subheader("configs side by side")
        cfg_runs = [r for r in d.runs if r.name in (chosen or names)]
        st.dataframe(rundirs.configs_side_by_side(cfg_runs))
        with st.expander("manifests"):
            for r in d.runs:
                st.markdown(f"**{r.name}**")
                st.json(r.manifest or {"status": r.status}, expanded=False)
