"""The demo pipeline, shrunk: every stage of the Resa story runs, the summary and the parent
layout are what the explorer reads, and --resume keeps finished stages."""

import json

import pytest

from saetune.demo_pipeline import DemoConfig, demo, format_table

pytestmark = pytest.mark.usefixtures("one_thread")


def test_small_demo_runs_end_to_end_and_resumes(tmp_path):
    cfg = DemoConfig(examples=300, d_sae=256, k=8, batch_size=512, tune_steps=2, eval_problems=8, features=False,
                     rl_steps=1, progress=False)
    s = demo(cfg, tmp_path / "demo")
    d = tmp_path / "demo"
    assert set(s["accuracy"]) == {"base", "source", "SAE-tuned", "control-sft", "control-cotfree"}
    for label, a in s["accuracy"].items():
        assert a["n"] == 8 and 0.0 <= a["accuracy"] <= 1.0
        assert (d / "eval" / label / "eval" / "results.json").exists()
    assert (d / "merge" / "merged" / "README.md").exists() and (d / "tune" / "adapter").is_dir()
    assert s["tune"]["steps"] == 2 and s["tune"]["eval_loss_before"] > 0
    assert s["rl"]["steps"] == 1 and 0 <= s["rl"]["accuracy_after"] <= 1  # the RL-trained source
    assert (d / "rl-source" / "model" / "config.json").exists() and list((d / "rl-source" / "traces").glob("*.jsonl"))
    assert json.loads((d / "summary.json").read_text())["accuracy"] == s["accuracy"]
    assert (d / "config.yaml").exists()  # `saetune demo --resume DIR` reads it
    assert "accuracy: SAE-tuned" in format_table(s)
    again = demo(cfg, d, resume=True)
    assert again["accuracy"] == s["accuracy"] and max(again["seconds"].values()) < 2.0  # every stage kept
