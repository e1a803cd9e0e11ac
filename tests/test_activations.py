"""The activation store: contents, format, reading order, integrity checks, failures and resume."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import saetune.activations as A
from saetune.activations import ActivationStore, CacheConfig, cache, stream_batches
from saetune.data import load_chunks
from saetune.errors import SaetuneError
from saetune import io as sio
from saetune.models import load_model, resolve_hook, run_to_hooks
from saetune.runs import read_manifest

D = 128  # toy model width
CTX = 32
HOOKS = ["model.layers.1", "model.layers.3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def digest_matches(entry: dict, f: Path) -> bool:
    """A shard entry carries exactly one checksum (sha256, or the typed ``checksum``) and it matches the file."""
    keys = {"sha256", "checksum"} & entry.keys()
    assert len(keys) == 1, entry
    if "checksum" in entry:
        return entry["checksum"] == sio.checksum_file(f)
    return entry["sha256"] == sio.sha256_file(f)


def make_cfg(model_dir, **kw) -> CacheConfig:
    base = dict(model=str(model_dir), dataset="toy", max_examples=120, data_seed=0, context_size=CTX, hooks=HOOKS,
                batch_size=4, seqs_per_shard=8, progress=False, device="cpu")
    base.update(kw)
    return CacheConfig(**base)


@pytest.fixture(scope="module")
def store_run(tiny_model_dir, tmp_path_factory):
    cfg = make_cfg(tiny_model_dir)
    out = tmp_path_factory.mktemp("cache") / "run"
    summary = cache(cfg, out)
    return cfg, out, summary


@pytest.fixture(scope="module")
def store(store_run) -> ActivationStore:
    return ActivationStore(store_run[1])


@pytest.fixture(scope="module")
def all_rows(store):
    """Every token's activations in store order, float32, per hook."""
    return {h: torch.cat([store.load_shard(i, h)[h] for i in range(len(store.shards))]) for h in HOOKS}


# ---- contents and format ----------------------------------------------------------------------

def test_store_equals_run_to_hooks(store_run, store, tiny_model_dir):
    cfg = store_run[0]
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    chunks = load_chunks(cfg, tok)
    hps = [resolve_hook(model, h) for h in HOOKS]
    ref = {h: [] for h in HOOKS}
    for b in range(0, chunks.shape[0], 4):
        acts = run_to_hooks(model, chunks[b:b + 4], hps)
        for h in HOOKS:
            ref[h].append(acts[h].reshape(-1, D))
    got_ids = torch.cat([store.token_ids(i) for i in range(len(store.shards))])
    assert torch.equal(got_ids.long(), chunks.reshape(-1))
    for h in HOOKS:
        want = torch.cat(ref[h])
        got = torch.cat([store.load_shard(i, h, dtype=torch.float32)[h] for i in range(len(store.shards))])
        assert got.shape == want.shape == (chunks.numel(), D)
        # equal within bf16 rounding (8 significant bits)
        torch.testing.assert_close(got, want, rtol=2 ** -8, atol=1e-6)
        assert torch.equal(got, want.to(torch.bfloat16).float())
    # stored raw as bfloat16
    raw = load_file(str(store.path / store.shards[0]["file"]))
    assert raw[HOOKS[0]].dtype == torch.bfloat16 and raw["token_ids"].dtype == torch.int32


def test_two_bytes_per_value(store):
    total = 0
    for s in store.shards:
        f = store.path / s["file"]
        size = f.stat().st_size
        payload = s["n_tokens"] * (D * 2 * len(HOOKS) + 4)  # bf16 values + int32 token ids
        assert payload <= size < payload + 4096, (f, size, payload)  # only the safetensors header on top
        total += size
    assert store.manifest["bytes"] == total
    assert store.manifest["estimated_bytes"] == store.n_tokens * (D * 2 * len(HOOKS) + 4)


def test_manifest_fields(store_run, store, tiny_model_dir):
    cfg, out, summary = store_run
    m = store.manifest
    assert m["format"] == "saetune.activations"
    assert m["model"] == str(tiny_model_dir)
    assert m["hooks"] == {h: {"d": D} for h in HOOKS}
    assert m["dtype"] == "bfloat16" and store.dtype is torch.bfloat16
    assert m["context_size"] == CTX and m["complete"] is True and store.complete
    n_seqs = m["n_seqs_planned"]
    assert m["n_tokens"] == store.n_tokens == n_seqs * CTX
    assert len(m["shards"]) == -(-n_seqs // 8) >= 8
    seq = 0
    for i, s in enumerate(m["shards"]):
        assert s["file"] == f"shard_{i:05d}.safetensors"
        assert digest_matches(s, store.path / s["file"])
        assert s["seq_start"] == seq and s["n_tokens"] == (s["seq_end"] - s["seq_start"]) * CTX
        seq = s["seq_end"]
    assert seq == n_seqs
    assert m["data"]["dataset"] == "toy" and m["data"]["context_size"] == CTX
    run = read_manifest(out)
    assert run["status"] == "complete" and run["stage"] == "cache"
    assert run["artifacts"]["activations"]["n_tokens"] == store.n_tokens
    assert run["inputs"]["model"]["sha256"]
    assert summary["n_shards"] == len(m["shards"]) and summary["hooks"] == HOOKS
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert ActivationStore(store.path).manifest == m  # the store dir itself opens too


def test_several_hooks_from_one_forward(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    real = A.run_to_hooks

    def counting(model, ids, hooks, **kw):
        calls.append((ids.shape[0], [h.name for h in hooks]))
        return real(model, ids, hooks, **kw)

    monkeypatch.setattr(A, "run_to_hooks", counting)
    cfg = make_cfg(tiny_model_dir, max_examples=20, hooks=["model.layers.2", "blocks.0.hook_resid_post"])
    summary = cache(cfg, tmp_path / "run")
    n_seqs = summary["n_tokens"] // CTX
    assert len(calls) == -(-n_seqs // 4)  # one forward per batch, not one per hook
    assert all(names == ["model.layers.2", "model.layers.0"] for _, names in calls)
    store = ActivationStore(tmp_path / "run")
    assert store.hooks == ["model.layers.2", "model.layers.0"]
    a = store.load_shard(0, ["model.layers.2", "model.layers.0"])
    assert not torch.equal(a["model.layers.2"], a["model.layers.0"])


def test_stream_batches_match_store(store_run, store, tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    chunks = load_chunks(store_run[0], tok)
    hps = [resolve_hook(model, h) for h in HOOKS]
    batches = list(stream_batches(model, chunks[:14], hps, seqs_per_batch=4, start_batch=1))
    assert len(batches) == 2  # batches 1 and 2; the partial batch 3 is dropped
    first = store.load_shard(0, HOOKS)
    for h in HOOKS:
        assert batches[0][h].shape == (4 * CTX, D) and batches[0][h].dtype == torch.float32
        torch.testing.assert_close(batches[0][h], first[h][4 * CTX:8 * CTX], rtol=2 ** -8, atol=1e-6)


# ---- reading ----------------------------------------------------------------------------------

def sorted_rows(x: torch.Tensor) -> np.ndarray:
    a = x.numpy()
    return a[np.lexsort(a.T[::-1])]


def test_iter_batches_in_order(store, all_rows):
    bs = 100
    batches = list(store.iter_batches(HOOKS, bs, shuffle=False))
    assert len(batches) == store.n_batches(bs) == store.n_tokens // bs
    for h in HOOKS:
        got = torch.cat([b[h] for b in batches])
        assert torch.equal(got, all_rows[h][:len(batches) * bs])
        assert all(b[h].shape == (bs, D) for b in batches)


def test_iter_batches_shuffle_is_a_permutation(store, all_rows):
    bs = CTX  # divides n_tokens: nothing is dropped
    batches = list(store.iter_batches(HOOKS, bs, shuffle=True, seed=3, shuffle_window=4))
    got = {h: torch.cat([b[h] for b in batches]) for h in HOOKS}
    for h in HOOKS:
        assert got[h].shape == all_rows[h].shape
        assert not torch.equal(got[h], all_rows[h])  # really shuffled
        np.testing.assert_array_equal(sorted_rows(got[h]), sorted_rows(all_rows[h]))
    # the hooks stay aligned: a token's rows travel together
    pair = {a.numpy().tobytes(): b.numpy().tobytes() for a, b in zip(all_rows[HOOKS[0]], all_rows[HOOKS[1]])}
    assert all(pair[a.numpy().tobytes()] == b.numpy().tobytes() for a, b in zip(got[HOOKS[0]], got[HOOKS[1]]))
    # another seed, another order
    other = torch.cat([b[HOOKS[0]] for b in store.iter_batches(HOOKS[0], bs, shuffle=True, seed=4)])
    assert not torch.equal(other, got[HOOKS[0]])


def test_iter_batches_shuffle_with_drop_last(store, all_rows):
    bs = 100
    h = HOOKS[0]
    batches = list(store.iter_batches(h, bs, shuffle=True, seed=1, shuffle_window=3))
    assert len(batches) == store.n_tokens // bs
    available = collections.Counter(r.numpy().tobytes() for r in all_rows[h])
    used = collections.Counter(r.numpy().tobytes() for b in batches for r in b[h])
    assert sum(used.values()) == len(batches) * bs
    assert all(available[k] >= n for k, n in used.items())  # each token at most once


@pytest.mark.parametrize("shuffle", [True, False])
def test_start_batch_continues_the_stream(store, shuffle):
    bs, window = 48, 3  # 48 does not divide a shard's 256 tokens: batches straddle shards and windows
    full = list(store.iter_batches(HOOKS, bs, shuffle=shuffle, seed=7, shuffle_window=window))
    n = len(full)
    assert n == store.n_tokens // bs
    for b in (1, 5, 6, n // 2, n - 1, n):
        tail = list(store.iter_batches(HOOKS, bs, shuffle=shuffle, seed=7, shuffle_window=window, start_batch=b))
        assert len(tail) == n - b
        for x, y in zip(tail, full[b:]):
            for h in HOOKS:
                assert torch.equal(x[h], y[h])


def test_unknown_hook_in_store(store):
    with pytest.raises(SaetuneError, match="has no hook 'model.layers.2'; it holds: model.layers.1, model.layers.3"):
        next(store.iter_batches("model.layers.2", 8))


def test_not_a_store(tmp_path):
    with pytest.raises(SaetuneError, match="not an activation store"):
        ActivationStore(tmp_path)


# ---- integrity --------------------------------------------------------------------------------

@pytest.fixture
def store_copy(store, tmp_path) -> Path:
    dst = tmp_path / "activations"
    shutil.copytree(store.path, dst)
    return dst


def test_corrupted_shard_is_named(store_copy):
    f = store_copy / "shard_00002.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    s = ActivationStore(store_copy)
    s.load_shard(0, HOOKS[0])  # other shards still read
    with pytest.raises(SaetuneError) as e:
        s.load_shard(2, HOOKS[0])
    assert str(f) in str(e.value) and "corrupted" in str(e.value)
    with pytest.raises(SaetuneError, match="shard_00002.safetensors"):
        list(s.iter_batches(HOOKS[0], 64, shuffle=False))


def test_truncated_shard_is_named(store_copy):
    f = store_copy / "shard_00001.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 3])
    with pytest.raises(SaetuneError) as e:
        ActivationStore(store_copy).load_shard(1, HOOKS)
    assert str(f) in str(e.value) and "truncated" in str(e.value)
    # without the checksum, the reader itself notices
    with pytest.raises(SaetuneError) as e:
        ActivationStore(store_copy, verify=False).load_shard(1, HOOKS)
    assert str(f) in str(e.value)


def test_missing_shard_is_named(store_copy):
    (store_copy / "shard_00003.safetensors").unlink()
    with pytest.raises(SaetuneError, match="shard_00003.safetensors' is missing"):
        ActivationStore(store_copy).load_shard(3, HOOKS)


# ---- failures ---------------------------------------------------------------------------------

def test_nan_activations_name_the_batch(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from saetune.models import load_tokenizer
    from saetune.toy import examples

    # data where one word first shows up in a late record; its embedding row will be NaN
    rare = "162"
    texts = [e["text"] for e in examples(400, seed=0) if rare not in e["text"].split()]
    texts = texts[:60] + [f"User : compute {rare} . Assistant :"] + texts[60:100]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = make_cfg(tiny_model_dir, dataset=str(data), template="plain", max_examples=0)
    tok = load_tokenizer(str(tiny_model_dir))
    chunks = load_chunks(cfg, tok)
    tid = tok.convert_tokens_to_ids(rare)
    assert tid != tok.unk_token_id
    seq = int((chunks == tid).any(dim=1).nonzero()[0])
    assert seq >= 16, "the rare word should first appear after two shards"

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[tid] = float("nan")
    nan_dir = tmp_path / "nan_model"
    model.save_pretrained(nan_dir)
    tok.save_pretrained(nan_dir)

    out = tmp_path / "run"
    with pytest.raises(SaetuneError) as e:
        cache(make_cfg(nan_dir, dataset=str(data), template="plain", max_examples=0), out)
    b = seq // 4 * 4
    msg = str(e.value)
    assert "non-finite activations" in msg and f"sequences {b}…{b + 3}" in msg and "kept" in msg
    store_m = json.loads((out / "activations" / "manifest.json").read_text())
    assert len(store_m["shards"]) == seq // 8 and not store_m["complete"]  # the shards before it are kept
    assert all(digest_matches(s, out / "activations" / s["file"]) for s in store_m["shards"])
    run = read_manifest(out)
    assert run["status"] == "failed" and "non-finite" in run["error"]


def test_not_enough_disk_is_refused_before_writing(tiny_model_dir, tmp_path, monkeypatch):
    seen = []

    def tiny_disk(path):
        seen.append(path)
        return shutil._ntuple_diskusage(total=10 ** 6, used=10 ** 6 - 1000, free=1000)

    monkeypatch.setattr(A.shutil, "disk_usage", tiny_disk)
    out = tmp_path / "run"
    with pytest.raises(SaetuneError) as e:
        cache(make_cfg(tiny_model_dir, max_examples=20), out)
    msg = str(e.value)
    assert "not enough disk" in msg and "MiB" in msg and "free" in msg
    assert seen
    store_dir = out / "activations"
    assert not store_dir.exists() or list(store_dir.iterdir()) == []
    assert read_manifest(out)["status"] == "failed"


# ---- resume -----------------------------------------------------------------------------------

def shard_tensors(store_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f.name: load_file(str(f)) for f in sorted(store_dir.glob("shard_*.safetensors"))}


def assert_same_store(a: Path, b: Path) -> None:
    ma = json.loads((a / "manifest.json").read_text())
    mb = json.loads((b / "manifest.json").read_text())
    assert ma["shards"] == mb["shards"]  # files, ranges and checksums
    assert ma["complete"] and mb["complete"] and ma["n_tokens"] == mb["n_tokens"]
    ta, tb = shard_tensors(a), shard_tensors(b)
    assert ta.keys() == tb.keys() == {s["file"] for s in ma["shards"]}
    for name in ta:
        assert ta[name].keys() == tb[name].keys()
        for k in ta[name]:
            assert torch.equal(ta[name][k], tb[name][k]), (name, k)


def test_resume_in_process_after_a_simulated_kill(store_run, tmp_path):
    cfg, out, _ = store_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    st = run / "activations"
    m = json.loads((st / "manifest.json").read_text())
    # the kill came after shard 5's file was renamed into place but before the manifest listed it
    m["shards"] = m["shards"][:5]
    m["complete"] = False
    (st / "manifest.json").write_text(json.dumps(m))
    for f in sorted(st.glob("shard_*"))[7:]:
        f.unlink()
    (st / ".shard_00007.safetensors.abc.tmp").write_bytes(b"half a file")
    rm = read_manifest(run)
    rm["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(rm))
    cache(cfg, run, resume=True)
    assert_same_store(out / "activations", st)
    assert not list(st.glob(".shard_*"))
    rm = read_manifest(run)
    assert rm["status"] == "complete" and len(rm["resumed_at"]) == 1


def test_resume_with_other_settings_is_refused(store_run, tmp_path):
    cfg, out, _ = store_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    changed = make_cfg(cfg.model, seqs_per_shard=16)
    with pytest.raises(SaetuneError, match=r"seqs_per_shard: 8 -> 16"):
        cache(changed, run, resume=True)


def test_sigkill_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    args = ["--model", str(tiny_model_dir), "--dataset", "toy", "--max-examples", "300", "--data-seed", "1",
            "--context-size", str(CTX), "--hooks", "model.layers.3", "--batch-size", "2", "--seqs-per-shard", "2",
            "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    killed = tmp_path / "killed"
    # the run SIGKILLs itself once its manifest lists 2 shards (writer threads may hold more in flight)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "saetune.cli", "cache", *args, "--out", str(killed)],
                            env={**env, "SAETUNE_FAULT_AFTER_SHARDS": "2"}, stdout=log, stderr=subprocess.STDOUT)
    try:
        ref = tmp_path / "ref"  # the uninterrupted reference, same config, while the subprocess runs
        cfg = make_cfg(tiny_model_dir, max_examples=300, data_seed=1, hooks=["model.layers.3"], batch_size=2,
                       seqs_per_shard=2)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            n_shards = cache(cfg, ref)["n_shards"]
        finally:
            torch.set_num_threads(threads)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-2000:]
    mf = killed / "activations" / "manifest.json"
    assert len(json.loads(mf.read_text())["shards"]) == 2 < n_shards
    assert read_manifest(killed)["status"] == "running"  # a killed run had no chance to say anything

    res = subprocess.run([sys.executable, "-m", "saetune.cli", "cache", "--resume", str(killed)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert_same_store(ref / "activations", killed / "activations")
    m = read_manifest(killed)
    assert m["status"] == "complete" and len(m["resumed_at"]) == 1
    assert not (killed / ".lock").exists()
