"""Features: search SAE features by id, token or text; one feature's card (sae-viewer style)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from saetune.analysis import feature_dirs, html as sxh, plots
from saetune.app import _common as ui

d = ui.header("Features", "density, activations, contexts, logit effects, neighbours")
if d is not None:
    dirs = {}
    for r in d.runs:
        for hook, p in feature_dirs(r.path).items():
            dirs[f"{r.name} · {hook}" if d.kind == "pipeline" else hook] = p
    if not dirs:
        sae_runs = [r.name for r in d.runs if (r.path / "sae").is_dir()]
        st.info("No feature data in this run dir yet. Build it with "
                f"`saetune features --sae {d.root / (sae_runs[0] if sae_runs else 'SAE_RUN')} "
                f"--out {d.root / 'features'}` (seconds for the demo SAE)."
                if d.kind == "pipeline" or sae_runs else
                "No feature data here: point the explorer at a run made by `saetune features`.")
    else:
        with ui.guard("the feature data"):
            label = st.sidebar.selectbox("SAE (hook)", list(dirs), key="hook")
            fd = ui.feature_data(dirs[label])
            table = fd.table()
            meta = fd.meta
            st.caption(f"{meta['d_sae']} features · {meta['n_included_tokens']:,} of {meta['n_tokens']:,} tokens "
                       f"counted (special tokens and each chunk's first position left out) · "
                       f"{meta['dead_features']} never fire")

            mode = st.sidebar.radio("search by", ["id", "token", "text"], horizontal=True, key="mode")
            if mode == "id":
                default = int(table.sort_values("density", ascending=False)["feature"].iloc[0])
                feature = int(st.sidebar.number_input("feature id", 0, fd.d_sae - 1, default, key="fid"))
                hits = [feature]
            else:
                q = st.sidebar.text_input("token" if mode == "token" else "text", key="query",
                                          placeholder="e.g. wait" if mode == "text" else "e.g. =",
                                          help="token: features whose top contexts peak on exactly this token; "
                                               "text: features whose peak tokens or top logit tokens contain it")
                hits = (fd.search_token(q) if mode == "token" else fd.search_text(q)) if q else []
                if q and not hits:
                    st.sidebar.warning("no feature matches")
                feature = int(st.sidebar.selectbox(f"{len(hits)} matching features", hits, key="hit")) if hits else None

            tab_card, tab_all = st.tabs(["feature card", "all features"])
            with tab_card:
                if feature is None:
                    st.info("Search for a feature in the sidebar.")
                else:
                    s = fd.summary(feature)
                    st.subheader(f"feature {feature}")
                    c = st.columns(4)
                    c[0].metric("density", f"{s['density']:.3%}")
                    c[1].metric("mean act (when firing)", f"{s['mean_act']:.3g}")
                    c[2].metric("max act", f"{s['max_act']:.3g}")
                    c[3].metric("firing tokens", f"{s['count']:,}")
                    if s["count"] == 0:
                        st.warning("This feature never fired on the analysed tokens (dead here).")
                    left, right = st.columns([3, 2])
                    with left:
                        st.plotly_chart(plots.activation_histogram(*fd.histogram(feature)), key="hist")
                    with right:
                        st.plotly_chart(plots.logit_effects_figure(fd.logits(feature)), key="logits")
                    ex = fd.examples(feature)
                    st.markdown("**top-activating contexts** (peak token outlined; hover a token for its activation)")
                    vmax = max(s["max_act"], 1e-9)
                    excl = set(meta.get("excluded_token_ids", []))
                    # one HTML element per block of contexts: a browser draws one element far faster than forty
                    ui.html("".join(sxh.token_highlight_html(e["tokens"], e["acts"], vmax=vmax, peak=e["peak"],
                                                             excluded=[i for i, t in enumerate(e["ids"]) if t in excl],
                                                             style=j == 0)
                                    for j, e in enumerate(ex["top"])))
                    for g in reversed(ex["quantiles"]):
                        with st.expander(f"activations {g['lo']:.3g} … {g['hi']:.3g} ({g['n']:,} tokens)"):
                            ui.html("".join(sxh.token_highlight_html(e["tokens"], e["acts"], vmax=vmax, peak=e["peak"],
                                                                     style=j == 0)
                                            for j, e in enumerate(g["examples"])))
                    st.markdown("**nearest features** (decoder cosine; co-activation = Jaccard index of the "
                                "firing tokens)")
                    nb = fd.neighbours(feature)
                    st.dataframe(nb, hide_index=True)
                    ids = [int(x) for x in nb["decoder_cosine_feature"].dropna()] + \
                          [int(x) for x in nb["coactivation_feature"].dropna()]

                    def _jump():
                        st.session_state["mode"] = "id"
                        st.session_state["fid"] = int(st.session_state["jump"])

                    st.selectbox("open a neighbour", list(dict.fromkeys(ids)), index=None, key="jump",
                                 on_change=_jump, placeholder="feature id")
            with tab_all:
                st.plotly_chart(plots.density_histogram(table), key="density")
                min_d = st.slider("min log10 density", -6.0, 0.0, -6.0, 0.5, key="min_density")
                shown = table[table["log10_density"] >= min_d].sort_values("density", ascending=False)
                st.dataframe(shown, hide_index=True, height=320)
