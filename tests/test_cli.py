"""The ``saetune`` command line: help text, and bad input → exit code 2 with a sentence, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saetune.cli import main
from saetune.runs import read_manifest


pytestmark = pytest.mark.usefixtures("one_thread")


def small(model_dir) -> list[str]:
    return ["--model", str(model_dir), "--dataset", "toy", "--max-examples", "20", "--context-size", "32",
            "--batch-size", "4", "--seqs-per-shard", "4", "--hooks", "model.layers.1", "--no-progress",
            "--device", "cpu"]


def run_main(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own exits (--help, usage errors)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert err.startswith("saetune: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


# ---- bad input in real subprocesses (run in parallel: each start imports torch + transformers) ------

@pytest.fixture(scope="module")
def subprocess_results(tiny_model_dir, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("cli")
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("context_size: 32\ncontxt_size: 64\n")
    occupied = tmp / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    data = tmp / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "solution": str(i)}) + "\n" for i in range(5)))
    base = small(tiny_model_dir)
    cases = {
        "unknown_hook": ["cache", *base, "--hooks", "model.layers.99", "--out", tmp / "o1"],
        "unknown_yaml_key": ["cache", "--config", bad_yaml, "--out", tmp / "o2"],
        "ill_typed_flag": ["cache", *base, "--batch-size", "lots", "--out", tmp / "o3"],
        "existing_out": ["cache", *base, "--out", occupied],
        "hub_offline": ["cache", *base, "--model", "saetune-test-nonexistent-org/tiny-xyz", "--out", tmp / "o5"],
        "missing_field": ["cache", *base, "--dataset", data, "--template", "resa", "--out", tmp / "o6"],
    }
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("SAETUNE_DEBUG", None)
    # one case goes through the installed console script, the others through ``python -m saetune.cli``
    script = Path(sys.executable).parent / "saetune"
    assert script.exists(), "the `saetune` console script is not installed next to the interpreter"
    procs = {name: subprocess.Popen([*([str(script)] if name == "existing_out" else [sys.executable, "-m",
                                                                                     "saetune.cli"]),
                                     *map(str, argv)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for name, argv in cases.items()}
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    results["_occupied"] = occupied
    return results


@pytest.mark.parametrize("case,needles", [
    ("unknown_hook", ["hook 'model.layers.99'", "4 layers (0…3)", "valid hook names"]),
    ("unknown_yaml_key", ["unknown key 'contxt_size'", "bad.yaml", "valid keys", "context_size", "seqs_per_shard"]),
    ("ill_typed_flag", ["'batch_size'", "'lots'", "expected int"]),
    ("existing_out", ["already holds", "--resume", "--overwrite"]),
    ("hub_offline", ["saetune-test-nonexistent-org/tiny-xyz", "hub"]),
    ("missing_field", ["no field 'answer'", "'resa'", "fields present: question, solution"]),
])
def test_bad_input_in_a_subprocess(subprocess_results, case, needles):
    r = subprocess_results[case]
    assert_user_error(r.returncode, r.stderr, *needles)
    assert "Traceback" not in r.stdout
    if case == "existing_out":
        assert (subprocess_results["_occupied"] / "notes.txt").read_text() == "mine"  # untouched


# ---- help -------------------------------------------------------------------------------------

def test_top_level_help(capsys):
    rc, out, _ = run_main(["--help"], capsys)
    assert rc == 0
    for verb in ("demo", "toy", "cache", "train-sae"):
        assert verb in out
    assert "capture activations into an on-disk store" in out


def test_a_percent_sign_in_a_field_help_prints_as_written(capsys):
    """argparse %-formats help text: a field's "15 %" must not become a dict dump with an object address."""
    rc, out, _ = run_main(["train-sae", "--help"], capsys)
    flat = " ".join(out.split())
    assert rc == 0 and "competes for the same cores: 15 % slower on 2 cores" in flat
    assert " object at 0x" not in flat


def test_cache_help_shows_field_help(capsys):
    rc, out, _ = run_main(["cache", "--help"], capsys)
    assert rc == 0
    flat = " ".join(out.split())
    for text in ("--seqs-per-shard", "sequences per shard file [int; default: 64]",
                 "hook points to capture (e.g. model.layers.2); several come from one forward",
                 "[list of str; default: ['model.layers.2']]",
                 "'auto' | 'resa' | 'chat' | 'plain'", "--no-progress", "show a progress bar [bool; default: True]",
                 "--resume RUN_DIR", "--overwrite", "--config YAML", "store activations at hook points"):
        assert text in flat, text


def test_version(capsys):
    rc, out, _ = run_main(["--version"], capsys)
    assert rc == 0 and out.startswith("saetune ")


def test_missing_verb_is_a_usage_error(capsys):
    rc, _, err = run_main([], capsys)
    assert rc == 2 and "error:" in err and "Traceback" not in err


# ---- in process: a good run, then the ways to get it wrong ---------------------------------------

def test_cache_runs_and_refuses_a_second_run(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run_main(["cache", *small(tiny_model_dir), "--out", out], capsys)
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["hooks"] == ["model.layers.1"] and summary["n_tokens"] > 0
    assert read_manifest(out)["status"] == "complete"

    rc, _, err = run_main(["cache", *small(tiny_model_dir), "--out", out], capsys)
    assert_user_error(rc, err, "already holds a 'cache' run (status complete)", "--resume", "--overwrite")

    rc, _, err = run_main(["cache", "--resume", out], capsys)  # a finished run resumes to the same result
    assert rc == 0, err
    assert read_manifest(out)["status"] == "complete"

    rc, _, err = run_main(["cache", "--resume", out, "--batch-size", "2"], capsys)
    assert_user_error(rc, err, "changed config", "batch_size: 4 -> 2")

    rc, _, err = run_main(["cache", "--resume", out, "--out", tmp_path / "elsewhere"], capsys)
    assert_user_error(rc, err, "name different dirs")

    rc, stdout, err = run_main(["cache", *small(tiny_model_dir), "--max-examples", "10", "--out", out,
                                "--overwrite"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["n_tokens"] < summary["n_tokens"]

    rc, _, err = run_main(["cache", "--resume", out, "--overwrite"], capsys)
    assert_user_error(rc, err, "contradict")


def test_yaml_config_with_flag_override(tiny_model_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\nmax_examples: 20\ncontext_size: 32\nbatch_size: 4\n"
                   "seqs_per_shard: 4\nhooks: [model.layers.0]\nprogress: false\ndevice: cpu\n")
    out = tmp_path / "run"
    rc, stdout, err = run_main(["cache", "--config", cfg, "--hooks", "blocks.2.hook_resid_post", "--out", out],
                               capsys)
    assert rc == 0, err
    assert json.loads(stdout)["hooks"] == ["model.layers.2"]
    saved = (out / "config.yaml").read_text()
    assert "blocks.2.hook_resid_post" in saved and "context_size: 32" in saved


@pytest.mark.parametrize("extra,needles", [
    (["--hooks", "blocks.0.hook_resid_mid"], ["unknown hook name 'blocks.0.hook_resid_mid'", "valid hook names"]),
    (["--context-size", "3.5"], ["'context_size'", "3.5", "expected int"]),
    (["--template", "jinja"], ["'template'", "'jinja'", "'auto', 'resa', 'chat', 'plain'"]),
    (["--dtype", "int8"], ["'int8'", "bfloat16"]),
    (["--device", "tpu"], ["'tpu'", "cpu"]),
    (["--dataset", "/no/such/data.jsonl"], ["/no/such/data.jsonl"]),
    (["--config", "/no/such/config.yaml"], ["/no/such/config.yaml"]),
    (["--batch-size", "0"], ["batch_size (0)", "at least 1"]),
    (["--context-size", "1000"], ["fewer than context_size=1000 tokens"]),
])
def test_bad_input_in_process(tiny_model_dir, tmp_path, capsys, extra, needles):
    rc, _, err = run_main(["cache", *small(tiny_model_dir), *extra, "--out", tmp_path / "run"], capsys)
    assert_user_error(rc, err, *needles)


def test_hub_id_offline_in_process(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = run_main(["cache", *small(tiny_model_dir), "--model", "nobody-xyz/nothing", "--out",
                           tmp_path / "run"], capsys)
    assert_user_error(rc, err, "'nobody-xyz/nothing'", "hub")
    assert read_manifest(tmp_path / "run")["status"] == "failed"


def test_resume_of_a_non_run_dir(tmp_path, capsys):
    rc, _, err = run_main(["cache", "--resume", tmp_path], capsys)
    assert_user_error(rc, err, "holds no config.yaml")


def test_unknown_flag_is_a_usage_error(capsys):
    rc, _, err = run_main(["cache", "--contxt-size", "3"], capsys)
    assert rc == 2 and "unrecognized arguments: --contxt-size" in err and "Traceback" not in err


def test_internal_error_has_no_traceback_unless_asked(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import saetune.activations

    def broken(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(saetune.activations, "cache", broken)
    monkeypatch.delenv("SAETUNE_DEBUG", raising=False)
    rc, _, err = run_main(["cache", *small(tiny_model_dir), "--out", tmp_path / "run"], capsys)
    assert rc == 1
    assert "saetune: internal error: RuntimeError: kaboom" in err and "SAETUNE_DEBUG=1" in err
    assert "Traceback" not in err
    monkeypatch.setenv("SAETUNE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kaboom"):
        main(["cache", *small(tiny_model_dir), "--out", str(tmp_path / "run2")])


def test_interrupt_says_how_to_resume(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import saetune.activations

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(saetune.activations, "cache", interrupted)
    rc, _, err = run_main(["cache", *small(tiny_model_dir), "--out", tmp_path / "run"], capsys)
    assert rc == 130 and "--resume" in err and "Traceback" not in err
