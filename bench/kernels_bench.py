"""saetune's kernels beside the anchors, in one process run on one machine.

    python bench/kernels_bench.py            # GPU: PERF.md shapes; CPU: small shapes
    BENCH_MAX_S=300 python bench/kernels_bench.py

1. One TopK-SAE training step (forward + backward + optimiser + decoder upkeep) on the same
   random activations: saetune (its default path: Triton kernels on CUDA, torch on CPU; Adam and
   signum + schedule-free), saetune's torch path (GPU only, ``SAETUNE_KERNELS=torch``), SAELens
   ``TopKTrainingSAE`` (fp32 and bf16 autocast) and sparsify ``SparseCoder`` (bf16 autocast on the
   GPU). GPU shapes: PERF.md's config A and B, and config A at a 16k-token batch. ``WARM``
   warm-up steps each, then ``ROUNDS`` interleaved rounds of ``STEPS / ROUNDS`` steps per
   implementation; median over all timed steps (and the minimum, which load from other
   processes cannot lower). Also the loss curve of saetune's default path against
   its torch path from the same init (max relative difference over ``CURVE_STEPS`` steps).
2. Per-token entropy + target log-prob from hidden states: naive (explicit logits), chunked by
   1,024 rows (torch), and ``saetune.kernels.linear_entropy_logprob`` — forward time, extra peak
   memory on the GPU, and forward + backward of the fused op. GPU: V 151,936, D 1,536, N 16,384, bf16.

Writes ``$OUT/kernels_bench.json`` (or ``bench/kernels_bench.json``) after every figure, stops
starting new measurements after ``BENCH_MAX_S`` seconds, and prints a table last.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # sparsify's Triton decoder needs a GPU: its eager decoder on the CPU
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
DEV = "cuda" if CUDA else "cpu"
T0 = time.perf_counter()
MAX_S = float(os.environ.get("BENCH_MAX_S", 500))
STEPS = int(os.environ.get("STEPS", 20))
WARM = int(os.environ.get("WARM", 5 if CUDA else 2))
ROUNDS = int(os.environ.get("ROUNDS", 4 if CUDA else 5))
CURVE_STEPS = int(os.environ.get("CURVE_STEPS", 10 if CUDA else 5))
OUT = Path(os.environ.get("OUT") or Path(__file__).parent) / "kernels_bench.json"
OUT.parent.mkdir(parents=True, exist_ok=True)
SAE_SHAPES = ([("A", 1536, 49152, 64, 4096), ("B", 2048, 65536, 64, 8192), ("A-16k", 1536, 49152, 64, 16384)] if CUDA
              else [("cpu-1", 64, 1024, 16, 256), ("cpu-2", 128, 4096, 32, 2048)])
ENT_SHAPE = (16384, 1536, 151936) if CUDA else (512, 128, 8192)  # N, D, V

RES: dict = {"device": torch.cuda.get_device_name() if CUDA else f"CPU ({platform.machine()}, "
             f"{torch.get_num_threads()} threads)", "torch": torch.__version__, "steps": STEPS, "rounds": ROUNDS,
             "warm": WARM,
             "sae": [], "entropy": [], "skipped": []}
try:
    import triton
    RES["triton"] = triton.__version__
except ImportError:
    pass


def dump() -> None:
    RES["elapsed_s"] = round(time.perf_counter() - T0, 1)
    OUT.write_text(json.dumps(RES, indent=1))


def time_left() -> bool:
    return time.perf_counter() - T0 < MAX_S


def step_times_ms(fn, steps: int) -> list[float]:
    """Wall (CPU) or CUDA-event (GPU) time of each of ``steps`` calls, in ms."""
    ts = []
    if CUDA:
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(steps):
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        return ts
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return ts


def median_min_ms(fn, steps=STEPS, warm=WARM) -> tuple[float, float]:
    for _ in range(warm):
        fn()
    ts = step_times_ms(fn, steps)
    return round(statistics.median(ts), 3), round(min(ts), 3)


# ---- SAE step implementations ------------------------------------------------------------------

def saetune_step(d, n, k, xs, optimizer, backend):
    from saetune.sae import SAE, SAEConfig
    from saetune.sae_trainer import SAETrainer, TrainSAEConfig
    cfg = TrainSAEConfig(d_sae=[n], k=[k], optimizer=optimizer, lr=1e-4 if optimizer == "adam" else 0.0)
    t = SAETrainer("bench", SAE(SAEConfig(d, n, k=k), seed=0).to(DEV), cfg, DEV)
    autocast = torch.bfloat16 if CUDA else None
    it = iter(range(10**9))

    def step():
        old = os.environ.get("SAETUNE_KERNELS")
        os.environ["SAETUNE_KERNELS"] = backend
        try:
            return t.step(xs[next(it) % len(xs)], autocast)
        finally:
            if old is None:
                os.environ.pop("SAETUNE_KERNELS")
            else:
                os.environ["SAETUNE_KERNELS"] = old
    return step


def saelens_step(d, n, k, xs, bf16):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, device=DEV))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(n, dtype=torch.bool, device=DEV)
    it = iter(range(10**9))

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=bf16):
            out = sae.training_forward_pass(TrainStepInput(sae_in=xs[next(it) % len(xs)], coefficients={},
                                                           dead_neuron_mask=dead, n_training_steps=1,
                                                           is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def sparsify_step(d, n, k, xs):
    from sparsify import SparseCoder, SparseCoderConfig
    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=DEV)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    it = iter(range(10**9))

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=CUDA):
            out = sae(xs[next(it) % len(xs)])
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
    return step


def loss_curve_gap(d, n, k, xs, optimizer) -> float:
    """max |loss_default − loss_torch| / loss_torch over CURVE_STEPS steps from the same init."""
    curves = []
    for backend in ("auto", "torch"):
        step = saetune_step(d, n, k, xs, optimizer, backend)
        curves.append([float(step()["loss"]) for _ in range(CURVE_STEPS)])
    return max(abs(a - b) / abs(b) for a, b in zip(*curves))


def bench_sae():
    for name, d, n, k, B in SAE_SHAPES:
        if not time_left():
            RES["skipped"].append(f"sae {name}: time cap")
            continue
        torch.manual_seed(0)
        xs = [torch.randn(B, d, device=DEV) for _ in range(4)]
        row = {"config": name, "d_in": d, "d_sae": n, "k": k, "batch": B}
        impls = {"saetune_adam": lambda: saetune_step(d, n, k, xs, "adam", "auto"),
                 "saetune_signum_sf": lambda: saetune_step(d, n, k, xs, "signum_sf", "auto")}
        if CUDA:
            impls["saetune_torch_path_adam"] = lambda: saetune_step(d, n, k, xs, "adam", "torch")
        impls["sparsify"] = lambda: sparsify_step(d, n, k, xs)
        impls["saelens_bf16" if CUDA else "saelens"] = lambda: saelens_step(d, n, k, xs, CUDA)
        if CUDA:
            impls["saelens_fp32"] = lambda: saelens_step(d, n, k, xs, False)
        steppers = {}
        for impl, make in impls.items():
            try:
                steppers[impl] = make()
                for _ in range(WARM):
                    steppers[impl]()
            except Exception as e:  # an anchor library missing or failing must not lose the other figures
                row[f"{impl}_error"] = f"{type(e).__name__}: {e}"[:300]
                steppers.pop(impl, None)
        per: dict[str, list[float]] = {impl: [] for impl in steppers}
        for _ in range(ROUNDS):  # interleaved, so drift and neighbours' load hit every implementation alike
            for impl, fn in steppers.items():
                if not time_left():
                    continue
                per[impl] += step_times_ms(fn, max(1, STEPS // ROUNDS))
        for impl, ts in per.items():
            if ts:
                ms = statistics.median(ts)
                row[f"{impl}_ms"] = round(ms, 3)
                row[f"{impl}_min_ms"] = round(min(ts), 3)
                row[f"{impl}_tok_s"] = round(B / ms * 1e3)
            else:
                RES["skipped"].append(f"sae {name} {impl}: time cap")
        del steppers
        if CUDA:
            torch.cuda.empty_cache()
        RES["sae"] = [r for r in RES["sae"] if r["config"] != name] + [row]
        dump()
        for anchor in ("sparsify", "saelens_bf16", "saelens", "saelens_fp32", "saetune_torch_path_adam"):
            if f"{anchor}_ms" in row and "saetune_adam_ms" in row:
                row[f"x_{anchor}"] = round(row[f"{anchor}_ms"] / row["saetune_adam_ms"], 2)
        if CUDA and time_left():  # on the CPU both are the torch path
            for opt in ("adam", "signum_sf"):
                try:
                    row[f"curve_rel_gap_{opt}"] = float(f"{loss_curve_gap(d, n, k, xs, opt):.3g}")
                except Exception as e:
                    row[f"curve_{opt}_error"] = f"{type(e).__name__}: {e}"[:300]
        dump()


# ---- entropy / log-prob -------------------------------------------------------------------------

def chunked_forward(h, W, t, rows=1024):
    from saetune.rl.entropy import token_entropy
    ents, lps = [], []
    for s in range(0, h.shape[0], rows):
        logits = (h[s:s + rows] @ W.t()).float()
        ents.append(token_entropy(logits))
        lps.append(torch.log_softmax(logits, -1).gather(1, t[s:s + rows, None]).squeeze(1))
    return torch.cat(ents), torch.cat(lps)


def bench_entropy():
    import saetune.kernels as K
    from saetune.kernels.entropy import linear_entropy_logprob_naive
    N, D, V = ENT_SHAPE
    dtype = torch.bfloat16 if CUDA else torch.float32
    g = torch.Generator(device=DEV).manual_seed(0)
    h = torch.randn(N, D, device=DEV, generator=g).to(dtype)
    W = (torch.randn(V, D, device=DEV, generator=g) / D ** 0.5).to(dtype)
    t = torch.randint(0, V, (N,), device=DEV, generator=g)
    impls = {"naive": lambda: linear_entropy_logprob_naive(h, W, t),
             "chunked_1024": lambda: chunked_forward(h, W, t),
             "saetune_fused": lambda: K.linear_entropy_logprob(h, W, t)}
    if CUDA:
        impls["floor_lm_head_gemm"] = lambda: h @ W.t()
    base = torch.cuda.memory_allocated() if CUDA else 0
    for name, fn in impls.items():
        if not time_left():
            RES["skipped"].append(f"entropy {name}: time cap")
            continue
        row = {"impl": name, "N": N, "D": D, "V": V, "dtype": str(dtype).removeprefix("torch.")}
        if name == "saetune_fused":
            row["path"] = "triton" if K.use_triton(h, W) else "torch (chunked)"
        try:
            with torch.no_grad():
                if CUDA:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                row["forward_ms"], row["forward_min_ms"] = median_min_ms(fn, steps=max(5, STEPS // 2), warm=2)
                if CUDA:
                    row["extra_peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        RES["entropy"].append(row)
        dump()
    if time_left():  # forward + backward of the fused op (entropy bonus + log-prob loss)
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()

        def fwd_bwd():
            e, lp = K.linear_entropy_logprob(hh, WW, t)
            (0.01 * e.sum() - lp.sum()).backward()
            hh.grad = WW.grad = None
        row = {"impl": "saetune_fused_fwd_bwd", "N": N, "D": D, "V": V, "dtype": str(dtype).removeprefix("torch."),
               "path": "triton" if K.use_triton(h, W) else "torch (chunked)"}
        try:
            row["fwd_bwd_ms"], row["fwd_bwd_min_ms"] = median_min_ms(fwd_bwd, steps=max(5, STEPS // 2), warm=2)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        RES["entropy"].append(row)
        dump()


def _ms(r: dict, impl: str) -> str:
    return f"{r[impl + '_ms']} ({r[impl + '_min_ms']})" if impl + "_ms" in r else "—"


def table() -> str:
    lines = [f"device: {RES['device']}; ms per step: median (min)", "",
             "| config | d_in | d_sae | k | batch | saetune Adam | saetune signum-SF | saetune torch path | sparsify "
             "| SAELens bf16 | SAELens fp32 | × sparsify | × SAELens | loss-curve gap Adam / SF |", "|" + "---|" * 14]
    for r in RES["sae"]:
        saelens = "saelens_bf16" if CUDA else "saelens"
        lines.append(f"| {r['config']} | {r['d_in']} | {r['d_sae']} | {r['k']} | {r['batch']} | "
                     f"{_ms(r, 'saetune_adam')} | {_ms(r, 'saetune_signum_sf')} | {_ms(r, 'saetune_torch_path_adam')} | "
                     f"{_ms(r, 'sparsify')} | {_ms(r, saelens) if CUDA else '—'} | "
                     f"{_ms(r, 'saelens_fp32' if CUDA else 'saelens')} | {r.get('x_sparsify', '—')} | "
                     f"{r.get('x_' + saelens, '—')} | "
                     f"{r.get('curve_rel_gap_adam', '—')} / {r.get('curve_rel_gap_signum_sf', '—')} |")
    lines += ["", "| entropy impl | N | D | V | forward ms | fwd+bwd ms | extra peak MiB |", "|" + "---|" * 7]
    for r in RES["entropy"]:
        fwd = f"{r['forward_ms']} ({r['forward_min_ms']})" if "forward_ms" in r else "—"
        fb = f"{r['fwd_bwd_ms']} ({r['fwd_bwd_min_ms']})" if "fwd_bwd_ms" in r else "—"
        lines.append(f"| {r['impl']}{' (' + r['path'] + ')' if 'path' in r else ''} | {r['N']} | {r['D']} | {r['V']} | "
                     f"{fwd} | {fb} | {r.get('extra_peak_mib', '—')} |")
    errors = [f"{r['config']} {k}" for r in RES["sae"] for k in r if k.endswith("_error")]
    errors += [f"entropy {r['impl']}" for r in RES["entropy"] if "error" in r]
    if errors:
        lines += ["", "errors (see the JSON): " + "; ".join(errors)]
    if RES["skipped"]:
        lines += ["", "skipped: " + "; ".join(RES["skipped"])]
    return "\n".join(lines)


def main() -> None:
    dump()
    bench_sae()
    bench_entropy()
    dump()
    print(table())


if __name__ == "__main__":
    main()
