"""Every explorer page under Streamlit's AppTest: against a demo-layout pipeline dir, a single
run dir, and missing / empty / half-written dirs (a message, never an exception)."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from explorer_fixtures import pipeline_dir

APP = Path(__file__).resolve().parents[1] / "app"
PAGES = ["explorer.py", "pages/1_Features.py", "pages/2_Traces.py", "pages/3_Reasoning_features.py",
         "pages/4_Runs.py", "pages/5_Compare.py"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return pipeline_dir(tmp_path_factory)


def page(name: str, run_dir, monkeypatch) -> AppTest:
    monkeypatch.setenv("SAETUNE_RUN_DIR", str(run_dir))
    at = AppTest.from_file(str(APP / name), default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def htmls(at: AppTest) -> list[str]:
    return [e.proto.body for e in at.get("html")]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)


def test_home_page_and_try_a_prompt(run, monkeypatch):
    at = page("explorer.py", run, monkeypatch)
    assert "saetune explorer" in at.title[0].value
    table = at.dataframe[0].value
    assert {"sae", "features", "rl-source", "tune"} <= set(table["run"])
    assert "✅ feature data" in at.markdown[0].value
    at.text_area(key="prompt").set_value("User : compute ( 2 + 2 ) * 3 . Assistant : <think> 2 + 2 = 4 .")
    at.button(key="run_prompt").click().run()
    assert not at.exception
    bodies = htmls(at)
    assert len(bodies) == 2 and "entropy" in bodies[0]
    first = at.selectbox(key="prompt_feature").value
    other = at.selectbox(key="prompt_feature").options[1]
    at.selectbox(key="prompt_feature").set_value(other).run()
    assert f"feature {other}" in htmls(at)[1] and f"feature {first}" not in htmls(at)[1]


def test_try_a_prompt_steers_the_continuation_with_the_attach_code(run, monkeypatch):
    """The explorer's steered continuation is saetune.steering.generate's (the attach verb's code): same text."""
    from saetune.analysis.live import steered_continuation
    from saetune.steering import Schedule, clamp
    at = page("explorer.py", run, monkeypatch)
    prompt = "User : compute ( 2 + 2 ) * 3 . Assistant : <think>"
    at.text_area(key="prompt").set_value(prompt)
    at.text_input(key="steer_clamp").set_value("3=25")
    at.text_input(key="steer_schedule").set_value("think")
    at.button(key="steer_run").click().run()
    assert not at.exception
    shown = at.code[0].value
    import saetune.app._common as ui
    d = __import__("saetune.analysis", fromlist=["discover"]).discover(run)
    model_path, sae_path, hook, _ = ui.find_sae_and_model(d)
    m, tok, sae = ui.model_and_sae(model_path, sae_path)
    want = steered_continuation(m, tok, sae, hook, prompt, edits=[clamp(3, 25.0)], schedule=Schedule.think(),
                                max_new_tokens=32)
    plain = steered_continuation(m, tok, sae, hook, prompt, max_new_tokens=32)
    assert shown == want["response"]
    assert want["steered"].any()  # the edit acted, and changed what the model did
    assert want["response"] != plain["response"] or (want["acts"] != plain["acts"]).any()
    table = at.dataframe[-1].value
    assert len(table) == len(want["table"])


def test_features_page(run, monkeypatch):
    at = page("pages/1_Features.py", run, monkeypatch)
    assert len(at.selectbox(key="hook").options) == 2
    first = at.subheader[0].value
    assert first.startswith("feature ")
    assert [m.label for m in at.metric][:2] == ["density", "mean act (when firing)"]
    assert len(at.get("plotly_chart")) >= 3  # density, histogram, logits
    assert htmls(at)[0].count('<div class="sx-tokens">') == 6  # the top contexts, drawn as one element
    at.number_input(key="fid").set_value(5).run()
    assert at.subheader[0].value == "feature 5"
    nb = at.selectbox(key="jump").options[0]
    at.selectbox(key="jump").set_value(nb).run()
    assert at.subheader[0].value == f"feature {nb}" and at.number_input(key="fid").value == int(nb)
    # search by token: every hit's card shows that token among the contexts
    at.radio(key="mode").set_value("token").run()
    assert not at.exception and at.subheader == []  # no query yet: no card, a prompt to search instead
    assert any("Search for a feature" in i.value for i in at.info)
    at.text_input(key="query").set_value("=").run()
    hits = at.selectbox(key="hit").options
    assert hits and at.subheader[0].value == f"feature {hits[0]}"
    at.radio(key="mode").set_value("text").run()
    at.text_input(key="query").set_value("zzz-no-match").run()
    assert any("no feature matches" in w.value for w in at.sidebar.warning)
    at.selectbox(key="hook").set_value(at.selectbox(key="hook").options[0]).run()
    assert not at.exception
    at.slider(key="min_density").set_value(-1.0).run()
    assert (at.dataframe[-1].value["log10_density"] >= -1.0).all()


def test_traces_page_escapes_hostile_text(run, monkeypatch):
    at = page("pages/2_Traces.py", run, monkeypatch)
    assert at.selectbox(key="file").value.endswith("step_000010.jsonl")
    assert at.dataframe[0].value.shape[0] == 3  # the cut last line is skipped
    assert at.metric[3].value == "11"
    at.number_input(key="trace").set_value(1).run()
    assert not at.exception
    bodies = " ".join(htmls(at))
    assert "&lt;script&gt;" in bodies and "&lt;img src=x onerror=alert(1)&gt;" in bodies
    p = _Tags()
    p.feed(bodies)
    assert p.tags <= {"style", "div", "span", "mark"}
    at.checkbox(key="crit").uncheck().run()
    assert "sx-crit" not in " ".join(htmls(at)).split("</style>")[-1]
    at.radio(key="color").set_value("logprob").run()
    at.number_input(key="trace").set_value(2).run()  # no entropies, no tokens: still renders
    assert not at.exception
    at.radio(key="color").set_value("feature").run()
    at.number_input(key="trace").set_value(0).run()
    at.number_input(key="feat").set_value(3).run()
    at.sidebar.button(key="overlay").click().run()
    assert not at.exception
    assert "feature" in htmls(at)[-1]


def test_reasoning_page(run, monkeypatch):
    at = page("pages/3_Reasoning_features.py", run, monkeypatch)
    assert "at least 3 distinct layers" in " ".join(i.value for i in at.info)
    counts = at.dataframe[0].value
    assert counts["layer"].tolist() == [1, 2]
    top = at.slider(key="threshold").max
    at.slider(key="threshold").set_value(top).run()
    assert not at.exception and at.dataframe[0].value["count"].sum() == 0
    assert len(at.selectbox(key="hook").options) == 2


def test_runs_page(run, monkeypatch):
    at = page("pages/4_Runs.py", run, monkeypatch)
    assert {"complete"} == set(at.dataframe[0].value["status"])
    assert "sae" in at.multiselect(key="runs").value
    at.multiselect(key="runs").set_value(["rl-source", "tune"]).run()
    assert set(at.multiselect[1].options) == {"reward_mean", "entropy_mean", "kl", "fvu"}
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert {t["name"] for t in fig["data"]} == {"rl-source", "tune"}
    assert sorted(t["name"] for t in fig["data"] if t.get("showlegend", True)) == ["rl-source", "tune"]
    at.radio(key="x").set_value("tokens").run()
    assert not at.exception
    assert list(at.dataframe[1].value.columns) == ["rl-source", "tune"]


def test_compare_page(run, monkeypatch):
    at = page("pages/5_Compare.py", run, monkeypatch)
    t = at.dataframe[0].value
    assert set(t["model"]) >= {"base", "SAE-tuned", "toy-base"}
    tuned = t[t["model"] == "SAE-tuned"].iloc[0]
    assert tuned["accuracy"] == 0.5 and tuned["train_s"] == 42.0
    at.multiselect(key="benchmarks").set_value([]).run()
    assert not at.exception
    assert "tune" in at.dataframe[-1].value["stage"].tolist()


def test_single_run_dir(run, monkeypatch):
    for name in PAGES:
        at = page(name, run / "sae", monkeypatch)
        assert not at.error
    at = page("pages/1_Features.py", run / "features", monkeypatch)
    assert at.subheader[0].value.startswith("feature ")


@pytest.mark.parametrize("kind", ["unset", "missing", "empty", "half-written"])
def test_bad_run_dirs_give_a_message(kind, tmp_path, monkeypatch):
    if kind == "unset":
        target = ""
    elif kind == "missing":
        target = tmp_path / "nope"
    else:
        target = tmp_path
        if kind == "half-written":
            (tmp_path / "sae" / "sae").mkdir(parents=True)
            (tmp_path / "sae" / "manifest.json").write_text('{"stage": "train-sae", "status": "runn')
            (tmp_path / "sae" / "sae" / "cfg.json").write_text("{")
            (tmp_path / "features" / "features" / "model.layers.2").mkdir(parents=True)
            (tmp_path / "features" / "manifest.json").write_text(json.dumps({"stage": "features", "status": "running"}))
            (tmp_path / "features" / "features" / "model.layers.2" / "meta.json").write_text("{")
            (tmp_path / "features" / "features" / "reasoning.json").write_text('{"hooks": ')
            (tmp_path / "eval" / "eval").mkdir(parents=True)
            (tmp_path / "eval" / "manifest.json").write_text("{}")
            (tmp_path / "eval" / "eval" / "results.json").write_text('{"toy": {"pass')
            (tmp_path / "summary.json").write_text("[")
    for name in PAGES:
        at = page(name, target, monkeypatch)
        shown = [w.value for w in at.warning] + [i.value for i in at.info] + [e.value for e in at.error]
        assert shown, name
        if kind != "half-written":
            assert any("run dir" in s.lower() or "saetune explore" in s for s in shown), (name, shown)


def test_reasoning_page_computes_on_request(run, monkeypatch):
    at = page("pages/3_Reasoning_features.py", run / "sae", monkeypatch)  # a single SAE run: no reasoning.json
    assert "compute it here" in at.info[0].value
    at.button(key="compute").click().run()
    assert not at.exception
    assert at.dataframe[0].value["hook"].tolist() == ["model.layers.1", "model.layers.2"]  # every SAE of the run


def test_reasoning_page_shows_a_recorded_error(tmp_path, monkeypatch):
    (tmp_path / "features" / "features").mkdir(parents=True)
    (tmp_path / "features" / "manifest.json").write_text(json.dumps({"stage": "features", "status": "complete"}))
    (tmp_path / "features" / "features" / "reasoning.json").write_text(json.dumps(
        {"hooks": {}, "error": "the prompt must contain both <think> and </think>"}))
    at = page("pages/3_Reasoning_features.py", tmp_path, monkeypatch)
    assert "could not count reasoning features" in at.warning[0].value
