"""Faults in multi-process runs (torchrun, gloo, 2 CPU processes): a rank killed mid-run stops the job (no
survivor waits in a dead collective), leaves the run dir resumable (never 'complete', the last checkpoint
whole, a stale lock taken over) and ``--resume`` on the same or another world size ends with the uninterrupted
SAE; a world size that does not split the global batch is refused before the run dir is touched; a second run
on a live run dir refuses, naming the dir and rank 0's pid, and the first run completes untouched.

train-sae runs die through its test-only fault injection (``SAETUNE_FAULT_KILL_RANK`` / ``SAETUNE_FAULT_AT_STEP``:
the rank SIGKILLs itself at a set step); tune runs are killed from outside once a checkpoint exists."""

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import pytest
from interrupt import interrupted_run
import torch
from safetensors.torch import load_file

from saetune.errors import SaetuneError
from saetune.runs import LOCK, RunDir, _pid_alive
from saetune.sae import SAE, SAEConfig
from saetune.sae_trainer import SAETrainer, TrainSAEConfig, train_sae

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SAETUNE_DEBUG": "1"}
SAE_FLAGS = dict(hooks=["model.layers.2"], d_sae=[256], k=[8], batch_size=512, max_steps=6, optimizer="adam",
                 checkpoint_every=3, eval_seqs=0, log_every=1, progress=False)


def _cli(*args, nproc=1) -> list[str]:
    # --standalone: torchrun's rendezvous store binds port 0 and hands the port to the workers (a port picked
    # here, released, then passed on could be taken by another process in between)
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [sys.executable, *(launch if nproc > 1 else []), "-m", "saetune.cli", *map(str, args)]


def _train_sae_args(store, out, max_steps=6, d_sae=256) -> list:
    return ["train-sae", "--activations", store, "--hooks", "model.layers.2", "--d-sae", d_sae, "--k", "8",
            "--batch-size", "512", "--max-steps", max_steps, "--checkpoint-every", "3", "--eval-seqs", "0",
            "--log-every", "1", "--optimizer", "adam", "--no-progress", "--out", out]


# How long a job may take before a test calls it stuck: minutes on a loaded machine, far below the 30 min a
# gloo collective waits for a dead or hung peer by default (what these tests make sure never happens).
STUCK_S = 300


def _run(cmd, env=ENV, timeout=STUCK_S) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end; fail (its process group killed) if it is still running after ``timeout`` s."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s (waiting on a dead or hung peer?): {' '.join(map(str, cmd))}"
                    f"\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _wait_for(cond, what: str, proc: subprocess.Popen | None = None, timeout: float = STUCK_S) -> None:
    """Poll ``cond`` until it holds; fail naming ``what`` if the deadline passes or ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s")
        time.sleep(0.02)


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _steps(d: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()]


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _workers(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """rank → worker process of a torchrun launcher (its children that carry RANK)."""
    out = {}
    for child in psutil.Process(launcher.pid).children():
        env = child.environ()
        if "RANK" in env:
            out[int(env["RANK"])] = child
    return out


def _kill(launcher: subprocess.Popen, workers: dict[int, psutil.Process]) -> None:
    """SIGKILL a torchrun job: its workers one by one (they run in sessions of their own, so killing the
    launcher's process group leaves them, a stopped one for ever) and then the launcher's group."""
    for w in workers.values():
        try:
            w.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(launcher.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    launcher.wait(timeout=30)


def _assert_last_checkpoint_whole(d: Path, step: int) -> None:
    """latest.json names a checkpoint at ``step`` whose files are all there and load; nothing newer looks valid."""
    root = d / "checkpoints"
    latest = json.loads((root / "latest.json").read_text())
    assert latest == {"step": step, "dir": f"step_{step:07d}"}
    assert sorted(p.name for p in root.glob("step_*")) == [latest["dir"]]  # a half-written one is only ever .tmp-*
    ck = root / latest["dir"]
    assert json.loads((ck / "state.json").read_text())["step"] == step
    for name in ("state.safetensors", "0.sae.safetensors"):
        assert load_file(str(ck / name))


@pytest.fixture(scope="module")
def store(toy_store):
    return toy_store


@pytest.fixture(scope="module")
def reference(store, one_thread, tmp_path_factory):
    """The uninterrupted one-process SAE (2 processes give it to 1e-5: tests/test_distributed_sae.py)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train_sae(TrainSAEConfig(activations=str(store), **SAE_FLAGS), out)
    return load_file(str(out / "sae" / "sae_weights.safetensors"))


# ---- a rank dies mid-run -------------------------------------------------------------------------

@pytest.mark.parametrize("dead_rank,resume_procs", [(1, 2), (0, 1)], ids=["rank1-resume2", "rank0-resume1"])
def test_a_rank_killed_mid_run_stops_the_job_and_resume_finishes_the_same_sae(store, reference, tmp_path,
                                                                               dead_rank, resume_procs):
    out = tmp_path / "run"
    fault = {**ENV, "SAETUNE_FAULT_KILL_RANK": str(dead_rank), "SAETUNE_FAULT_AT_STEP": "5"}
    proc = _run(_cli(*_train_sae_args(store, out), nproc=2), env=fault)  # it ends: no wait in a dead collective
    assert proc.returncode != 0, "the job went on without a rank"
    assert "SIGKILL" in proc.stderr, proc.stderr[-3000:]  # torchrun names the signal that ended the rank

    man = _manifest(out)
    # rank 0 writes the manifest: it records the failure when it survives, and when it died the run reads 'running'
    assert man["status"] == ("running" if dead_rank == 0 else "failed"), man
    assert not (out / "sae").exists() and not (out / "results.json").exists()
    _assert_last_checkpoint_whole(out, 3)
    assert _steps(out) == [1, 2, 3, 4]  # rank 0 logged up to the step before the kill
    lock = out / LOCK
    if dead_rank == 0:  # killed holding the lock: a stale pid, which must not block the resume
        assert lock.exists() and not _pid_alive(int(lock.read_text()))
    else:  # the survivor freed it as it recorded the failure
        assert not lock.exists()

    proc = _run(_cli("train-sae", "--resume", out, nproc=resume_procs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    man = _manifest(out)
    assert man["status"] == "complete" and man["world_size"] == resume_procs and len(man["resumed_at"]) == 1
    assert _steps(out) == [1, 2, 3, 4, 5, 6]  # the killed run's step 4 re-logged once, from the checkpoint on
    assert not lock.exists() and not (out / "checkpoints").exists()
    got = load_file(str(out / "sae" / "sae_weights.safetensors"))
    for k in reference:
        torch.testing.assert_close(got[k], reference[k], rtol=1e-4, atol=1e-5)


def test_a_hung_rank_fails_the_run_after_the_dist_timeout(store, tmp_path):
    """A rank that stops answering (SIGSTOP: a stuck file system, a paused container) instead of dying:
    with SAETUNE_DIST_TIMEOUT_S=4 rank 0's next collective gives up after ~4 s and the run is recorded failed
    (without it, torch's default would hold rank 0 for 30 minutes)."""
    out = tmp_path / "run"
    env = {**ENV, "SAETUNE_DIST_TIMEOUT_S": "4"}
    log = open(tmp_path / "job.log", "w")
    job = subprocess.Popen(_cli(*_train_sae_args(store, out, max_steps=400), nproc=2), env=env, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    workers: dict[int, psutil.Process] = {}
    try:
        _wait_for(lambda: (out / "checkpoints" / "latest.json").exists(), "checkpoint", job)
        workers = _workers(job)
        workers[1].send_signal(signal.SIGSTOP)
        # the manifest is written before the lock is freed: killing in between would leave the lock behind
        _wait_for(lambda: _manifest(out)["status"] == "failed" and not (out / LOCK).exists(),
                  "a failed manifest and a freed lock", job)
    finally:
        _kill(job, workers)  # the stopped rank never reads torchrun's SIGTERM
        log.close()
    man = _manifest(out)
    assert man["status"] == "failed" and not (out / "sae").exists()
    # rank 0 gave up through the collective's timeout, and it was the 4 s one set above (not torch's 30 min)
    assert re.search(r"timed out waiting 4000 ?ms", man["error"], re.IGNORECASE), man
    assert not (out / LOCK).exists()  # rank 0 recorded the failure and freed the lock
    with pytest.raises(SaetuneError, match="SAETUNE_DIST_TIMEOUT_S='soon'"):
        from saetune.distributed import dist_timeout_s
        os.environ["SAETUNE_DIST_TIMEOUT_S"] = "soon"
        try:
            dist_timeout_s()
        finally:
            del os.environ["SAETUNE_DIST_TIMEOUT_S"]


def test_sigterm_stops_train_sae_as_failed_frees_the_lock_and_restores_the_handler(store, tmp_path, monkeypatch):
    """torchrun SIGTERMs the survivors of a dead rank: the run records that instead of vanishing 'running'."""

    class Outside(Exception):
        pass

    def outside(signum, frame):  # the handler train-sae must replace while it runs, and put back
        raise Outside

    orig = SAETrainer.step
    calls = {"n": 0}

    def terminated(self, x, autocast):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(self, x, autocast)

    monkeypatch.setattr(SAETrainer, "step", terminated)
    previous = signal.signal(signal.SIGTERM, outside)
    try:
        with pytest.raises(KeyboardInterrupt, match="terminated by SIGTERM"):
            train_sae(TrainSAEConfig(activations=str(store), **SAE_FLAGS), tmp_path / "run")
        assert signal.getsignal(signal.SIGTERM) is outside
    finally:
        signal.signal(signal.SIGTERM, previous)
    man = _manifest(tmp_path / "run")
    assert man["status"] == "failed" and man["error"] == "terminated by SIGTERM" and "train" in man["phases"]
    assert not (tmp_path / "run" / LOCK).exists()
    _assert_last_checkpoint_whole(tmp_path / "run", 3)


# ---- world size on resume ------------------------------------------------------------------------

def test_a_resume_on_a_world_size_that_does_not_split_the_global_batch_is_refused_untouched(store, tmp_path,
                                                                                          monkeypatch):
    cfg = TrainSAEConfig(activations=str(store), **SAE_FLAGS)
    out = tmp_path / "run"
    interrupted_run(monkeypatch, SAETrainer, "step", 5, train_sae, cfg, out)
    before = _files(out)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SaetuneError, match=r"batch_size 512 \(the global batch\) must divide evenly over 3 processes; "
                                           r"resume it on a process count that divides 512 \(e\.g\. 1, 2, 4, 8, 16, "
                                           r"32, 64\)"):
        train_sae(cfg, out, resume=True)
    assert _files(out) == before  # refused before the run dir was opened: status, lock, checkpoint as they were

    # computed on the fly each rank runs whole sequences: 3 per batch do not split over 2 processes
    monkeypatch.setenv("WORLD_SIZE", "2")
    fly = TrainSAEConfig(**{**SAE_FLAGS, "batch_size": 192}, context_size=64)
    with pytest.raises(SaetuneError, match=r"3 sequences per batch \(batch_size 192 / context_size 64\) do not "
                                           r"divide over 2 processes; run it on a process count that divides 3 "
                                           r"\(e\.g\. 1, 3\)"):
        train_sae(fly, tmp_path / "fly")
    assert not (tmp_path / "fly").exists()


# ---- two runs on one run dir ---------------------------------------------------------------------

def test_a_second_run_on_a_live_run_dir_refuses_and_the_first_completes_untouched(store, tmp_path):
    out = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")
    # 25 steps of a 4,096-latent SAE: seconds of training after the run dir appears, time to hold the run still
    first = subprocess.Popen(_cli(*_train_sae_args(store, out, max_steps=25, d_sae=4096), nproc=2), env=ENV,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    workers: dict[int, psutil.Process] = {}
    try:
        _wait_for(lambda: (out / "manifest.json").exists(), "run dir", first)  # written after the lock and config
        workers = _workers(first)
        for w in workers.values():  # held still (and alive) while the second run tries
            w.send_signal(signal.SIGSTOP)
        holder = int((out / LOCK).read_text())
        assert sorted(workers) == [0, 1] and holder == workers[0].pid  # rank 0 holds the lock, not torchrun
        before = _files(out)
        refusal = f"run dir {str(out)!r} is in use by process {holder}"

        proc = _run(_cli(*_train_sae_args(store, out, max_steps=25, d_sae=4096)))  # one process, a new run
        assert proc.returncode == 2 and f"saetune: error: {refusal}" in proc.stderr, proc.stderr[-3000:]
        cfg = TrainSAEConfig(activations=str(store), **{**SAE_FLAGS, "max_steps": 25, "d_sae": [4096]})
        for how in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(SaetuneError, match=re.escape(refusal)):
                train_sae(cfg, out, **how)
        proc = _run(_cli("train-sae", "--resume", out, nproc=2))  # it ends: rank 1 does not wait for rank 0
        assert proc.returncode != 0
        assert proc.stderr.count(refusal) == 1, proc.stderr[-3000:]  # rank 0 refused; rank 1 never opened the dir
        assert _files(out) == before
    finally:
        for w in workers.values():
            w.send_signal(signal.SIGCONT)
        try:
            first.wait(timeout=STUCK_S)
        finally:
            if first.poll() is None:
                _kill(first, workers)
            log.close()
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    man = _manifest(out)
    assert man["status"] == "complete" and "resumed_at" not in man and not (out / LOCK).exists()
    assert (out / "config.yaml").read_bytes() == before["config.yaml"]


@dataclass
class _Cfg:
    x: int = 1


def _open_at_once(path, barrier, done, results):
    barrier.wait()
    real_getpid = os.getpid

    def slow_getpid():  # a loaded machine: a pause between a process's look at the lock and its write of one
        time.sleep(0.2)
        return real_getpid()

    os.getpid = slow_getpid  # in this forked child only
    try:
        run = RunDir.open(path, "s", _Cfg())
    except Exception as e:
        results.put(("refused" if isinstance(e, SaetuneError) else "error", f"{type(e).__name__}: {e}"))
        done.wait()
        return
    results.put(("won", real_getpid()))
    done.wait()  # alive until every contender has tried
    run.finish()


def test_processes_opening_one_fresh_dir_at_once_take_the_lock_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier, done, results = ctx.Barrier(n, timeout=60), ctx.Barrier(n, timeout=60), ctx.Queue()
    procs = [ctx.Process(target=_open_at_once, args=(tmp_path / "run", barrier, done, results)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=60) for _ in range(n)]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    winners = [v for k, v in got if k == "won"]
    assert len(winners) == 1, got
    for kind, msg in got:  # the others were refused: the lock was taken, or the dir already held the winner's run
        assert kind == "won" or (kind == "refused" and ("in use by process" in msg or "already holds" in msg)), msg


# ---- tune ----------------------------------------------------------------------------------------

def test_tune_rank_killed_after_a_checkpoint_resumes_to_the_uninterrupted_adapter(tmp_path):
    from saetune.config import load_config
    from saetune.tuning import TuneConfig, tune
    SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name="model.layers.2"), seed=0).save(tmp_path / "sae")
    flags = {"sae": tmp_path / "sae", "max_steps": 24, "max_examples": 120, "context_size": 48, "eval_seqs": 0,
             "checkpoint_every": 4, "log_every": 1}
    common = ["--config", "toy_tune", "--no-progress", *[a for k, v in flags.items()
                                                         for a in (f"--{k.replace('_', '-')}", v)]]
    out = tmp_path / "ddp"
    log = open(tmp_path / "ddp.log", "w")
    job = subprocess.Popen(_cli("tune", *common, "--batch-size", "1", "--out", out, nproc=2), env=ENV, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    workers: dict[int, psutil.Process] = {}
    try:
        _wait_for(lambda: (out / "checkpoints" / "latest.json").exists(), "checkpoint", job)
        workers = _workers(job)
        for w in workers.values():
            w.send_signal(signal.SIGSTOP)
        holder = int((out / LOCK).read_text())
        assert holder == workers[0].pid
        cfg = load_config(TuneConfig, "toy_tune", {**{k: str(v) if isinstance(v, Path) else v
                                                      for k, v in flags.items()}, "progress": False})
        with pytest.raises(SaetuneError, match=f"is in use by process {holder}"):  # a second tune on it refuses
            tune(cfg, out, resume=True)
        workers[1].kill()
        workers[0].send_signal(signal.SIGCONT)
        try:  # it ends: rank 0 does not wait on in a dead collective
            job.wait(timeout=STUCK_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the tune job still ran {STUCK_S} s after its rank 1 was killed")
    finally:
        if job.poll() is None:
            _kill(job, workers)
        log.close()
    assert job.returncode != 0, (tmp_path / "ddp.log").read_text()[-3000:]
    man = _manifest(out)
    assert man["status"] == "failed"  # a gloo error or torchrun's SIGTERM: either is recorded
    assert not (out / "adapter").exists()
    done = json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
    assert done % 4 == 0 and 4 <= done < 24

    proc = _run(_cli("tune", "--resume", out, nproc=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    man = _manifest(out)
    assert man["status"] == "complete" and len(man["resumed_at"]) == 1
    assert _steps(out) == list(range(1, 25))

    tune(replace(cfg, batch_size=2), tmp_path / "single")  # the same global batch of 2
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_tune_resume_on_another_world_size_must_keep_the_global_batch(tmp_path, monkeypatch):
    """A 1-process tune (global batch 2) killed after its step-4 checkpoint: resuming it on 2 processes with
    batch_size 2 (global batch 4) is refused before the run dir is touched, naming the --batch-size that keeps
    the global batch; with --batch-size 1 it resumes and ends with the uninterrupted adapter."""
    from saetune.config import load_config
    from saetune.tuning import SAETuner, TuneConfig, tune
    SAE(SAEConfig(d_in=128, d_sae=256, k=8, hook_name="model.layers.2"), seed=0).save(tmp_path / "sae")
    cfg = load_config(TuneConfig, "toy_tune", {"sae": str(tmp_path / "sae"), "max_steps": 8, "max_examples": 100,
                                               "context_size": 48, "eval_seqs": 0, "checkpoint_every": 2,
                                               "batch_size": 2, "log_every": 1, "progress": False})
    tune(cfg, tmp_path / "full")
    interrupted_run(monkeypatch, SAETuner, "loss", 5, tune, cfg, tmp_path / "killed")
    before = _files(tmp_path / "killed")
    proc = _run(_cli("tune", "--resume", tmp_path / "killed", nproc=2))
    assert proc.returncode != 0, "a resume that changes the global batch from 2 to 4 went on"
    assert "global batch of 2" in proc.stderr and "--batch-size 1" in proc.stderr, proc.stderr[-3000:]
    assert _files(tmp_path / "killed") == before
    proc = _run(_cli("tune", "--resume", tmp_path / "killed", "--batch-size", "1", nproc=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    rows = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[-1]["tokens"] == 8 * 2 * 48
    assert _manifest(tmp_path / "killed")["global_batch"] == 2
