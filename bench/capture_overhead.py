"""Activation capture overhead: tokens/s of writing an activation store (forward to the hook,
copy to bf16, shard writes with checksums) vs the same model's forward stopped at the same
layer with nothing kept; plus bytes on disk per token.

    python bench/capture_overhead.py [MODEL_DIR]     # default: the shipped toy base
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from saetune.activations import write_store
from saetune.data import DataConfig, load_chunks
from saetune.models import load_model, resolve_hook, run_to_hooks

HOOK = "model.layers.2"
BATCH = 16


def main():
    model_name = sys.argv[1] if len(sys.argv) > 1 else "toy"
    model, tok = load_model(model_name, device="cpu")
    hp = resolve_hook(model, HOOK)
    chunks = load_chunks(DataConfig(dataset="toy", max_examples=4000, context_size=128), tok)
    n_tok = chunks.numel()

    def bare():
        for b in range(0, chunks.shape[0], BATCH):
            run_to_hooks(model, chunks[b:b + BATCH], [hp])

    def store():
        d = Path(tempfile.mkdtemp())
        try:
            s = write_store(model, tok, chunks, [hp], d / "acts", model_name=model_name, dtype=torch.bfloat16,
                            batch_size=BATCH, seqs_per_shard=64, progress=False)
            return s.manifest["bytes"]
        finally:
            shutil.rmtree(d, ignore_errors=True)

    bare()
    t_bare, t_store, nbytes = [], [], 0
    for _ in range(3):  # interleaved rounds
        t = time.perf_counter(); bare(); t_bare.append(time.perf_counter() - t)
        t = time.perf_counter(); nbytes = store(); t_store.append(time.perf_counter() - t)
    tb, ts = statistics.median(t_bare), statistics.median(t_store)
    r = {"model": model_name, "hook": HOOK, "tokens": n_tok, "threads": torch.get_num_threads(),
         "bare_forward_tok_s": round(n_tok / tb), "cache_tok_s": round(n_tok / ts),
         "overhead_pct": round((ts / tb - 1) * 100, 1), "bytes_per_token": round(nbytes / n_tok, 1),
         "values_per_token": model.config.hidden_size}
    print(json.dumps(r))


if __name__ == "__main__":
    main()
