"""``saetune demo``: the whole pipeline so far on the built-in model organism, on a CPU.

toy base (shipped, or built with ``--build-toy``) → activations cached at a middle layer →
a TopK SAE trained with Resa's Stage I recipe scaled down → a table of FVU, L0, dead fraction,
CE loss recovered and wall time per stage. One parent run dir holds a sub-run per stage and
``summary.json``; a killed demo continues with ``--resume``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import opt
from .errors import SaetuneError
from .io import atomic_write_json
from .runs import RunDir, default_run_dir


@dataclass
class DemoConfig:
    """``saetune demo``: toy model → activations → SAE, printed as a table."""

    build_toy: bool = opt(False, "pre-train the toy base from scratch (about 2.5 min) instead of using the "
                                 "shipped one")
    hook: str = opt("model.layers.2", "hook point of the SAE (a middle block of the 4-layer toy)")
    examples: int = opt(6000, "toy traces to cache activations for")
    context_size: int = opt(128, "tokens per packed sequence")
    d_sae: int = opt(1024, "SAE latents (8 × the toy's width 128)")
    k: int = opt(16, "active latents per token")
    batch_size: int = opt(2048, "SAE training batch in tokens")
    dead_tokens: int = opt(200_000, "tokens without firing before a latent counts as dead")
    seed: int = opt(0, "seed for every stage")
    progress: bool = opt(True, "show progress bars")


def _stage_state(path: Path) -> str:
    """'missing', 'complete', or 'partial' for a sub-run dir."""
    mf = path / "manifest.json"
    if not mf.exists():
        return "missing" if not path.exists() else "partial"
    return "complete" if json.loads(mf.read_text()).get("status") == "complete" else "partial"


def _copy_shipped_toy(dest: Path) -> None:
    from .toy import shipped_base_path
    from .toy.build import ToyBuildConfig
    src = shipped_base_path()
    info = json.loads((src / "toy_build.json").read_text()) if (src / "toy_build.json").exists() else {}
    cfg = ToyBuildConfig(**{k: v for k, v in info.get("config", {}).items() if k in ToyBuildConfig.__dataclass_fields__})
    run = RunDir.open(dest, "toy", cfg, overwrite=True)
    with run.phase("copy"):
        shutil.copytree(src, dest / "model")
    run.add_artifact("model", "model")
    run.finish(source="shipped", stats={k: info.get(k) for k in ("accuracy", "train_seconds", "steps", "n_params")})


def demo(cfg: DemoConfig, out: str | Path | None = None, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the demo pipeline into ``out`` (a parent dir of per-stage run dirs); returns the summary."""
    from .activations import CacheConfig, cache
    from .toy.build import ToyBuildConfig, build_toy, evaluate_toy
    from .train_sae import TrainSAEConfig, train_sae

    parent = Path(out) if out else default_run_dir("demo")
    if parent.exists() and any(parent.iterdir()) and not (resume or overwrite):
        raise SaetuneError(f"output dir {str(parent)!r} already holds a demo; pass --resume to continue it, "
                           "--overwrite to replace it, or choose another --out")
    if overwrite and parent.exists():
        shutil.rmtree(parent)
    parent.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def stage(name: str, fn) -> Any:
        path = parent / name
        state = _stage_state(path)
        t0 = time.perf_counter()
        if state == "complete":
            print(f"[{name}] already complete, kept")
        else:
            print(f"[{name}] running …", flush=True)
            fn(path, state == "partial")
        times[name] = round(time.perf_counter() - t0, 2)
        print(f"[{name}] {times[name]:.1f} s", flush=True)
        return path

    def toy_stage(path: Path, partial: bool):
        if cfg.build_toy:
            build_toy(ToyBuildConfig(seed=cfg.seed), path, resume=partial, progress=cfg.progress)
        else:
            _copy_shipped_toy(path)

    toy_dir = stage("toy-base", toy_stage)
    model_dir = toy_dir / "model"

    cache_cfg = CacheConfig(model=str(model_dir), hooks=[cfg.hook], dataset="toy", max_examples=cfg.examples,
                            context_size=cfg.context_size, data_seed=cfg.seed, progress=cfg.progress)
    cache_dir = stage("cache", lambda p, partial: cache(cache_cfg, p, resume=partial))

    sae_cfg = TrainSAEConfig(model=str(model_dir), activations=str(cache_dir), hooks=[cfg.hook], d_sae=[cfg.d_sae],
                             k=[cfg.k], batch_size=cfg.batch_size, dead_tokens=cfg.dead_tokens, seed=cfg.seed,
                             context_size=cfg.context_size, data_seed=cfg.seed, eval_seqs=32,
                             checkpoint_every=50, log_every=2, progress=cfg.progress)
    sae_dir = stage("sae", lambda p, partial: train_sae(sae_cfg, p, resume=partial))

    from .models import load_model
    t0 = time.perf_counter()
    model, tok = load_model(str(model_dir), device="cpu")
    accuracy = evaluate_toy(model, tok, n=256, seed=cfg.seed + 12345)
    times["eval-toy"] = round(time.perf_counter() - t0, 2)

    results = json.loads((sae_dir / "results.json").read_text())
    r = next(iter(results.values()))
    cache_summary = json.loads((cache_dir / "manifest.json").read_text()).get("summary", {})
    summary = {
        "toy_accuracy": accuracy, "cache_tokens": cache_summary.get("n_tokens"),
        "cache_bytes_per_token": cache_summary.get("bytes_per_token"),
        "sae": {k: r.get(k) for k in ("hook", "d_sae", "k", "fvu", "l0", "dead_frac", "ce_clean", "ce_spliced",
                                      "ce_zero", "ce_loss_recovered", "kl_spliced", "train_tokens")},
        "seconds": times, "total_seconds": round(sum(times.values()), 2),
        "stages": {"toy-base": str(toy_dir), "cache": str(cache_dir), "sae": str(sae_dir)},
    }
    atomic_write_json(parent / "summary.json", summary)
    print(format_table(summary))
    print(f"\nrun dir: {parent}")
    return summary


def format_table(s: dict) -> str:
    sae = s["sae"]
    rows = [
        ("toy base greedy accuracy", f"{s['toy_accuracy']:.1%}"),
        ("activations cached", f"{s['cache_tokens']:,} tokens, {s['cache_bytes_per_token']:.0f} B/token"),
        ("SAE", f"{sae['hook']}, d_sae {sae['d_sae']}, k {sae['k']}, {sae['train_tokens']:,} tokens"),
        ("FVU (held-out)", f"{sae['fvu']:.4f}"),
        ("L0", f"{sae['l0']:.1f}"),
        ("dead fraction", f"{sae['dead_frac']:.3f}"),
        ("CE clean / spliced / zero", f"{sae['ce_clean']:.3f} / {sae['ce_spliced']:.3f} / {sae['ce_zero']:.3f}"),
        ("CE loss recovered", f"{sae['ce_loss_recovered']:.3f}"),
        ("KL(clean ‖ spliced)", f"{sae['kl_spliced']:.4f} nats/token"),
    ] + [(f"time: {k}", f"{v:.1f} s") for k, v in s["seconds"].items()] + [("time: total", f"{s['total_seconds']:.1f} s")]
    w = max(len(a) for a, _ in rows)
    line = "-" * (w + 40)
    return "\n".join([line] + [f"{a:<{w}}  {b}" for a, b in rows] + [line])
