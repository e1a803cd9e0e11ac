"""Scaling figures for BENCHMARKS.md's scaling note, on whatever machine runs it.

1. SAE training from one activation store with 1 process and with 2 processes under torchrun
   (gloo on CPU, NCCL on GPUs): tokens/s of the training phase.
2. Many SAEs per forward: on-the-fly training of 1 SAE vs 4 SAEs (2 hooks × 2 widths) from one
   stream of forwards, with and without the prefetch thread: SAE-tokens/s (tokens × SAEs / s).
3. SAE-Tuning of the toy (``toy_tune``): 1 process vs 2 processes under DDP (torchrun), FSDP2 and
   DeepSpeed ZeRO-2 (``accelerate launch`` with the CPU test configs; on GPUs use the GPU ones),
   the same global batch: tokens/s of the training phase.

    python bench/scaling.py            # prints a table last, writes bench/scaling.json
    PARTS=tune python bench/scaling.py # only part 3 (PARTS: any of sae, many, tune; comma-separated)
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



def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_seconds(run_dir: Path) -> float:
    return json.loads((run_dir / "manifest.json").read_text())["phases"]["train"]


def _tune_rows(tmp: Path, env: dict) -> list[dict]:
    """Part 3: ``saetune tune`` on the toy, one launch per engine, global batch 8 × 128 tokens."""
    from saetune.sae import SAE, SAEConfig
    recipes = Path(__file__).resolve().parents[1] / "saetune" / "recipes" / "accelerate"
    SAE(SAEConfig(d_in=128, d_sae=1024, k=16, hook_name="model.layers.2"), seed=0).save(tmp / "tune-sae")
    steps = os.environ.get("TUNE_STEPS", "40")
    args = ["--config", "toy_tune", "--sae", str(tmp / "tune-sae"), "--max-steps", steps, "--eval-seqs", "0",
            "--checkpoint-every", "0", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    launches = {
        "1 process, batch 8": ([sys.executable], ["--batch-size", "8"]),
        "2 processes, DDP (torchrun), batch 4 each": (torchrun + [str(_port())], ["--batch-size", "4"]),
        "2 processes, FSDP2 (accelerate), batch 4 each": (
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(recipes / "fsdp_cpu_test.yaml"),
             "--main_process_port", str(_port())], ["--batch-size", "4"]),
        "2 processes, ZeRO-2 (accelerate), batch 4 each": (
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(recipes / "deepspeed_zero2_cpu_test.yaml"), "--main_process_port", str(_port())], ["--batch-size", "4"]),
    }
    rows = []
    for name, (launcher, extra) in launches.items():
        out = tmp / ("tune-" + name.split(",")[0].replace(" ", "") + str(len(rows)))
        subprocess.run(launcher + ["-m", "saetune.cli", "tune", *args, *extra, "--out", str(out)], env=env, check=True,
                       capture_output=True)
        res = json.loads((out / "results.json").read_text())
        rows.append({"what": f"tune (toy_tune), {name}", "tokens": res["tokens"], "train_s": round(_train_seconds(out), 2),
                     "tokens_per_s": round(res["tokens_per_s"])})
    return rows


def main() -> None:
    from saetune.activations import CacheConfig, cache
    from saetune.sae_trainer import TrainSAEConfig, train_sae

    tmp = Path(tempfile.mkdtemp(prefix="saetune-scaling-"))
    examples = int(os.environ.get("EXAMPLES", "4000"))
    parts = set(os.environ.get("PARTS", "sae,many,tune").split(","))
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if "tune" in parts:
        rows += _tune_rows(tmp, env)
        (Path(__file__).with_name("scaling.json")).write_text(json.dumps(rows, indent=1))
    store = tmp / "cache"
    if "sae" in parts:
        cache(CacheConfig(model="toy", hooks=["model.layers.2"], dataset="toy", max_examples=examples,
                          context_size=128, progress=False), store)
    base = ["--activations", str(store), "--hooks", "model.layers.2", "--d-sae", "4096", "--k", "32",
            "--batch-size", "2048", "--eval-seqs", "0", "--checkpoint-every", "0", "--no-progress"]
    for world in (1, 2) if "sae" in parts else ():
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
    many = ((["model.layers.2"], [1024], 0), (["model.layers.1", "model.layers.2"], [512, 1024], 0),
            (["model.layers.1", "model.layers.2"], [512, 1024], 2))
    for hooks, widths, pf in many if "many" in parts else ():
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
