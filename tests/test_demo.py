"""The demo pipeline, shrunk: every stage of the Resa story runs, the summary and the parent
layout are what the explorer reads, and --resume keeps finished stages."""

import json

import pytest

from saetune.demo_pipeline import DemoConfig, demo, format_table

pytestmark = pytest.mark.usefixtures("one_thread")


def test_small_demo_runs_end_to_end_and_resumes(tmp_path, capsys):
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
    before = _stamps(d)
    capsys.readouterr()
    again = demo(cfg, d, resume=True)
    assert again["accuracy"] == s["accuracy"]
    # every stage kept: each one said so, none ran, and no file of any stage was rewritten (only the summary)
    said = capsys.readouterr().out
    assert set(again["seconds"]) == set(s["seconds"]) and "] running" not in said, said
    for name in s["seconds"]:
        assert f"[{name}] already complete, kept" in said, said
    assert _stamps(d) == before


def _stamps(d):
    """(size, mtime in ns) of every file under ``d`` but the summary, which a resumed demo writes again."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != "summary.json"}
