"""Reasoning features: features firing on <think> and </think> and no other prompt token, per layer."""

from __future__ import annotations

import numpy as np
import streamlit as st

from saetune.analysis import plots, reasoning_features as rf
from saetune.app import _common as ui
from saetune.errors import SaetuneError

d = ui.header("Reasoning features", "Resa §5: per-layer counts and the 3-component Gaussian mixture over layers")
if d is not None:
    sources = {}
    for r in d.runs:
        f = r.path / "features" / "reasoning.json"
        if f.exists():
            sources[r.name] = f
    records = None
    if sources:
        name = st.sidebar.selectbox("computed in", list(sources), key="source")
        records = ui.read_json(sources[name])
        if not isinstance(records, dict) or "hooks" not in records:
            st.error(f"{sources[name]} is not readable yet (a stage may still be writing it).")
            records = None
        elif records.get("error"):
            st.warning("The features stage could not count reasoning features: "
                       f"`{str(records['error']).replace('`', chr(39))}`")
            records = None
    else:
        st.info("No `features/reasoning.json` in this run dir (`saetune features` writes it for every SAE it "
                "describes). You can compute it here from the run's SAE and model.")
        live = ui.find_sae_and_model(d)
        if live is not None and st.button("compute now (loads the model)", key="compute"):
            with ui.guard("the reasoning-feature analysis"), st.spinner("running the prompt through the model …"):
                m, tok, _ = ui.model_and_sae(live[0], live[1])
                st.session_state["reasoning_records"] = rf.reasoning_feature_records(m, tok, ui.all_saes(live[3]))
        records = st.session_state.get("reasoning_records")

    if records is not None:
        with ui.guard("the reasoning-feature records"):
            feats = [x for h in records["hooks"].values() for x in h["features"]]
            top = float(max([min(x[1], x[2]) for x in feats], default=1.0))
            thr = st.sidebar.slider("threshold τ", 0.0, max(top, 0.01), float(records.get("threshold", 0.0)),
                                    max(top, 0.01) / 100, key="threshold",
                                    help="a reasoning feature exceeds τ on both tags and nowhere else in the prompt")
            counts = rf.reasoning_counts(records, thr)
            gmm, why = None, ""
            try:
                gmm = rf.layer_gmm(counts)
            except SaetuneError as e:
                why = str(e)
            st.plotly_chart(plots.reasoning_counts_figure(counts, gmm, thr), key="counts")
            st.markdown(rf.bands_sentence(records, thr))
            if gmm is not None:
                st.markdown("**Gaussian mixture over layers** (Resa reports means ≈ 4.9 / 14.5 / 22.7 for its model)")
                st.dataframe({"mean layer": np.round(gmm["means"], 2), "std": np.round(gmm["stds"], 2),
                              "weight": np.round(gmm["weights"], 3)}, hide_index=False)
            else:
                st.info(f"No mixture: {why}. Describe SAEs at more layers (`saetune features --sae DIR` with one "
                        "SAE per layer) to see the distribution over depth.")
            st.dataframe(counts, hide_index=True)
            st.plotly_chart(plots.threshold_sweep_figure(rf.threshold_sweep(records, np.linspace(0, top, 21))),
                            key="sweep")
            hooks = list(records["hooks"])
            hook = st.selectbox("features at", hooks, key="hook") if hooks else None
            if hook:
                st.markdown(f"positive on both tags at `{hook}` (a row is a reasoning feature when `reasoning` is true)")
                st.dataframe(rf.reasoning_feature_table(records, hook, thr), hide_index=True)
            with st.expander("the prompt"):
                st.text(records.get("prompt", ""))
                st.text(f"<think> at token positions {records.get('open_positions')}, </think> at "
                        f"{records.get('close_positions')}")
