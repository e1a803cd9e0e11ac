"""Compare: base / source / SAE-tuned / controls, accuracy with its interval, time and cost."""

from __future__ import annotations

import streamlit as st

from saetune.analysis import compare, plots
from saetune.app import _common as ui

d = ui.header("Compare", "what SAE-Tuning changed, and what it cost")
if d is not None:
    with ui.guard("the evaluation results"):
        table = compare.comparison_table(d)
        if table.empty:
            st.info("No evaluation results in this run dir yet: eval stages write `eval/results.json`, and a "
                    "pipeline's `summary.json` may hold its table. This page fills in as they appear.")
        else:
            benches = sorted(b for b in table["benchmark"].dropna().unique())
            pick = st.multiselect("benchmarks", benches, default=benches, key="benchmarks") if benches else []
            shown = table[table["benchmark"].isin(pick) | table["benchmark"].isna()] if pick else table
            st.dataframe(shown.drop(columns=["source"]), hide_index=True)
            st.plotly_chart(plots.comparison_figure(shown), key="acc")
            st.caption("accuracy = pass@1 (mean over samples); ci = 95% bootstrap interval over problems; "
                       "cost from each stage's manifest (GPU-hours × $/GPU-hour).")
        st.subheader("time and cost per stage")
        st.dataframe(compare.stage_times(d), hide_index=True)
