"""The SAE quality page: its rows from eval-sae and train-sae run dirs (pure functions, no browser), its density
figure, and the page itself under Streamlit's AppTest (a pipeline dir, a single eval-sae run, an empty dir)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from saetune.analysis import sae_quality_view as qv
from saetune.sae_quality import quality_table

APP = Path(__file__).resolve().parents[1] / "app"
HOOK = "model.layers.2"
XSS = "<img src=x onerror=alert(1)>"


def _manifest(path: Path, stage: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"stage": stage, "status": "complete", "phases": {}}))


def _hist(counts, dead):
    return {"edges": [-3.0, -2.0, -1.0, 0.0], "counts": counts, "dead": dead, "n_tokens": 1000}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A parent dir: a real eval-sae run of two SAEs (toy), a train-sae run with two SAEs whose window could not
    trigger, an old train-sae run without the new metrics, and a tune run (also a results.json: not an SAE's)."""
    from saetune.sae_eval import EvalSAEConfig, eval_sae
    from saetune.sae import SAE, SAEConfig
    root = tmp_path_factory.mktemp("quality") / "pipe"
    for i, d_sae in enumerate((256, 128)):
        SAE(SAEConfig(d_in=128, d_sae=d_sae, k=8, hook_name=HOOK, model_name="toy"), seed=i).save(root.parent / f"s{i}")
    eval_sae(EvalSAEConfig(sae=[str(root.parent / "s0"), str(root.parent / "s1")], n_tokens=256, max_examples=30,
                           progress=False, device="cpu", probe="off"), root / "quality")
    _manifest(root / "sae", "train-sae")
    base = {"hook": HOOK, "d_sae": 64, "k": 4, "l0": 4.0, "explained_variance": 0.6, "fvu": 0.4,
            "ce_loss_score": 0.9, "kl_div_score": 0.85, "frac_alive": 0.5, "n_tokens": 1000, "dead_frac": 0.0,
            "dead_tokens": 10_000_000, "dead_window_could_trigger": False, "frac_alive_train": 0.75,
            "n_alive_train_tokens": 4096, "note": "dead window could not trigger"}
    (root / "sae" / "results.json").write_text(json.dumps({
        f"{HOOK}.w64.k4": {**base, "density_histogram": _hist([10, 12, 10], 32)},
        XSS: {**base, "frac_alive": 0.25, "density_histogram": _hist([4, 8, 4], 48)}}))
    _manifest(root / "old-sae", "train-sae")
    (root / "old-sae" / "results.json").write_text(json.dumps({HOOK: {"fvu": 0.1, "l0": 8.0, "dead_frac": 0.0}}))
    _manifest(root / "tune", "tune")
    (root / "tune" / "results.json").write_text(json.dumps({"steps": 2, "eval_loss_after": 1.0}))
    return root


def test_rows_and_table_of_a_pipeline_dir(pipeline):
    rows, problems = qv.quality_rows(pipeline)
    labels = [r["label"] for r in rows]
    s0, s1 = str(pipeline.parent / "s0"), str(pipeline.parent / "s1")
    assert labels[:2] == ["old-sae", f"quality: {s0}"] and labels[2] == f"quality: {s1}"
    assert labels[3:] == [f"sae/{HOOK}.w64.k4", f"sae/{XSS}"]  # tune's results.json is no SAE's
    assert any("old-sae" in p and "predates" in p for p in problems)
    df = quality_table(rows)
    assert list(df["sae"]) == labels and "alive (train)" in df.columns and "note" in df.columns
    assert df.loc[df["sae"] == f"sae/{HOOK}.w64.k4", "ce_loss_score"].item() == 0.9
    real = df[df["sae"] == f"quality: {s0}"].iloc[0]
    assert 0 < real["alive"] <= 1 and real["d_sae"] == 256 and real["L0"] == 8.0
    assert "kl_div_score" in qv.meanings_markdown(df)
    notes = qv.liveness_notes(rows)
    assert any("50.0% of 64 latents" in n and "75.0% over 4,096 training tokens" in n and "could not count" in n
               for n in notes)


def test_density_figure_one_outline_per_sae_labels_escaped(pipeline):
    rows, _ = qv.quality_rows(pipeline)
    fig = qv.density_figure(rows)
    names = [t.name for t in fig.data]
    assert len(names) == 4  # the old run has no histogram
    assert any("32 of 64 never fire" in n for n in names) and not any("<img" in n for n in names)
    t = fig.data[-1]
    assert list(t.x) == [-3, -2, -2, -1, -1, 0] and list(t.y) == [4, 4, 8, 8, 4, 4]  # the step outline


def _page(run_dir, monkeypatch) -> AppTest:
    monkeypatch.setenv("SAETUNE_RUN_DIR", str(run_dir))
    at = AppTest.from_file(str(APP / "pages" / "6_SAE_quality.py"), default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_page_on_a_pipeline_and_on_one_run(pipeline, monkeypatch):
    at = _page(pipeline, monkeypatch)
    assert at.title[0].value == "SAE quality"
    table = at.dataframe[0].value
    assert len(table) == 5 and "ce_loss_score" in table.columns
    assert len(at.get("plotly_chart")) == 1
    assert any("predates" in i.value for i in at.info)
    at.multiselect(key="density").set_value([f"sae/{HOOK}.w64.k4"]).run()
    assert not at.exception
    at = _page(pipeline / "quality", monkeypatch)
    assert len(at.dataframe[0].value) == 2


def test_page_on_a_dir_without_sae_results(tmp_path, monkeypatch):
    _manifest(tmp_path / "tune", "tune")
    at = _page(tmp_path, monkeypatch)
    assert any("saetune eval-sae" in i.value for i in at.info)
    at = _page(tmp_path / "nowhere", monkeypatch)
    assert at.warning


def test_page_shows_which_latents_carry_which_concept(pipeline, monkeypatch, tmp_path):
    """An eval-sae run's concepts.csv (written when it probes the toy) becomes a per-SAE table on the page."""
    import shutil
    run = tmp_path / "quality"
    shutil.copytree(pipeline / "quality", run)
    (run / "concepts.csv").write_text("sae,concept,rank,latent,mean_diff,sae_acc,k1_acc\n"
                                      "a,op_add,0,7,0.5,0.9,0.8\na,op_add,1,3,0.2,0.9,0.8\nb,is_check,0,11,-0.4,0.7,0.6\n")
    at = _page(run, monkeypatch)
    assert at.subheader[-1].value == "which latents carry which concept"
    assert at.selectbox(key="concept_sae").options == ["a", "b"]
    shown = at.dataframe[-1].value
    assert shown["latent"].tolist() == [7, 3] and "sae" not in shown.columns
    at.selectbox(key="concept_sae").set_value("b").run()
    assert at.dataframe[-1].value["concept"].tolist() == ["is_check"]
