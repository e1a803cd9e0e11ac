"""saetune.sae_trainer: Resa's Stage I trainer end to end on the toy model organism (CPU, small shapes).

Shapes: toy model (d_in 128), context 32, 256 tokens a step, d_sae 256, k 8.
"""

from __future__ import annotations

import os

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import json
import math
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from interrupt import interrupted_run
import torch
from safetensors.torch import load_file, save_file

import saetune.sae_trainer as train_mod
from saetune.activations import ActivationStore, CacheConfig, cache
from saetune.errors import SaetuneError
from saetune.runs import read_manifest, read_metrics
from saetune.sae import SAE, SAEConfig
from saetune.sae_trainer import TrainSAEConfig, train_sae

HOOK1, HOOK2 = "model.layers.1", "model.layers.2"
CTX, BATCH, D_SAE, K = 32, 256, 256, 8
N_EXAMPLES = 300  # ≈ 11.5k tokens ≈ 44 steps of 256


# ---- fixtures: a random toy model and an activation store, built once ---------------------------

@pytest.fixture(scope="session")
def store_dir(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "cache"
    cache(CacheConfig(model=str(tiny_model_dir), hooks=[HOOK1, HOOK2], context_size=CTX, max_examples=N_EXAMPLES,
                      seqs_per_shard=16, dtype="float32", device="cpu", progress=False), out=out)
    return out


def cfg_for(model_dir: Path, store: Path | None, **kw) -> TrainSAEConfig:
    base = dict(model=str(model_dir), activations=str(store) if store else "", hooks=[HOOK1], d_sae=[D_SAE],
                k=[K], batch_size=BATCH, context_size=CTX, max_examples=N_EXAMPLES, log_every=1,
                checkpoint_every=0, eval_seqs=0, device="cpu", progress=False)
    base.update(kw)
    return TrainSAEConfig(**base)


def fvu_drop(rows: list[dict], key: str = "fvu") -> tuple[float, float]:
    """(first logged FVU, mean of the last five)."""
    vals = [r[key] for r in rows]
    return vals[0], sum(vals[-5:]) / 5


RESULT_KEYS = ("fvu", "l0", "dead_frac", "ce_clean", "ce_spliced", "ce_zero", "ce_loss_recovered", "kl_spliced")


def check_results(r: dict, k: int, max_fvu: float = 1.0) -> None:
    for key in RESULT_KEYS:
        assert key in r, key
        assert math.isfinite(r[key]), (key, r[key])
    assert 0 < r["fvu"] < max_fvu
    assert 0 < r["l0"] <= k + 1e-6
    assert 0 <= r["dead_frac"] <= 1
    assert r["kl_spliced"] > 0  # an imperfect reconstruction (FVU > 0) moves the next-token distribution
    # splicing a reconstruction in cannot make a (random) model much better than clean
    assert r["ce_spliced"] >= r["ce_clean"] - 0.05
    # (CE_zero − CE_spliced) / (CE_zero − CE_clean), from the three CEs reported beside it (each rounded to 1e-6)
    want = (r["ce_zero"] - r["ce_spliced"]) / (r["ce_zero"] - r["ce_clean"])
    assert r["ce_loss_recovered"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert r["n_eval_tokens"] > 0


# ---- training reduces FVU ------------------------------------------------------------------------

def test_train_from_store(tiny_model_dir, store_dir, tmp_path):
    out = tmp_path / "run"
    results = train_sae(cfg_for(tiny_model_dir, store_dir, eval_seqs=8), out=out)
    rows = read_metrics(out)
    n_steps = ActivationStore(store_dir).n_tokens // BATCH
    assert [r["step"] for r in rows] == list(range(1, n_steps + 1))
    assert [r["tokens"] for r in rows] == [BATCH * s for s in range(1, n_steps + 1)]
    for r in rows:
        assert {"fvu", "l0", "dead_frac", "loss", "mse"} <= r.keys()
    first, last = fvu_drop(rows)
    assert last < 0.6 * first, (first, last)

    assert json.loads((out / "results.json").read_text()) == results
    check_results(results[HOOK1], K)
    assert results[HOOK1]["train_tokens"] == n_steps * BATCH
    assert "averaged" in results[HOOK1]["weights"]
    m = read_manifest(out)
    assert m["status"] == "complete"
    assert m["artifacts"]["sae:" + HOOK1]["path"] == "sae"
    assert not (out / "checkpoints").exists()
    sae = SAE.load(out)
    assert sae.cfg.hook_name == HOOK1 and sae.cfg.k == K and sae.d_sae == D_SAE and sae.d_in == 128


def test_train_on_the_fly(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    results = train_sae(cfg_for(tiny_model_dir, None, eval_seqs=8), out=out)  # one pass, ≈ 50 steps
    rows = read_metrics(out)
    assert len(rows) >= 40
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["tokens"] for r in rows] == [BATCH * r["step"] for r in rows]
    first, last = fvu_drop(rows)
    assert last < 0.6 * first, (first, last)
    check_results(results[HOOK1], K)
    assert read_manifest(out)["status"] == "complete"


def test_spliced_ce_lies_between_clean_and_zero_ablation_on_the_trained_toy(toy_store, tmp_path):
    """On a model that has learnt its text (the shipped toy; the random model's CE barely depends on the
    activation), a trained SAE's reconstruction costs some CE but far less than zeros: 0 < recovered ≤ 1."""
    hook = "model.layers.2"
    r = train_sae(cfg_for("toy", toy_store, hooks=[hook], context_size=64, total_tokens=20 * BATCH, eval_seqs=8),
                  out=tmp_path / "run")[hook]
    check_results(r, K)
    assert r["ce_clean"] < r["ce_spliced"] < r["ce_zero"], r
    assert r["ce_zero"] - r["ce_clean"] > 1.0, r  # the toy needs its layer-2 residual stream
    assert 0.5 < r["ce_loss_recovered"] <= 1.0, r


def test_on_the_fly_batch_must_be_whole_sequences(tiny_model_dir, tmp_path):
    with pytest.raises(SaetuneError, match=r"batch_size \(250 tokens\).*context_size \(32\)"):
        train_sae(cfg_for(tiny_model_dir, None, batch_size=250), out=tmp_path / "run")


# ---- Stage I details: b_dec init, decoder norms, schedule-free averaging ----------------------------------

def test_b_dec_is_first_batch_mean(tiny_model_dir, store_dir, tmp_path):
    first = next(ActivationStore(store_dir).iter_batches([HOOK1], BATCH, shuffle=False))[HOOK1]
    mean = first.mean(0)
    assert mean.abs().max() > 1e-2  # a zero b_dec would not pass by accident
    cfg = cfg_for(tiny_model_dir, store_dir, optimizer="adam", lr=1e-12, total_tokens=BATCH)
    train_sae(cfg, out=tmp_path / "mean")
    sae = SAE.load(tmp_path / "mean")
    torch.testing.assert_close(sae.b_dec.detach(), mean, atol=1e-6, rtol=0)

    train_sae(replace(cfg, init_b_dec="zero"), out=tmp_path / "zero")
    assert SAE.load(tmp_path / "zero").b_dec.abs().max() < 1e-6


def test_decoder_rows_stay_unit_norm(tiny_model_dir, store_dir, tmp_path):
    cfg = cfg_for(tiny_model_dir, store_dir, optimizer="adam", lr=3e-3, total_tokens=15 * BATCH)
    train_sae(cfg, out=tmp_path / "run")
    sae = SAE.load(tmp_path / "run")
    init = SAE(SAEConfig(d_in=128, d_sae=D_SAE, k=K), seed=cfg.seed)
    assert (sae.W_dec - init.W_dec).abs().max() > 1e-2  # the decoder did train
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-5, rtol=0)


def test_signum_sf_saves_averaged_weights(tiny_model_dir, store_dir, tmp_path, monkeypatch):
    captured = {}
    real = train_mod.evaluate_saes

    def spy(source, trainers, cfg, *a, **kw):
        # called right after the save: parameters as the trainer left them, optimiser still attached
        captured["trainer"] = trainers[0][1]
        captured["params"] = {k: v.clone() for k, v in trainers[0][1].sae.state_tensors().items()}
        return real(source, trainers, cfg, *a, **kw)

    monkeypatch.setattr(train_mod, "evaluate_saes", spy)
    out = tmp_path / "run"
    train_sae(cfg_for(tiny_model_dir, store_dir, total_tokens=12 * BATCH), out=out)
    t = captured["trainer"]
    assert type(t.opt).__name__ == "ScheduleFreeWrapper" and t.opt.train_mode is False  # opt.eval() ran
    saved = SAE.load(out).state_tensors()
    for name, p in captured["params"].items():
        assert torch.equal(saved[name], p), name
    t.opt.train()  # back to the un-averaged y sequence
    y = t.sae.state_tensors()
    diff = max(float((saved[n] - y[n]).abs().max()) for n in ("W_enc", "W_dec", "b_enc", "b_dec"))
    assert diff > 1e-4, "the saved SAE is the un-averaged y sequence"
    # y has unit decoder rows (renormalised every step); the average x need not
    torch.testing.assert_close(y["W_dec"].norm(dim=1), torch.ones(D_SAE), atol=1e-5, rtol=0)


# ---- several SAEs from one run ------------------------------------------------------------------

def test_several_saes_in_one_run(tiny_model_dir, store_dir, tmp_path):
    out = tmp_path / "run"
    results = train_sae(cfg_for(tiny_model_dir, store_dir, hooks=[HOOK1, HOOK2], k=[4, 8], eval_seqs=4,
                                total_tokens=10 * BATCH), out=out)
    names = {f"{h}.w{D_SAE}.k{k}": (h, k) for h in (HOOK1, HOOK2) for k in (4, 8)}
    assert set(results) == set(names)
    assert json.loads((out / "results.json").read_text()) == results
    assert {p.name for p in (out / "sae").iterdir() if p.is_dir()} == set(names)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    weights = []
    for name, (hook, k) in names.items():
        assert (out / "sae" / name / "cfg.json").exists()
        assert (out / "sae" / name / "sae_weights.safetensors").exists()
        r = results[name]
        assert r["hook"] == hook and r["k"] == k and r["d_sae"] == D_SAE
        check_results(r, k, max_fvu=3.0)  # 10 steps: not yet below 1 on held-out text
        sae = SAE.load(out, hook=name)
        assert sae.cfg.hook_name == hook and sae.cfg.k == k
        weights.append(sae.W_enc)
        for key in ("fvu", "l0", "dead_frac"):
            assert f"{name}/{key}" in rows[0]
        assert all(r[f"{name}/l0"] <= k for r in rows)
    assert all(not torch.equal(weights[0], w) for w in weights[1:])
    with pytest.raises(SaetuneError, match="several hooks"):
        SAE.load(out)


# ---- AuxK ----------------------------------------------------------------------------------------------

def test_auxk_changes_training_and_is_logged(tiny_model_dir, store_dir, tmp_path):
    common = dict(total_tokens=10 * BATCH, dead_tokens=BATCH)  # not firing in one batch = dead
    train_sae(cfg_for(tiny_model_dir, store_dir, **common), out=tmp_path / "off")
    train_sae(cfg_for(tiny_model_dir, store_dir, auxk_coef=1 / 32, **common), out=tmp_path / "on")
    off, on = read_metrics(tmp_path / "off"), read_metrics(tmp_path / "on")
    assert all("auxk" not in r for r in off)
    assert any(r["dead_frac"] > 0 for r in on)
    aux = [r["auxk"] for r in on if "auxk" in r]
    assert len(aux) >= len(on) - 1 and all(math.isfinite(a) and a > 0 for a in aux)
    assert on[0]["fvu"] == off[0]["fvu"]  # identical until AuxK has dead latents to use
    assert any(a["fvu"] != b["fvu"] for a, b in zip(on[2:], off[2:]))
    s_off, s_on = SAE.load(tmp_path / "off"), SAE.load(tmp_path / "on")
    assert (s_on.W_enc - s_off.W_enc).abs().max() > 1e-3
    with pytest.raises(SaetuneError, match=r"AuxK.*topk"):
        cfg_for(tiny_model_dir, store_dir, architecture="standard", auxk_coef=0.1)


# ---- every architecture trains ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["topk", "batchtopk", "standard", "jumprelu"])
def test_every_architecture_trains(arch, tiny_model_dir, store_dir, tmp_path):
    out = tmp_path / arch
    results = train_sae(cfg_for(tiny_model_dir, store_dir, architecture=arch, total_tokens=6 * BATCH), out=out)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["fvu"]) for r in rows)
    assert results[HOOK1]["architecture"] == arch
    sae = SAE.load(out)
    assert sae.cfg.architecture == arch
    x = next(ActivationStore(store_dir).iter_batches([HOOK1], 64, shuffle=False))[HOOK1]
    with torch.no_grad():
        assert torch.isfinite(sae(x)).all()
    if arch == "batchtopk":
        assert (sae.threshold > 0).any()  # the inference threshold was learned
    if arch in ("topk", "batchtopk"):
        assert all(r["l0"] <= K + 1e-6 for r in rows)


# ---- NaN in the data, and resume refusals ------------------------------------------------------------

def _poison_store(src: Path, dst: Path, shard: int, row: int) -> None:
    """Copy a store and put one NaN in a shard, keeping the manifest's checksum valid."""
    shutil.copytree(src, dst)
    store = dst / "activations"
    mf = json.loads((store / "manifest.json").read_text())
    entry = mf["shards"][shard]
    f = store / entry["file"]
    tensors = load_file(str(f))
    tensors[HOOK1][row, 3] = float("nan")
    save_file(tensors, str(f))
    if "checksum" in entry:
        from saetune.io import checksum_file
        entry["checksum"] = checksum_file(f)
    else:
        from saetune.io import sha256_file
        entry["sha256"] = sha256_file(f)
    (store / "manifest.json").write_text(json.dumps(mf))


def test_nan_stops_and_keeps_last_good_checkpoint(tiny_model_dir, store_dir, tmp_path):
    bad = tmp_path / "bad_store"
    # shards hold 16 × 32 = 512 tokens = 2 batches: shard 3, row 0 is the first token of step 7
    _poison_store(store_dir, bad, shard=3, row=0)
    out = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, bad, checkpoint_every=2, keep_checkpoints=2)
    with pytest.raises(SaetuneError, match=r"non-finite loss.*at step 7.*\(step 6\)"):
        train_sae(cfg, out=out)
    m = read_manifest(out)
    assert m["status"] == "failed"
    assert "step 7" in m["error"]
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 6
    ckpt = out / "checkpoints" / latest["dir"]
    w = load_file(str(ckpt / "0.sae.safetensors"))
    assert all(torch.isfinite(t).all() for t in w.values())
    # the training iterate keeps unit decoder rows
    torch.testing.assert_close(w["W_dec"].norm(dim=1), torch.ones(D_SAE), atol=1e-5, rtol=0)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_0000004", "step_0000006"]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 7))
    assert not (out / "sae").exists() and not (out / "results.json").exists()

    # resuming with a changed config is refused, naming the key; the run dir is left alone
    for change, key in (({"k": [4]}, "k"), ({"lr": 1e-3}, "lr"), ({"architecture": "batchtopk"}, "architecture")):
        with pytest.raises(SaetuneError, match=rf"changed config \({key}: "):
            train_sae(replace(cfg, **change), out=out, resume=True)
    assert read_manifest(out)["status"] == "failed"
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 6


def test_existing_dir_refused_without_resume(tiny_model_dir, store_dir, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, store_dir, total_tokens=2 * BATCH)
    train_sae(cfg, out=out)
    with pytest.raises(SaetuneError, match=r"already holds a 'train-sae' run.*--resume.*--overwrite"):
        train_sae(cfg, out=out)


# ---- SIGKILL and resume -----------------------------------------------------------------------------------

SIGKILL_STEPS = 24


def _cli(store: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "saetune.cli", "train-sae", "--activations", str(store), "--hooks", HOOK1,
            "--d-sae", str(D_SAE), "--k", str(K), "--batch-size", str(BATCH), "--context-size", str(CTX),
            "--total-tokens", str(SIGKILL_STEPS * BATCH), "--checkpoint-every", "2", "--log-every", "1",
            "--eval-seqs", "0", "--device", "cpu", "--no-progress", "--seed", "3", "--out", str(out)]


def test_sigkill_then_resume_equals_uninterrupted(store_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SPARSIFY_DISABLE_TRITON": "1",
           "HF_HUB_OFFLINE": "1"}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    kw = dict(env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ref_p = subprocess.Popen(_cli(store_dir, ref), **kw)  # the uninterrupted run, same seed
    # the run SIGKILLs itself as step 6 starts (the fault injection of sae_trainer): the checkpoint of step 4
    # is whole and step 5 is logged past it, so the resume must drop and redo that row
    victim = subprocess.Popen(_cli(store_dir, killed), **{**kw, "env": {**env, "SAETUNE_FAULT_KILL_RANK": "0",
                                                                        "SAETUNE_FAULT_AT_STEP": "6"}})
    try:
        _, err = victim.communicate(timeout=300)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.communicate()
    assert victim.returncode == -signal.SIGKILL, err[-2000:]
    assert not (killed / "results.json").exists(), "the run finished before it was killed"
    assert read_manifest(killed)["status"] == "running"
    ckpt_step = json.loads((killed / "checkpoints" / "latest.json").read_text())["step"]
    killed_at = max(r["step"] for r in read_metrics(killed))
    assert (ckpt_step, killed_at) == (4, 5)
    with open(killed / "metrics.jsonl", "a") as f:  # and a row cut in half by the kill
        f.write('{"step": %d, "tokens": ' % (killed_at + 1))

    res = subprocess.run([sys.executable, "-m", "saetune.cli", "train-sae", "--resume", str(killed)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    _, err_ref = ref_p.communicate(timeout=300)
    assert ref_p.returncode == 0, err_ref[-3000:]
    assert res.returncode == 0, res.stderr[-3000:]

    m = read_manifest(killed)
    assert m["status"] == "complete" and m.get("resumed_at")
    a = load_file(str(ref / "sae" / "sae_weights.safetensors"))
    b = load_file(str(killed / "sae" / "sae_weights.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), (name, float((a[name] - b[name]).abs().max()))
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]  # every line whole JSON: the cut row is gone
    assert steps == list(range(1, SIGKILL_STEPS + 1)), "metrics.jsonl must hold each step once"
    for ra, rb in zip(read_metrics(ref), read_metrics(killed)):
        assert ra["step"] == rb["step"] and ra["tokens"] == rb["tokens"]
        assert abs(ra["fvu"] - rb["fvu"]) <= 1e-6, (ra["step"], ra["fvu"], rb["fvu"])
    assert json.loads((ref / "results.json").read_text())[HOOK1]["train_tokens"] == \
        json.loads((killed / "results.json").read_text())[HOOK1]["train_tokens"] == SIGKILL_STEPS * BATCH


def test_interrupted_adam_run_resumes_exactly(tiny_model_dir, store_dir, tmp_path, monkeypatch):
    """In-process twin of the SIGKILL test for Adam (whose state holds a step tensor): Ctrl-C at step 5."""
    cfg = cfg_for(tiny_model_dir, store_dir, optimizer="adam", auxk_coef=1 / 32, dead_tokens=BATCH,
                  checkpoint_every=2, total_tokens=10 * BATCH)
    train_sae(cfg, out=tmp_path / "ref")

    interrupted_run(monkeypatch, train_mod.SAETrainer, "step", 5, train_sae, cfg, out=tmp_path / "cut")
    m = read_manifest(tmp_path / "cut")
    assert m["status"] == "failed" and m["error"] == "interrupted"
    assert json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())["step"] == 4

    train_sae(cfg, out=tmp_path / "cut", resume=True)
    a = load_file(str(tmp_path / "ref" / "sae" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "cut" / "sae" / "sae_weights.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == list(range(1, 11))
    ref_rows, cut_rows = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "cut")
    for ra, rc in zip(ref_rows, cut_rows):  # the dead-latent counters were restored too
        assert ("auxk" in ra) == ("auxk" in rc)
        assert ra.get("auxk", 0) == pytest.approx(rc.get("auxk", 0), abs=1e-5)
        assert ra["fvu"] == pytest.approx(rc["fvu"], abs=1e-5)
