"""Pure rendering and analysis functions of saetune.analysis (no model, no browser)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from saetune import analysis as sa
from saetune.analysis import compare, html as sxh, plots, reasoning_features as rf, rundirs, traces as tr
from saetune.errors import SaetuneError

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.update(a for a, _ in attrs)


def _no_live_markup(s: str) -> None:
    """Parsed as a browser would: only our own tags and attributes, whatever the text held."""
    p = _Tags()
    p.feed(s)
    assert set(p.tags) <= {"style", "div", "span", "mark"}, p.tags
    assert p.attrs <= {"class", "style", "title"}, p.attrs


# ---- HTML ----------------------------------------------------------------------------------

def test_token_highlight_escapes_every_string():
    toks = [XSS, '" onmouseover="alert(2)', "plain", "a\nb"]
    out = sxh.token_highlight_html(toks, [1.0, 0.5, 0.0, 2.0], peak=0, candidates=[1], critical=1,
                                   rpr={0: [XSS]}, extra_titles={2: XSS})
    _no_live_markup(out)
    assert "&lt;script&gt;" in out and "&lt;img src=x onerror=alert(1)&gt;" in out
    # the attribute-breaking token stays inside its quoted title
    assert 'onmouseover="alert' not in out
    assert out.count("<span") == 4 and "↵" in out


def test_span_highlight_escapes_and_marks_overlaps():
    text = f"wait {XSS} let me check"
    spans = {"wait": [(0, 4)], "let me check": [(len(text) - 12, len(text))], XSS: [(5, 5 + len(XSS))]}
    out = sxh.span_highlight_html(text, spans)
    _no_live_markup(out)
    assert out.count('<mark class="sx-mark"') == 3
    plain = re.sub(r"<[^>]+>", "", out.split("</style>", 1)[1])
    import html
    assert html.unescape(plain) == text


def test_trace_html_escapes_a_hostile_trace():
    from explorer_fixtures import trace_records
    plain, bad, sparse = trace_records()
    for rec in (plain, bad, sparse):
        for color in ("entropy", "logprob", "feature"):
            out = tr.trace_html(rec, color_by=color, feature_acts=[1.0] * len(tr.trace_tokens(rec)))
            _no_live_markup(out)
    out = tr.trace_html(bad)
    assert "sx-crit" in out and "&lt;script&gt;" in out


def test_color_scale():
    assert sxh.color_for(0.0, 1.0) == "transparent"
    assert sxh.color_for(float("nan"), 1.0) == "transparent"
    assert sxh.color_for(2.0, 1.0).endswith("0.850)")
    assert sxh.color_for(0.5, 1.0, "entropy").startswith("rgba(220,40,60,")


def test_token_highlight_length_mismatch():
    with pytest.raises(ValueError, match="2 tokens but 1 values"):
        sxh.token_highlight_html(["a", "b"], [1.0])


# ---- traces --------------------------------------------------------------------------------

def test_trace_views():
    from explorer_fixtures import trace_records
    plain, bad, sparse = trace_records()
    t = tr.traces_table([plain, bad, sparse])
    assert list(t["trace"]) == [0, 1, 2] and t.loc[0, "critical_position"] == 11
    assert t.loc[2, "mean_entropy"] is None or np.isnan(t.loc[2, "mean_entropy"])
    cm = tr.critical_markers(plain)
    assert list(cm["position"]) == [11, 7, 15] and cm["chosen"].tolist() == [True, False, False]
    assert cm["token"].tolist() == [" check", " wait", " therefore"]
    hits = tr.rpr_token_hits(plain["tokens"], plain["response"], plain["rpr_hits"])
    wait_tok = plain["tokens"].index(" wait")
    assert "wait" in hits[wait_tok] and "let me check" in hits[plain["tokens"].index(" me")]
    assert tr.reward_parts(plain) == {"reward": 1.0, "correct": 1.0, "rpr": 0.1}
    assert tr.rpr_table(plain)["phrase"].tolist()[0] in plain["rpr_hits"]
    fig = tr.entropy_heatmap(bad, width=2)
    assert fig.data[0].z.shape == (2, 2)
    assert all("<script" not in str(t) for t in fig.data[0].text.ravel())
    assert tr.entropy_line(plain).data[1].x == (11, 7, 15)


def test_trace_tokens_put_spaces_back():
    rec = {"response": "<think> 3 + 4 = 7 . </think>", "tokens": ["<think>", "3", "+", "4", "=", "7", ".", "</think>"]}
    assert "".join(tr.trace_tokens(rec)) == rec["response"]
    bpe = {"response": "a bc d", "tokens": ["a", " b", "c", " d"]}
    assert tr.trace_tokens(bpe) == bpe["tokens"]


def test_token_offsets_fallback():
    assert tr.token_offsets(["ab", "c"], "abc") == [(0, 2), (2, 3)]
    assert tr.token_offsets(["ab", " c"], "ab  c") == [(0, 2), (4, 5)]


def test_trace_file_skips_cut_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"response": "a"}) + "\n\n" + json.dumps({"response": "b"}) + '\n{"response": "c')
    t = tr.TraceFile(f)
    assert len(t) == 2 and t[1]["response"] == "b"


# ---- plots ---------------------------------------------------------------------------------

def test_training_curves_and_metrics():
    rows = [{"step": 1, "tokens": 10, "loss": 2.0, "fvu": 0.5, "note": "x"}, {"step": 2, "tokens": 20, "loss": 1.0},
            {"step": 2, "tokens": 20, "loss": 0.9}]
    assert plots.metric_keys(rows) == ["loss", "fvu"]
    df = plots.metrics_frame(rows)
    assert df["loss"].tolist() == [2.0, 0.9]
    fig = plots.training_curves({"a": rows, XSS: rows})
    assert len(fig.data) == 4
    assert all("<script" not in (t.name or "") for t in fig.data)
    assert fig.layout.yaxis.type == "log"
    assert plots.training_curves({"a": []}).layout.title.text == "no metrics logged yet"


def test_histogram_and_logits_figures():
    fig = plots.activation_histogram(np.linspace(0, 4, 5), [1, 2, 3, 4])
    assert list(fig.data[0].y) == [1, 2, 3, 4] and list(fig.data[0].x) == [0.5, 1.5, 2.5, 3.5]
    df = pd.DataFrame({"sign": ["+", "−"], "token": [XSS, "b"], "effect": [1.0, -1.0]})
    fig = plots.logit_effects_figure(df)
    assert all("<script" not in y for y in fig.data[0].y)
    table = pd.DataFrame({"density": [0.0, 0.1, 0.01], "log10_density": [-np.inf, -1.0, -2.0]})
    assert "1 of 3 never fire" in plots.density_histogram(table).layout.title.text


# ---- reasoning features --------------------------------------------------------------------

def test_reasoning_rule_and_counts():
    # 5 tokens: 1 = <think>, 3 = </think>; feature 0 fires on both tags only; 1 also elsewhere;
    # 2 only on <think>; 3 on both tags and weakly elsewhere (passes above threshold 0.3)
    acts = np.zeros((5, 4))
    acts[[1, 3], 0] = 1.0
    acts[[1, 3, 4], 1] = 1.0
    acts[1, 2] = 1.0
    acts[[1, 3], 3] = 0.8
    acts[2, 3] = 0.2
    other = np.array([False, False, True, False, True])
    rows = rf.reasoning_feature_rows(acts, [1], [3], other)
    assert rows[:, 0].tolist() == [0, 1, 3]
    rec = {"hooks": {"model.layers.3": {"layer": 3, "d_sae": 4, "features": rows.tolist()}}}
    assert rf.reasoning_counts(rec, 0.0)["count"].tolist() == [1]
    assert rf.reasoning_counts(rec, 0.3)["count"].tolist() == [2]
    assert rf.reasoning_counts(rec, 0.9)["count"].tolist() == [1]
    assert rf.reasoning_counts(rec, 1.0)["count"].tolist() == [0]
    sweep = rf.threshold_sweep(rec, [0.0, 0.3])
    assert sweep["count"].tolist() == [1, 2]
    t = rf.reasoning_feature_table(rec, "model.layers.3", 0.3)
    assert set(t.loc[t["reasoning"], "feature"]) == {0, 3}
    with pytest.raises(SaetuneError, match="both <think> and </think>"):
        rf.reasoning_feature_rows(acts, [1], [], other)
    with pytest.raises(SaetuneError, match="threshold must be"):
        rf.reasoning_counts(rec, -1)


def test_tag_positions_split_and_whole():
    text = "a <think> b </think>"
    offs = [(0, 1), (2, 3), (3, 8), (8, 9), (10, 11), (12, 20)]  # "<", "think", ">" pieces
    assert rf.tag_positions(text, offs, "<think>") == [1, 2, 3]
    assert rf.tag_positions(text, offs, "</think>") == [5]


def test_gmm_recovers_three_modes():
    layers = np.arange(1, 27)
    counts = (40 * np.exp(-0.5 * ((layers - 4.9) / 1.5) ** 2) + 60 * np.exp(-0.5 * ((layers - 14.5) / 2) ** 2)
              + 30 * np.exp(-0.5 * ((layers - 22.7) / 1.5) ** 2)).round()
    df = pd.DataFrame({"hook": [f"model.layers.{i}" for i in layers], "layer": layers, "count": counts})
    g = rf.layer_gmm(df)
    assert np.allclose(g["means"], [4.9, 14.5, 22.7], atol=0.6)
    assert abs(sum(g["weights"]) - 1) < 1e-9
    assert rf.gmm_density(g, [14.5])[0] > rf.gmm_density(g, [9.5])[0]
    fig = plots.reasoning_counts_figure(df, g, 0.0)
    assert len(fig.data) == 2 and "&lt;think&gt;" in fig.layout.title.text
    with pytest.raises(SaetuneError, match="at least 3 distinct layers"):
        rf.layer_gmm(df.iloc[:2])


# ---- run dirs and comparison ---------------------------------------------------------------

def test_discover_missing_empty_and_half_written(tmp_path):
    assert rundirs.discover(None).kind == "missing"
    assert "does not exist" in rundirs.discover(tmp_path / "nope").message
    assert rundirs.discover(tmp_path).kind == "empty"
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "manifest.json").write_text('{"stage": "train-sae", "sta')  # cut mid-write
    (tmp_path / "summary.json").write_text("{")
    d = rundirs.discover(tmp_path)
    assert d.kind == "pipeline" and d.runs[0].status == "partial" and d.summary is None
    assert "not valid JSON" in d.runs[0].problems[0]
    assert rundirs.runs_table(d)["status"].tolist() == ["partial"]
    assert compare.comparison_table(d).empty


def test_comparison_table(tmp_path):
    from explorer_fixtures import _manifest
    root = tmp_path / "p"
    _manifest(root / "tune", "tune", 40.0, gpu_hours=0.5, estimated_cost_usd=0.5)
    for name, acc in (("base", 0.2), ("tune", 0.4)):
        e = root / "eval" / name
        _manifest(e, "eval", 2.0, estimated_cost_usd=0.1, gpu_hours=0.1)
        (e / "eval").mkdir()
        (e / "eval" / "results.json").write_text(json.dumps(
            {"aime24": {"n": 30, "samples_per_problem": 4, "pass@1": acc, "pass@k": {"1": acc, "4": acc + .1},
                        "ci95": [acc - .1, acc + .1]}, "broken": "x"}))
    (root / "summary.json").write_text(json.dumps({"table": [{"model": "control-sft", "accuracy": 0.3, "seconds": 5}]}))
    t = compare.comparison_table(root)
    assert t["model"].tolist() == ["base", "tune", "control-sft"]
    tune = t[t["model"] == "tune"].iloc[0]
    assert tune["accuracy"] == 0.4 and tune["train_s"] == 40.0 and tune["eval_s"] == 2.0
    assert tune["cost_usd"] == pytest.approx(0.6) and tune["pass@k"] == "1: 0.400, 4: 0.500"
    assert pd.isna(t[t["model"] == "base"].iloc[0]["train_s"])
    fig = plots.comparison_figure(t)
    assert len(fig.data[0].x) == 3
    d = rundirs.discover(root)
    assert [r.name for r in d.runs] == ["eval/base", "eval/tune", "tune"]  # eval/<label>/ sub-runs found
    st = compare.stage_times(d)
    assert "tune" in st["stage"].tolist()
    # summary.json's {model: {accuracy, ci95, n}} fills in models without a results.json
    (root / "summary.json").write_text(json.dumps({"accuracy": {
        "tune": {"accuracy": 0.9, "ci95": [0.8, 1.0], "n": 10}, "source": {"accuracy": 0.7, "ci95": [0.6, 0.8], "n": 10}}}))
    t = compare.comparison_table(root)
    assert t["model"].tolist() == ["base", "source", "tune"] and t["accuracy"].tolist() == [0.2, 0.7, 0.4]
    assert t.iloc[1]["ci_lo"] == 0.6


def test_resolve_recorded_path(tmp_path):
    (tmp_path / "demo-b" / "toy-base" / "model").mkdir(parents=True)
    (tmp_path / "demo-b" / "sae").mkdir()
    found = rundirs.resolve_recorded_path("runs/demo-a/toy-base/model", tmp_path / "demo-b" / "sae")
    assert found == (tmp_path / "demo-b" / "toy-base" / "model").resolve()
    assert rundirs.resolve_recorded_path(None, tmp_path) is None


def test_lazy_namespace():
    assert sa.discover is rundirs.discover
    assert "FeatureData" in dir(sa)
    with pytest.raises(AttributeError):
        sa.nope
