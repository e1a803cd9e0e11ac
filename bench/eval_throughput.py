"""Eval throughput on the toy task: problems/s and generated tokens/s of ``saetune.evaluate.run``.

    python bench/eval_throughput.py                  # prints a JSON line per setting and a table
    PROBLEMS=512 THREADS=2 python bench/eval_throughput.py

The shipped toy model (1M parameters, fp32, CPU), the HF backend, through the whole eval stage
(prompt rendering, generation, exact-match grading, appending ``samples.jsonl`` per batch).
"problems/s" counts problems with all their samples; the figures cover generation only (the
``generate:toy`` phase), then the stage's wall time with model loading and grading is given too.
Each setting runs ROUNDS times into a fresh run dir; the median round is reported.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time

import torch

PROBLEMS = int(os.environ.get("PROBLEMS", 256))
THREADS = int(os.environ.get("THREADS", 1))
ROUNDS = int(os.environ.get("ROUNDS", 3))
# (label, samples per problem, temperature, batch size)
SETTINGS = [("greedy, batch 32", 1, 0.0, 32), ("greedy, batch 128", 1, 0.0, 128),
            ("4 samples at T=0.6, batch 128", 4, 0.6, 128)]


def one(samples: int, temperature: float, batch: int) -> dict:
    from saetune.evaluate import EvalConfig, run
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = run(EvalConfig(benchmarks=["toy"], toy_problems=PROBLEMS, samples=samples, temperature=temperature,
                             batch_size=batch, progress=False), f"{d}/ev")["toy"]
        wall = time.perf_counter() - t0
    return {"problems_per_s": res["problems_per_s"], "tokens_per_s": res["tokens_per_s"],
            "generate_s": res["generate_seconds"], "stage_wall_s": round(wall, 3), "pass@1": res["pass@1"]}


def main() -> None:
    torch.set_num_threads(THREADS)
    one(1, 0.0, 32)  # warm-up: imports, first model load
    rows = []
    for label, samples, temperature, batch in SETTINGS:
        rounds = [one(samples, temperature, batch) for _ in range(ROUNDS)]
        med = sorted(rounds, key=lambda r: r["problems_per_s"])[len(rounds) // 2]
        row = {"setting": label, "problems": PROBLEMS, "samples": samples, "threads": THREADS,
               "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "problems_per_s_rounds": [r["problems_per_s"] for r in rounds], **med,
               "problems_per_s_median": statistics.median(r["problems_per_s"] for r in rounds)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| setting | problems/s | tokens/s | generate s | stage wall s | pass@1 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} ({r['problems']} problems) | {r['problems_per_s']:.0f} | {r['tokens_per_s']:.0f} | "
              f"{r['generate_s']:.2f} | {r['stage_wall_s']:.2f} | {r['pass@1']:.3f} |")


if __name__ == "__main__":
    main()
