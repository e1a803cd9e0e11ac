"""Traces: one sampled response at a time — entropy, CURE critical tokens, RPR phrases, rewards."""

from __future__ import annotations

import streamlit as st

from saetune.analysis import html as sxh, traces as tr
from saetune.app import _common as ui

d = ui.header("Traces", "tokens coloured by entropy, CURE candidates and the chosen branch point, RPR phrases")
if d is not None:
    files = {}
    for r in d.runs:
        for f in tr.trace_files(r.path):
            files[f"{r.name}/traces/{f.name}" if d.kind == "pipeline" else f"traces/{f.name}"] = f
    if not files:
        st.info("No traces in this run dir yet. RL runs write `traces/*.jsonl` (one sampled response per line: "
                "tokens, entropies, CURE critical tokens, RPR hits, reward parts); this page shows them once "
                "they exist.")
    else:
        with ui.guard("the traces"):
            name = st.sidebar.selectbox("trace file", list(files), key="file")
            tf = tr.TraceFile(files[name])
            if len(tf) == 0:
                st.warning(f"{name} holds no complete trace yet.")
            else:
                table = ui.traces_table(files[name])
                with st.expander(f"all {len(tf)} traces", expanded=False):
                    st.dataframe(table, hide_index=True, height=240)
                i = int(st.sidebar.number_input("trace", 0, len(tf) - 1, 0, key="trace"))
                rec = tf[i]
                if "_error" in rec:
                    st.error(rec["_error"])
                color = st.sidebar.radio("colour tokens by", ["entropy", "logprob", "feature"], key="color")
                show_rpr = st.sidebar.checkbox("RPR phrases", True, key="rpr")
                show_crit = st.sidebar.checkbox("CURE critical tokens", True, key="crit")
                acts = None
                if color == "feature":
                    feat = int(st.sidebar.number_input("SAE feature", 0, 10**7, 0, key="feat"))
                    live = ui.find_sae_and_model(d)
                    if live is None:
                        st.sidebar.warning("no SAE in this run dir to overlay")
                    elif not rec.get("token_ids"):
                        st.sidebar.warning("this trace has no token_ids to run through the model")
                    elif st.sidebar.button("overlay (loads the model)", key="overlay"):
                        from saetune.analysis.live import response_feature_acts
                        model_path, sae_path, hook, _ = live
                        with st.spinner("loading the model and the SAE …"):
                            m, tok, sae = ui.model_and_sae(model_path, sae_path)
                        if feat >= sae.cfg.d_sae:
                            st.sidebar.error(f"the SAE has features 0…{sae.cfg.d_sae - 1}")
                        else:
                            prompt_ids = rec.get("prompt_ids") or tok(str(rec.get("prompt", "")),
                                                                      add_special_tokens=False)["input_ids"]
                            st.session_state["overlay_acts"] = (name, i, feat, response_feature_acts(
                                m, sae, hook, prompt_ids, rec["token_ids"], feat))
                    kept = st.session_state.get("overlay_acts")
                    if kept is not None and kept[:3] == (name, i, feat):
                        acts = kept[3]
                c = st.columns(4)
                parts = tr.reward_parts(rec)
                c[0].metric("reward", f"{parts.get('reward', float('nan')):.3g}" if parts else "—")
                c[1].metric("correct", str(rec.get("correct", "—")))
                c[2].metric("tokens", len(tr.trace_tokens(rec)))
                c[3].metric("critical position", str(rec.get("critical_position", "—")))
                details = {k: rec[k] for k in ("step", "group", "is_branch", "advantage", "answer", "truncated",
                                                "tool_calls") if k in rec}
                if details:
                    st.text(" · ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"  # text: no markdown
                                       for k, v in details.items()))
                st.markdown("**prompt**")
                ui.html(sxh.token_highlight_html([str(rec.get("prompt", ""))], None))
                st.markdown("**response**")
                ui.html(sxh.legend_html([("sx-cand", "CURE candidate"), ("sx-crit", "chosen critical token"),
                                         ("sx-rpr", "RPR phrase")]))
                ui.html(tr.trace_html(rec, color_by=color if acts is not None or color != "feature" else "entropy",
                                      feature_acts=acts, show_rpr=show_rpr, show_critical=show_crit))
                if rec.get("entropies"):
                    st.plotly_chart(tr.entropy_heatmap(rec), key="heat")
                left, right = st.columns(2)
                with left:
                    st.markdown("**CURE candidates**")
                    st.dataframe(tr.critical_markers(rec), hide_index=True)
                with right:
                    st.markdown("**RPR phrases**")
                    st.dataframe(tr.rpr_table(rec), hide_index=True)
                if parts:
                    st.markdown("**reward parts**")
                    st.dataframe([{"part": k, "value": v} for k, v in parts.items()], hide_index=True)
