"""Resa's claim on the model organism, measured over seeds: does SAE-Tuning carry a source model's extra
accuracy into the base through the source's SAE?

For each source (``rl``: GRPO with CURE from the base; ``pretrained``: the shipped source trained further,
the larger gap) and each seed, one ``saetune demo`` run: base, source, SAE-tuned base and the two
controls without the SAE (the same LoRA fine-tuning on the traces; CoT-free), each scored greedily on
the same 256 fresh toy problems (one fixed set for every run, so runs compare problem by problem). The reading per run is the fraction of the source–base gap
that SAE-Tuning recovers, ``(tuned − base) / (source − base)``.

    python bench/resa_claim.py                       # sources rl and pretrained, seeds 0 1 2
    SEEDS="0 1 2 3 4" SOURCES=pretrained python bench/resa_claim.py

Runs go to ``RUNS`` (default: a folder under the platform's temp dir) and are resumed there (a finished
run is read back, a killed one continued); the table is printed last and the JSON written to ``OUT``
(default bench/resa_claim.json) after every run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = ("base", "source", "SAE-tuned", "control-sft", "control-cotfree")


def run_demo(source: str, seed: int, root: Path) -> dict:
    """The summary of one demo run (features off: they do not enter the accuracies)."""
    out = root / f"demo-{source}-seed{seed}"
    if not (out / "summary.json").exists():
        if (out / "config.yaml").exists():  # a killed run: continue it with its own config
            cmd = [sys.executable, "-m", "saetune.cli", "demo", "--resume", str(out), "--no-progress"]
        else:
            cmd = [sys.executable, "-m", "saetune.cli", "demo", "--source", source, "--seed", str(seed),
                   "--no-features", "--no-progress", "--out", str(out)]
        subprocess.run(cmd, check=True)
    return json.loads((out / "summary.json").read_text())


def gap_recovered(acc: dict) -> float | None:
    """``(tuned − base) / (source − base)``; None when the source is no better than the base."""
    gap = acc["source"] - acc["base"]
    return (acc["SAE-tuned"] - acc["base"]) / gap if gap > 0 else None


def table(rows: list[dict]) -> str:
    head = "| source | seed | " + " | ".join(MODELS) + " | gap recovered |"
    lines = [head, "|" + "---|" * (len(MODELS) + 3)]
    for r in rows:
        acc = r["accuracy"]
        cells = [f"{100 * acc[m]:.1f} ({100 * r['ci95'][m][0]:.1f}–{100 * r['ci95'][m][1]:.1f})" for m in MODELS]
        rec = "—" if r["recovered"] is None else f"{100 * r['recovered']:.0f} %"
        lines.append(f"| {r['source']} | {r['seed']} | " + " | ".join(cells) + f" | {rec} |")
    for source in sorted({r["source"] for r in rows}):
        rs = [r for r in rows if r["source"] == source]
        means = [statistics.fmean(r["accuracy"][m] for r in rs) for m in MODELS]
        pooled = gap_recovered(dict(zip(MODELS, means)))  # of the mean gap: per-seed ratios of tiny gaps are noise
        rec = "—" if pooled is None else f"{100 * pooled:.0f} %"
        lines.append(f"| {source} | mean of {len(rs)} | " + " | ".join(f"{100 * m:.1f}" for m in means)
                     + f" | {rec} |")
    return "\n".join(lines)


def main() -> None:
    seeds = [int(s) for s in os.environ.get("SEEDS", "0 1 2").split()]
    sources = os.environ.get("SOURCES", "rl pretrained").split()
    root = Path(os.environ.get("RUNS", Path(tempfile.gettempdir()) / "saetune-resa-claim"))
    out = Path(os.environ.get("OUT", Path(__file__).with_name("resa_claim.json")))
    rows = []
    for source in sources:
        for seed in seeds:
            s = run_demo(source, seed, root)
            acc = {m: s["accuracy"][m]["accuracy"] for m in MODELS}
            rows.append({"source": source, "seed": seed, "accuracy": acc, "recovered": gap_recovered(acc),
                         "ci95": {m: s["accuracy"][m]["ci95"] for m in MODELS},
                         "n": s["accuracy"]["base"]["n"]})
            out.write_text(json.dumps(rows, indent=1))
            print(table(rows[-1:]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
