"""saetune.analysis: read run dirs into pandas DataFrames, plotly figures and safe HTML.

Two kinds of module. These read what a run dir holds (or arrays you pass) and run no model, so
the explorer (``saetune explore``) and a notebook show the same thing: ``rundirs`` (discovery,
manifests, configs), ``feature_data`` (lazy reader of the feature data), ``html`` (token
highlights, every string escaped), ``plots`` (figures), ``traces`` (entropy, CURE, RPR views of
``traces/*.jsonl``), ``compare`` (base / source / SAE-tuned / controls tables) and
``reasoning_features`` (think-token features per layer, Gaussian mixture: recounted from stored
records, except ``reasoning_feature_records``, which runs the model once to make them)::

    from saetune import analysis as sa
    d = sa.discover("runs/demo-…")                 # a run dir or a pipeline's parent dir
    fd = sa.FeatureData.open("runs/demo-…")        # feature data written by `saetune features`
    fd.table(); fd.examples(12); sa.activation_histogram(*fd.histogram(12))

These run a model: ``feature_build`` (``saetune features``: loads the model and SAE and runs them
over a dataset to write the feature data ``feature_data`` reads) and ``live`` (the explorer's views
on demand — a prompt's features and entropy, a steered continuation — on a model the caller
loaded). Names load on first use.
"""

from __future__ import annotations

if __name__ != "saetune.analysis":  # found as a top-level `analysis` from a checkout root: see saetune/_checkout.py
    from saetune._checkout import hand_over

    hand_over(__name__, __file__)
else:
    from saetune._lazy import lazy_exports

    _LAZY = {
        **{n: "saetune.analysis.rundirs" for n in (
            "Discovery", "RunInfo", "discover", "run_info", "runs_table", "configs_side_by_side", "read_json",
            "read_jsonl", "read_config", "mtime_key", "resolve_recorded_path", "find_saes", "recorded_model")},
        **{n: "saetune.analysis.feature_build" for n in ("FeaturesConfig", "features", "build_hook_features")},
        **{n: "saetune.analysis.feature_data" for n in ("FeatureData", "feature_dirs")},
        **{n: "saetune.analysis.html" for n in ("esc", "token_highlight_html", "span_highlight_html", "legend_html")},
        **{n: "saetune.analysis.plots" for n in (
            "activation_histogram", "density_histogram", "logit_effects_figure", "training_curves", "metrics_frame",
            "metric_keys", "reasoning_counts_figure", "threshold_sweep_figure", "comparison_figure")},
        **{n: "saetune.analysis.traces" for n in (
            "TraceFile", "trace_files", "traces_table", "trace_html", "entropy_heatmap", "entropy_line",
            "critical_markers", "rpr_table", "rpr_token_hits", "reward_parts", "trace_tokens")},
        **{n: "saetune.analysis.reasoning_features" for n in (
            "reasoning_feature_records", "reasoning_feature_rows", "reasoning_counts", "reasoning_feature_table",
            "threshold_sweep", "fit_gmm_1d", "layer_gmm", "gmm_density", "is_reasoning", "passing_bands",
            "bands_sentence")},
        **{n: "saetune.analysis.compare" for n in ("comparison_table", "stage_times")},
        **{n: "saetune.analysis.live" for n in ("prompt_activations", "top_features_of_prompt", "response_feature_acts")},
    }

    __all__ = sorted(_LAZY)

    __getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)
