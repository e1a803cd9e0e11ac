"""saetune.runs.Checkpoints (the one checkpoint writer/reader) and ``with run:`` (the one failure record)."""

import json
import os
import random
import signal
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from saetune import runs
from saetune.errors import SaetuneError
from saetune.runs import Checkpoints, RunDir, read_manifest


@dataclass
class Cfg:
    x: int = 1


def _draws() -> tuple[list[float], float, float]:
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def _opt_with_state() -> torch.optim.Optimizer:
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn(5, 3)
    opt.step()
    return opt


def test_roundtrip_restores_tensors_meta_optimizer_and_every_rng(tmp_path):
    ck = Checkpoints(tmp_path, keep=2)
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    opt = _opt_with_state()
    torch.manual_seed(11), random.seed(12), np.random.seed(13)
    d = ck.save(7, {"weights": weights, "state": {"counter": torch.tensor([4.0])}}, {"tokens": 99, "cursor": 5},
                optimizers={"optim": opt}, rng=True)
    expected = _draws()  # what the generators give right after the save
    _draws(), torch.manual_seed(0), random.seed(0), np.random.seed(0)  # move every generator elsewhere

    assert d == tmp_path / "checkpoints" / "step_0000007" and ck.latest() == d
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text()) == {"step": 7, "dir": "step_0000007"}
    got = ck.load()
    assert got.step == 7 and got.meta["tokens"] == 99 and got.meta["cursor"] == 5
    for k, v in weights.items():
        assert torch.equal(got.tensors("weights")[k], v)
    assert torch.equal(got.tensors("state")["counter"], torch.tensor([4.0]))
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(5, 3))], lr=0.5)
    got.load_optimizer(fresh, "optim")
    a, b = opt.state_dict(), fresh.state_dict()
    assert b["param_groups"][0]["lr"] == 0.1 and list(b["param_groups"][0]["betas"]) == [0.9, 0.999]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(a["state"][0][key], b["state"][0][key])
    got.restore_rng()
    assert _draws() == expected


def test_checkpoint_with_torch_rng_only_restores_it(tmp_path):
    """Checkpoints written before python/numpy RNG were saved hold ``torch_rng`` alone in state.safetensors."""
    from safetensors.torch import save_file
    d = tmp_path / "checkpoints" / "step_0000002"
    d.mkdir(parents=True)
    torch.manual_seed(5)
    save_file({"torch_rng": torch.get_rng_state()}, str(d / "state.safetensors"))
    (d / "state.json").write_text(json.dumps({"step": 2, "tokens": 8}))
    (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": d.name}))
    expected = torch.rand(3)
    torch.manual_seed(6)
    Checkpoints(tmp_path).load().restore_rng()
    assert torch.equal(torch.rand(3), expected)


def test_no_checkpoint_loads_none(tmp_path):
    assert Checkpoints(tmp_path).latest() is None and Checkpoints(tmp_path).load() is None


@pytest.mark.parametrize("keep, left", [(2, [4, 5]), (1, [5]), (0, [1, 2, 3, 4, 5])])
def test_pruning_keeps_the_newest_keep(tmp_path, keep, left):
    ck = Checkpoints(tmp_path, keep=keep)
    for step in range(1, 6):
        ck.save(step, {"w": {"x": torch.full((2,), float(step))}})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == [f"step_{s:07d}" for s in left]
    assert ck.load().step == 5 and torch.equal(ck.load().tensors("w")["x"], torch.full((2,), 5.0))


@pytest.mark.parametrize("keep", [-1, 1.5, True])
def test_bad_keep_is_named(tmp_path, keep):
    with pytest.raises(SaetuneError, match="keep_checkpoints"):
        Checkpoints(tmp_path, keep=keep)


def test_crash_before_the_rename_leaves_the_previous_latest(tmp_path, monkeypatch):
    ck = Checkpoints(tmp_path, keep=2)
    ck.save(2, {"w": {"x": torch.ones(3)}}, {"tokens": 1})
    real = runs.atomic_replace_dir

    def killed(tmp, final):
        assert (tmp / "w.safetensors").exists() and (tmp / "state.json").exists()  # the new one is written whole
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "atomic_replace_dir", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save(4, {"w": {"x": torch.zeros(3)}}, {"tokens": 2})
    assert ck.latest().name == "step_0000002" and not (tmp_path / "checkpoints" / "step_0000004").exists()
    assert torch.equal(ck.load().tensors("w")["x"], torch.ones(3)) and ck.load().meta["tokens"] == 1
    monkeypatch.setattr(runs, "atomic_replace_dir", real)
    ck.save(4, {"w": {"x": torch.zeros(3)}}, {"tokens": 2})  # the next try replaces the half-written temp dir
    assert ck.load().step == 4 and not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_crash_before_latest_json_leaves_the_previous_latest(tmp_path, monkeypatch):
    ck = Checkpoints(tmp_path, keep=1)
    ck.save(2, {"w": {"x": torch.ones(3)}})
    real = runs.atomic_write_json

    def killed_on_latest(path, obj):
        if path.name == "latest.json":
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(runs, "atomic_write_json", killed_on_latest)
    with pytest.raises(KeyboardInterrupt):
        ck.save(3, {"w": {"x": torch.zeros(3)}})
    assert ck.load().step == 2 and (tmp_path / "checkpoints" / "step_0000002").exists()  # not pruned either


def _failing_run(tmp_path, name, raise_it):
    with pytest.raises(BaseException) as e:
        with RunDir.open(tmp_path / name, "s", Cfg()) as run:
            assert run.path == tmp_path / name
            raise_it()
    return read_manifest(tmp_path / name), e.value


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises before this ends


def _raising(exc: BaseException):
    def raise_it():
        raise exc
    return raise_it


@pytest.mark.parametrize("raise_it, error, kind", [
    (_raising(ValueError("bad value 3")), "bad value 3", ValueError),
    (_raising(RuntimeError()), "RuntimeError", RuntimeError),  # no message: its type
    (_raising(KeyboardInterrupt()), "interrupted", KeyboardInterrupt),  # Ctrl-C
    (_sigterm, "terminated by SIGTERM", KeyboardInterrupt),
])
def test_with_run_records_failure_as_fail_with(tmp_path, raise_it, error, kind):
    before = signal.getsignal(signal.SIGTERM)
    m, exc = _failing_run(tmp_path, "run", raise_it)
    assert type(exc) is kind  # raised again, unchanged
    assert m["status"] == "failed" and m["error"] == error and m["end_time"]
    assert not (tmp_path / "run" / ".lock").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    other = RunDir.open(tmp_path / "direct", "s", Cfg())  # the same record as fail_with writes
    other.fail_with(exc)
    assert read_manifest(tmp_path / "direct")["error"] == m["error"]


def test_with_run_leaves_a_finished_run_alone(tmp_path):
    with RunDir.open(tmp_path / "run", "s", Cfg()) as run:
        run.finish(results={"a": 1})
    m = read_manifest(tmp_path / "run")
    assert m["status"] == "complete" and "error" not in m and m["results"] == {"a": 1}


def test_toy_build_resumes_from_an_older_builds_checkpoint_dir(tmp_path, monkeypatch):
    """A build interrupted before the toy used Checkpoints kept ``checkpoint/`` (the same files); --resume takes it
    and ends with the uninterrupted build's weights."""
    import shutil

    from saetune.toy import ToyBuildConfig, build_toy
    from saetune.toy import build as toy_build
    cfg = ToyBuildConfig(seed=0, steps=2, eval_problems=4, eval_every=1, threads=1)
    build_toy(cfg, tmp_path / "ref", progress=False)
    real, calls = toy_build.response_loss, []

    def interrupt_at_step_2(model, groups):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, groups)

    monkeypatch.setattr(toy_build, "response_loss", interrupt_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        build_toy(cfg, tmp_path / "run", progress=False)
    assert read_manifest(tmp_path / "run")["error"] == "interrupted"
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest.json", "step_0000001"]
    shutil.move(ckpts / "step_0000001", tmp_path / "run" / "checkpoint")  # the older layout
    shutil.rmtree(ckpts)
    resumed = []
    monkeypatch.setattr(toy_build, "response_loss", lambda model, groups: (resumed.append(1), real(model, groups))[1])
    build_toy(cfg, tmp_path / "run", resume=True, progress=False)
    assert len(resumed) == 1  # only step 2 ran again: step 1 came from checkpoint/
    assert ((tmp_path / "run" / "model" / "model.safetensors").read_bytes()
            == (tmp_path / "ref" / "model" / "model.safetensors").read_bytes())
    assert [json.loads(r)["step"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
