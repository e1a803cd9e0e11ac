"""Data-parallel SAE training under torchrun (gloo, 2 CPU processes): each rank takes its slice of every
global batch, gradients are all-reduced and FVU uses the global denominator, so the same seed gives the
same SAE as one process on the same global batch (to float tolerance); a run killed in one process
resumes in two. (Adam here: sign-based optimisers would turn a float-level difference in a near-zero
gradient into a ±lr step.)"""

import json
import os
import subprocess
import sys

import pytest
from interrupt import interrupted_run
import torch
from safetensors.torch import load_file

from saetune.errors import SaetuneError
from saetune.sae_trainer import SAETrainer, TrainSAEConfig, train_sae

pytestmark = pytest.mark.usefixtures("one_thread")  # the in-process runs on one thread, restored after the module


@pytest.fixture(scope="module")
def store(toy_store):
    return toy_store


FLAGS = dict(activations=None, hooks=["model.layers.2"], d_sae=[256], k=[8], batch_size=512, max_steps=6, optimizer="adam",
             checkpoint_every=3, eval_seqs=0, log_every=1, progress=False)


def _torchrun(store, out, extra=()):
    # --standalone: the rendezvous store binds port 0 (no port picked here, released, and raced for)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "saetune.cli",
           "train-sae", "--activations", str(store), "--hooks", "model.layers.2", "--d-sae", "256", "--k", "8",
           "--batch-size", "512", "--max-steps", "6", "--checkpoint-every", "3", "--eval-seqs", "0",
           "--log-every", "1", "--optimizer", "adam", "--no-progress", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAETUNE_DEBUG": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _weights(d):
    return load_file(str(d / "sae" / "sae_weights.safetensors"))


def test_two_processes_train_the_one_process_sae_and_resume_across_world_sizes(store, tmp_path, monkeypatch):
    cfg = TrainSAEConfig(**{**FLAGS, "activations": str(store)})
    one = train_sae(cfg, tmp_path / "one")
    _torchrun(store, tmp_path / "two")
    man = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert man["status"] == "complete" and man["world_size"] == 2
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    rows1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows1] == [r["tokens"] for r in rows2]
    for r1, r2 in zip(rows1, rows2):  # the global FVU and dead fraction, not a per-rank one
        assert r2["fvu"] == pytest.approx(r1["fvu"], rel=1e-5) and r2["dead_frac"] == r1["dead_frac"]

    # killed in one process after the step-3 checkpoint, resumed in two: the same SAE
    interrupted_run(monkeypatch, SAETrainer, "step", 5, train_sae, cfg, tmp_path / "killed")
    _torchrun(store, tmp_path / "killed", ["--resume", str(tmp_path / "killed")])
    c = _weights(tmp_path / "killed")
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-5)
    rows3 = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows3] == [1, 2, 3, 4, 5, 6]  # the kill's rows past the checkpoint re-logged once
    assert rows3[2]["fvu"] == rows1[2]["fvu"]  # steps 1–3 ran in one process: bit-equal
    assert one["model.layers.2"]["train_tokens"] == 6 * 512


def test_global_batch_must_divide_over_processes(monkeypatch, store):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SaetuneError, match="must divide evenly over 3 processes"):
        train_sae(TrainSAEConfig(**{**FLAGS, "activations": str(store)}), "/nonexistent/out")

