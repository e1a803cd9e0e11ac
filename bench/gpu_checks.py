"""GPU checks and timings for saetune, to run beside the anchor scripts on one card.

    python bench/gpu_checks.py [ops] [sae_step] [capture]    # writes $OUT/gpu_checks.json as it goes

1. correctness: saetune's sparse TopK ops on CUDA vs the dense reference (values and grads);
2. one SAE training step (saetune SAETrainer.step, bf16 autocast like Resa) on PERF.md's config A
   and Resa's per-GPU shape, Adam and signum + schedule-free; median of 20 after 5 warm-ups;
3. activation capture on a Qwen2.5-1.5B-shaped random model (bf16): forward stopped at block 12
   with nothing kept vs writing the activation store (bf16 shards, checksums) — tokens/s.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

OUT = os.environ.get("OUT")
RES: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}


def dump():
    print(json.dumps(RES), flush=True)
    if OUT:
        Path(OUT, "gpu_checks.json").write_text(json.dumps(RES, indent=1))


def cuda_time(fn, steps=20, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(steps):
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def check_ops():
    from saetune.kernels.topk_sae import decode_dense, sparse_decode_torch, topk_encode_torch
    torch.manual_seed(0)
    B, d, n, k = 37, 96, 1000, 13
    x = torch.randn(B, d, device="cuda", requires_grad=True)
    W = torch.randn(d, n, device="cuda", requires_grad=True)
    b = torch.randn(n, device="cuda", requires_grad=True)
    Wd = torch.randn(n, d, device="cuda", requires_grad=True)
    g = torch.randn(B, d, device="cuda")
    v, i, _, _ = topk_encode_torch(x, W, b, k)
    out = sparse_decode_torch(v, i, Wd)
    out.backward(g)
    grads = [t.grad.clone() for t in (x, W, b, Wd)]
    for t in (x, W, b, Wd):
        t.grad = None
    pre = x @ W + b
    mask = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, i, True)
    acts = torch.where(mask, pre.relu(), torch.zeros_like(pre))
    ref = decode_dense(acts, Wd)
    ref.backward(g)
    errs = [float((a - t.grad).abs().max() / (t.grad.abs().max() + 1e-12)) for a, t in zip(grads, (x, W, b, Wd))]
    RES["ops_check"] = {"out_rel_err": float((out - ref).abs().max() / ref.abs().max()), "grad_rel_err": errs,
                        "ok": max(errs) < 1e-4}
    # the one-node TopK SAE the trainer uses, against the same dense reference (b_dec = 0 here)
    from saetune.kernels.topk_sae import topk_autoencode_torch
    for t in (x, W, b, Wd):
        t.grad = None
    bd = torch.zeros(d, device="cuda", requires_grad=True)
    xh, v2, i2 = topk_autoencode_torch(x, W, b, Wd, bd, k)
    xh.backward(g)
    fused = [t.grad.clone() for t in (x, W, b, Wd)]
    errs2 = [float((a - r).abs().max() / (r.abs().max() + 1e-12)) for a, r in zip(fused, grads)]
    RES["fused_check"] = {"same_selection": bool(torch.equal(i2.sort(-1).values, i.sort(-1).values)),
                          "out_rel_err": float((xh - out).abs().max() / out.abs().max()),
                          "grad_rel_err_vs_two_node": errs2, "ok": max(errs2) < 1e-4}
    dump()


def sae_step():
    from saetune.sae import SAE, SAEConfig
    from saetune.sae_trainer import SAETrainer, TrainSAEConfig
    rows = []
    for d, n, k, B in [(1536, 49152, 64, 4096), (1536, 65536, 32, 4096), (1536, 65536, 32, 32768)]:
        xs = [torch.randn(B, d, device="cuda") for _ in range(2)]
        for opt in ("adam", "signum_sf"):
            cfg = TrainSAEConfig(d_sae=[n], k=[k], optimizer=opt)
            t = SAETrainer("b", SAE(SAEConfig(d, n, k=k), seed=0).cuda(), cfg, "cuda")
            it = iter(range(10**9))
            try:
                ms = cuda_time(lambda: t.step(xs[next(it) % 2], torch.bfloat16))
                rows.append({"d_in": d, "d_sae": n, "k": k, "batch": B, "optimizer": opt, "ms": round(ms, 3),
                             "tok_s": round(B / ms * 1e3)})
            except Exception as e:  # record, keep going
                rows.append({"d_in": d, "d_sae": n, "k": k, "batch": B, "optimizer": opt, "error": repr(e)[:300]})
            RES["sae_step"] = rows
            dump()
            del t
            torch.cuda.empty_cache()


def capture():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from saetune.activations import write_store
    from saetune.models import resolve_hook, run_to_hooks
    cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    hp = resolve_hook(model, "model.layers.12")
    T, S, nseq = 2048, 16, 384
    chunks = torch.randint(0, cfg.vocab_size, (nseq, T))

    def bare():
        for b in range(0, nseq, S):
            run_to_hooks(model, chunks[b:b + S].cuda(), [hp])
        torch.cuda.synchronize()

    def store():
        d = Path(tempfile.mkdtemp())
        try:
            write_store(model, None, chunks, [hp], d / "acts", model_name="qwen2-1.5b-shape", dtype=torch.bfloat16,
                        batch_size=S, seqs_per_shard=32, progress=False)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    bare()
    tb, ts = [], []
    for _ in range(3):
        t0 = time.perf_counter(); bare(); tb.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); store(); ts.append(time.perf_counter() - t0)
    n_tok = nseq * T
    tb, ts = statistics.median(tb), statistics.median(ts)
    RES["capture"] = {"tokens": n_tok, "rounds": 3, "bare_forward_tok_s": round(n_tok / tb),
                      "cache_tok_s": round(n_tok / ts), "overhead_pct": round((ts / tb - 1) * 100, 1)}
    dump()


if __name__ == "__main__":
    import sys
    parts = {"ops": check_ops, "sae_step": sae_step, "capture": capture}
    chosen = [parts[a] for a in sys.argv[1:]] or list(parts.values())
    for part in chosen:
        try:
            part()
        except Exception as e:
            RES[part.__name__ + "_error"] = repr(e)[:500]
            dump()
