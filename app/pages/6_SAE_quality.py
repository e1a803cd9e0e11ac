"""SAE quality: SAEBench's core metrics for every SAE in the run dir, side by side, and their firing densities."""

from __future__ import annotations

import streamlit as st

from saetune.analysis import sae_quality_view as qv
from saetune.app import _common as ui

d = ui.header("SAE quality", "SAEBench's core metrics, liveness and firing density")
if d is not None:
    with ui.guard("the SAE results"):
        rows, problems = qv.quality_rows(d)
        for p in problems:
            st.info(p)
        if not rows:
            st.info("No SAE results here yet: `saetune eval-sae --sae SAE_DIR [SAE_DIR …]` writes them (for any SAE "
                    "on any model), and every `saetune train-sae` run's results.json holds them too.")
        else:
            from saetune.sae_quality import SAEBENCH_SOURCE, quality_table
            table = quality_table(rows)
            st.dataframe(table, hide_index=True)
            with st.expander("what the columns mean"):
                st.markdown(qv.meanings_markdown(table))
                st.caption(f"Definitions as {SAEBENCH_SOURCE} computes them (KL(clean ‖ spliced), zero-ablation "
                           "baseline; pad/eos/bos positions left out).")
            for note in qv.liveness_notes(rows):
                st.text(note)  # labels are paths: shown as text, never as markdown
            if qv.histogram_rows(rows):
                labels = [r["label"] for r in qv.histogram_rows(rows)]
                chosen = st.multiselect("density histograms of", labels, default=labels[:4], key="density")
                st.plotly_chart(qv.density_figure([r for r in rows if r["label"] in chosen]), key="density_fig")
            concepts = qv.concept_frame(d)
            if concepts is not None and len(concepts):
                st.subheader("which latents carry which concept")
                st.caption("sparse probing on the toy task (saetune.probing): per concept, the latents with the "
                           "largest |mean difference| between its classes, and the held-out accuracy of a probe on "
                           "the top k of them (k1_acc: that latent alone)")
                saes = sorted(concepts["sae"].astype(str).unique())
                pick = st.selectbox("SAE", saes, key="concept_sae")
                st.dataframe(concepts[concepts["sae"].astype(str) == pick].drop(columns=["sae"]), hide_index=True)
