"""One TopK-SAE training step (forward + backward + optimiser + decoder upkeep) on the CPU:
saetune vs SAELens ``TopKTrainingSAE`` vs sparsify ``SparseCoder`` (eager decoder), same shapes,
same process, interleaved rounds, median of the per-round medians.

    python bench/cpu_sae_step.py            # prints a JSON line per config and a table
    CONFIGS="128,4096,32,2048" python bench/cpu_sae_step.py

Each library runs its own recommended step with Adam (lr 1e-4) and FVU/MSE loss; saetune also
runs with Resa's signum + schedule-free optimiser.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
import torch  # noqa: E402

CONFIGS = [(64, 1024, 16, 256), (128, 4096, 32, 2048), (256, 8192, 32, 2048)]
if os.environ.get("CONFIGS"):
    CONFIGS = [tuple(int(v) for v in c.split(",")) for c in os.environ["CONFIGS"].split(";")]
STEPS, WARM, ROUNDS = int(os.environ.get("STEPS", 5)), 2, int(os.environ.get("ROUNDS", 3))


def timed(step, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def make_saetune(d, m, k, xs, optimizer):
    from saetune.sae import SAE, SAEConfig
    from saetune.sae_trainer import SAETrainer, TrainSAEConfig
    cfg = TrainSAEConfig(d_sae=[m], k=[k], optimizer=optimizer, lr=1e-4 if optimizer == "adam" else 0.0)
    t = SAETrainer("bench", SAE(SAEConfig(d, m, k=k), seed=0), cfg, "cpu")
    it = iter(range(10**9))
    return lambda: t.step(xs[next(it) % len(xs)], None)


def make_sparsify(d, m, k, xs):
    from sparsify import SparseCoder, SparseCoderConfig
    sae = SparseCoder(d, SparseCoderConfig(num_latents=m, k=k), device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    it = iter(range(10**9))

    def step():
        out = sae(xs[next(it) % len(xs)])
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
    return step


def make_saelens(d, m, k, xs):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=m, k=k, device="cpu"))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(m, dtype=torch.bool)
    it = iter(range(10**9))

    def step():
        out = sae.training_forward_pass(TrainStepInput(sae_in=xs[next(it) % len(xs)], coefficients={},
                                                       dead_neuron_mask=dead, n_training_steps=1,
                                                       is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    rows = []
    for d, m, k, n in CONFIGS:
        torch.manual_seed(0)
        xs = [torch.randn(n, d) for _ in range(4)]
        impls = {"saetune_adam": make_saetune(d, m, k, xs, "adam"),
                 "saetune_signum_sf": make_saetune(d, m, k, xs, "signum_sf"),
                 "sparsify_eager": make_sparsify(d, m, k, xs),
                 "saelens": make_saelens(d, m, k, xs)}
        for f in impls.values():
            for _ in range(WARM):
                f()
        per = {name: [] for name in impls}
        for _ in range(ROUNDS):  # interleave so drift hits every implementation alike
            for name, f in impls.items():
                per[name].append(timed(f, STEPS))
        r = {"d_in": d, "d_sae": m, "k": k, "batch": n, "threads": torch.get_num_threads(),
             "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
        for name, ts in per.items():
            t = statistics.median(ts)
            r[f"{name}_ms"] = round(t * 1e3, 2)
            r[f"{name}_tok_s"] = round(n / t)
        r["speedup_vs_sparsify"] = round(r["sparsify_eager_ms"] / r["saetune_adam_ms"], 2)
        r["speedup_vs_saelens"] = round(r["saelens_ms"] / r["saetune_adam_ms"], 2)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print("\n| d_in | d_sae | k | batch | saetune (Adam) ms | saetune (signum SF) ms | sparsify ms | SAELens ms "
          "| × sparsify | × SAELens |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['d_in']} | {r['d_sae']} | {r['k']} | {r['batch']} | {r['saetune_adam_ms']} | "
              f"{r['saetune_signum_sf_ms']} | {r['sparsify_eager_ms']} | {r['saelens_ms']} | "
              f"{r['speedup_vs_sparsify']} | {r['speedup_vs_saelens']} |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "cpu_sae_step.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
