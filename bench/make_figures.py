"""Figures for the README from a demo run dir (plain SVG, no plotting dependency).

    python bench/make_figures.py runs/demo-<ts>     # writes docs/demo_training.svg
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def polyline(xs, ys, x0, y0, w, h, xmax, ymax, color):
    pts = " ".join(f"{x0 + w * x / xmax:.1f},{y0 + h - h * y / ymax:.1f}" for x, y in zip(xs, ys))
    return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>'


def panel(rows, key, title, x0, color, ymax=None):
    xs = [r["tokens"] for r in rows if key in r]
    ys = [r[key] for r in rows if key in r]
    xmax = max(xs) or 1
    ymax = ymax or max(ys) * 1.1 or 1
    w, h, y0 = 300, 180, 40
    out = [f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="#fafafa" stroke="#ccc"/>',
           f'<text x="{x0 + w / 2}" y="{y0 - 12}" text-anchor="middle" font-size="14">{title}</text>',
           polyline(xs, ys, x0, y0, w, h, xmax, ymax, color),
           f'<text x="{x0}" y="{y0 + h + 16}" font-size="11">0</text>',
           f'<text x="{x0 + w}" y="{y0 + h + 16}" font-size="11" text-anchor="end">{xmax:,} tokens</text>',
           f'<text x="{x0 - 4}" y="{y0 + 10}" font-size="11" text-anchor="end">{ymax:.2g}</text>',
           f'<text x="{x0 - 4}" y="{y0 + h}" font-size="11" text-anchor="end">0</text>']
    return out


def main():
    run = Path(sys.argv[1])
    rows = [json.loads(line) for line in (run / "sae" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run / "summary.json").read_text())
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="760" height="260" font-family="sans-serif">',
             '<rect width="100%" height="100%" fill="white"/>']
    parts += panel(rows, "fvu", "FVU while training (toy, block 2)", 50, "#1f77b4")
    parts += panel(rows, "dead_frac", "dead-latent fraction", 430, "#d62728", ymax=1.0)
    s = summary["sae"]
    parts.append(f'<text x="380" y="252" text-anchor="middle" font-size="12">held-out FVU {s["fvu"]:.3f} · L0 '
                 f'{s["l0"]:.0f} · CE loss recovered {s["ce_loss_recovered"]:.3f} · toy accuracy '
                 f'{summary["toy_accuracy"]:.0%}</text>')
    parts.append("</svg>")
    out = Path("docs/demo_training.svg")
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(parts) + "\n")
    print(out)


if __name__ == "__main__":
    main()
