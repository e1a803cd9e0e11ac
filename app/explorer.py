"""saetune explorer, home page: what the run dir holds, and a "try a prompt" box.

Started by ``saetune explore RUN_DIR`` (Streamlit, headless, no usage statistics); every page
reads the run dir from ``SAETUNE_RUN_DIR``. The pages are in ``app/pages/``.
"""

from __future__ import annotations

import streamlit as st

from saetune.analysis import html as sxh, rundirs
from saetune.app import _common as ui

d = ui.header("saetune explorer", "pages: Features · Traces · Reasoning features · Runs · Compare (sidebar)")
if d is not None:
    with ui.guard("the run dir"):
        st.dataframe(rundirs.runs_table(d)[["run", "stage", "status", "wall_s", "cost_usd"]], hide_index=True)
        have = {
            "feature data (Features page)": any((r.path / "features").is_dir() for r in d.runs),
            "traces (Traces page)": any((r.path / "traces").is_dir() for r in d.runs),
            "reasoning features": any((r.path / "features" / "reasoning.json").exists() for r in d.runs),
            "evaluation results (Compare page)": any(True for _ in d.root.rglob("eval/results.json")) or
            (d.root / "eval" / "results.json").exists(),
        }
        st.markdown("\n".join(f"- {'✅' if ok else '—'} {what}" for what, ok in have.items()))

    st.subheader("try a prompt")
    live = ui.find_sae_and_model(d)
    if live is None:
        st.info("No SAE in this run dir, so there is nothing to run a prompt through.")
    else:
        model_path, sae_path, hook, _ = live
        st.caption(f"runs the model at `{model_path}` with the SAE at `{hook}`; both load on first use")
        text = st.text_area("prompt", "User : compute ( 3 + 4 ) * 2 . Assistant : <think>", key="prompt")
        if st.button("run", key="run_prompt"):
            from saetune.analysis.live import prompt_activations
            with ui.guard("the prompt"), st.spinner("loading the model and the SAE …"):
                m, tok, sae = ui.model_and_sae(model_path, sae_path)
                st.session_state["prompt_result"] = prompt_activations(m, tok, sae, hook, text)
        res = st.session_state.get("prompt_result")
        if res is not None:
            from saetune.analysis.live import top_features_of_prompt
            top = top_features_of_prompt(res["acts"])
            st.markdown("**next-token entropy**")
            ui.html(sxh.token_highlight_html(res["tokens"], res["entropy"], kind="entropy", value_name="entropy"))
            if len(top):
                f = int(st.selectbox("highlight feature", top["feature"].tolist(), key="prompt_feature"))
                ui.html(sxh.token_highlight_html(res["tokens"], res["acts"][:, f], value_name=f"feature {f}"))
            st.dataframe(top, hide_index=True)
            st.dataframe(res["table"], hide_index=True)

        with st.expander("continue it, steering latents at every generated token"):
            st.caption("clamp sets a latent to a value (0 ablates it), add puts α·W_dec[f] in; the schedule says "
                       "where: always, think (inside <think>…</think>), from:N, tokens:N[@S], joined with +")
            clamps = st.text_input("clamp FEATURE=VALUE, comma-separated", "", key="steer_clamp")
            adds = st.text_input("add FEATURE=ALPHA, comma-separated", "", key="steer_add")
            where = st.text_input("schedule", "always", key="steer_schedule")
            if st.button("generate", key="steer_run"):
                from saetune.analysis.live import steered_continuation
                from saetune.steering import Schedule, edits_from_items
                with ui.guard("the steered generation"), st.spinner("generating …"):
                    m, tok, sae = ui.model_and_sae(model_path, sae_path)
                    items = lambda s: [x for x in s.split(",") if x.strip()]  # noqa: E731
                    edits = edits_from_items(items(clamps), items(adds))
                    st.session_state["steer_result"] = steered_continuation(
                        m, tok, sae, hook, text, edits=edits, schedule=Schedule.parse(where), max_new_tokens=32)
            steered = st.session_state.get("steer_result")
            if steered is not None:
                st.code(steered["response"], language=None)
                st.dataframe(steered["table"], hide_index=True)
