"""Scaling figures for BENCHMARKS.md's scaling note, on whatever machine runs it.

1. SAE training from one activation store with 1 process and with 2 processes under torchrun
   (gloo on CPU, NCCL on GPUs): tokens/s of the training phase.
2. Many SAEs per forward: on-the-fly training of 1 SAE vs 4 SAEs (2 hooks × 2 widths) from one
   stream of forwards, with and without the prefetch thread: SAE-tokens/s (tokens × SAEs / s).

    python bench/scaling.py            # prints a table last, writes bench/scaling.json
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_seconds(run_dir: Path) -> float:
    return json.loads((run_dir / "manifest.json").read_text())["phases"]["train"]


def main() -> None:
    from saetune.activations import CacheConfig, cache
    from saetune.train_sae import TrainSAEConfig, train_sae

    tmp = Path(tempfile.mkdtemp(prefix="saetune-scaling-"))
    examples = int(os.environ.get("EXAMPLES", "4000"))
    store = tmp / "cache"
    cache(CacheConfig(model="toy", hooks=["model.layers.2"], dataset="toy", max_examples=examples, context_size=128,
                      progress=False), store)
    rows = []
    base = ["--activations", str(store), "--hooks", "model.layers.2", "--d-sae", "4096", "--k", "32",
            "--batch-size", "2048", "--eval-seqs", "0", "--checkpoint-every", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for world in (1, 2):
        out = tmp / f"ddp{world}"
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
                     str(_port())] if world > 1 else [sys.executable])
        cmd = launcher + ["-m", "saetune.cli", "train-sae", *base, "--out", str(out)]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        man = json.loads((out / "manifest.json").read_text())
        tokens = man["results"]["model.layers.2"]["train_tokens"]
        rows.append({"what": f"train-sae from a store, {world} process(es), 1 thread each", "tokens": tokens,
                     "train_s": round(_train_seconds(out), 2), "tokens_per_s": round(tokens / _train_seconds(out)),
                     "wall_s": round(wall, 1)})
        (Path(__file__).with_name("scaling.json")).write_text(json.dumps(rows, indent=1))

    import torch
    torch.set_num_threads(2)
    for hooks, widths, pf in ((["model.layers.2"], [1024], 0), (["model.layers.1", "model.layers.2"], [512, 1024], 0),
                              (["model.layers.1", "model.layers.2"], [512, 1024], 2)):
        out = tmp / f"many-{len(hooks) * len(widths)}-{pf}"
        cfg = TrainSAEConfig(model="toy", dataset="toy", max_examples=examples, hooks=hooks, d_sae=widths, k=[16],
                             batch_size=1024, context_size=128, eval_seqs=0, checkpoint_every=0, prefetch=pf,
                             progress=False)
        res = train_sae(cfg, out)
        n_sae = len(res)
        tokens = next(iter(res.values()))["train_tokens"]
        s = _train_seconds(out)
        rows.append({"what": f"{n_sae} SAE(s) per forward (on the fly), prefetch {pf}", "tokens": tokens,
                     "train_s": round(s, 2), "tokens_per_s": round(tokens / s),
                     "sae_tokens_per_s": round(tokens * n_sae / s)})
        (Path(__file__).with_name("scaling.json")).write_text(json.dumps(rows, indent=1))
    print(f"\n{'what':<58} {'tokens':>8} {'train s':>8} {'tok/s':>8} {'SAE-tok/s':>10}")
    for r in rows:
        print(f"{r['what']:<58} {r['tokens']:>8} {r['train_s']:>8} {r['tokens_per_s']:>8} "
              f"{r.get('sae_tokens_per_s', ''):>10}")


if __name__ == "__main__":
    main()
