"""``saetune demo``: Resa's SAE-Tuning story end to end on the built-in model organism, on a CPU.

toy base (shipped, or built with ``--build-toy``) → a stronger source (by default RL-trained from the
base with GRPO + CURE; ``--source pretrained``: the base pre-trained further) → the source's
activations cached at a middle block → a TopK SAE (Resa's Stage I recipe scaled down) → SAE-Tuning
of the base through that frozen SAE (``toy_tune`` recipe) → merge → controls (the same LoRA
fine-tuning without the SAE, on the traces and CoT-free) → greedy exact-match accuracy of every model
→ feature data for the explorer. One parent run dir holds a sub-run per stage (``eval/<label>/``
per model) and ``summary.json``; a killed demo continues with ``--resume``. The stages are a recipe
(:func:`demo_steps`) run by the pipeline's stage runner (:func:`saetune.pipeline.run_steps`); this module adds
the summary table.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config import opt
from .errors import SaetuneError
from .io import atomic_write_json, check_writable_dir
from .pipeline import Step, run_steps
from .runs import RunDir, check_overwrite_parent, config_paths, default_run_dir, record_path
from .tuning import TuneConfig


@dataclass
class DemoConfig:
    """``saetune demo``: the Resa story on the toy model organism, printed as a table."""

    build_toy: bool = opt(False, "pre-train the toy base from scratch (about 2.5 min) instead of using the "
                                 "shipped one")
    source: Literal["rl", "pretrained"] = opt("rl", "the stronger source model: 'rl' = GRPO with CURE from the base "
                                                   "(toy_rl recipe, about a minute), as Resa's RL-trained source; "
                                                   "'pretrained' = the base pre-trained further (shipped, instant)")
    rl_recipe: str = opt("toy_rl", "RL recipe of the 'rl' source")
    rl_steps: int = opt(0, "RL steps (0 = the recipe's)")
    hook: str = opt("model.layers.2", "hook point of the SAE (a middle block of the 4-layer toy)")
    examples: int = opt(6000, "toy traces to cache the source's activations for")
    context_size: int = opt(128, "tokens per packed sequence")
    d_sae: int = opt(1024, "SAE latents (8 × the toy's width 128)")
    k: int = opt(16, "active latents per token")
    batch_size: int = opt(2048, "SAE training batch in tokens")
    dead_tokens: int = opt(200_000, "tokens without firing before a latent counts as dead")
    tune_recipe: str = opt("toy_tune", "SAE-Tuning recipe (also used, without the SAE, by the controls)")
    tune_steps: int = opt(120, "SAE-Tuning (and control) steps")
    controls: bool = opt(True, "also fine-tune the base without the SAE: on the traces, and CoT-free (Resa's "
                               "control)")
    eval_problems: int = opt(256, "fresh toy problems per model (greedy, exact match)")
    features: bool = opt(True, "precompute the explorer's feature data for the SAE")
    seed: int = opt(0, "seed for every stage")
    progress: bool = opt(True, "show progress bars")


def _copy_shipped(dest: Path, src: Path, source_name: str) -> None:
    from .toy.build import ToyBuildConfig
    info = json.loads((src / "toy_build.json").read_text()) if (src / "toy_build.json").exists() else {}
    cfg = ToyBuildConfig(**{k: v for k, v in info.get("config", {}).items() if k in ToyBuildConfig.__dataclass_fields__})
    run = RunDir.open(dest, "toy", cfg, overwrite=True)
    with run.phase("copy"):
        shutil.copytree(src, dest / "model")
    run.add_artifact("model", "model")
    run.finish(source=source_name, stats={k: info.get(k) for k in ("accuracy", "train_seconds", "steps", "n_params")})


def _prepare_parent(cfg: DemoConfig, out: str | Path | None, resume: bool, overwrite: bool) -> Path:
    """The demo's parent dir, made ready: refused if it holds something and neither ``resume`` nor ``overwrite``,
    emptied on ``overwrite`` (only a demo's own dir), and holding ``config.yaml`` for ``--resume``."""
    parent = Path(out) if out else default_run_dir("demo")
    if parent.exists() and any(parent.iterdir()) and not (resume or overwrite):
        raise SaetuneError(f"output dir {str(parent)!r} already holds a demo; pass --resume to continue it, "
                           "--overwrite to replace it, or choose another --out")
    check_writable_dir(parent)
    if overwrite and parent.exists() and any(parent.iterdir()):
        check_overwrite_parent(parent, "demo", config_paths(cfg))  # only a demo's own dir is ever deleted
        shutil.rmtree(parent)
    parent.mkdir(parents=True, exist_ok=True)
    if not (parent / "config.yaml").exists():  # `saetune demo --resume DIR` reads it back
        from .config import dump_yaml
        from .io import atomic_write_text
        atomic_write_text(parent / "config.yaml", dump_yaml(cfg))
    return parent


# What the summary keeps from each stage's results.json.
_SAE_SUMMARY_KEYS = ("hook", "d_sae", "k", "fvu", "l0", "dead_frac", "ce_clean", "ce_spliced", "ce_zero",
                     "ce_loss_recovered", "kl_spliced", "train_tokens", "explained_variance", "ce_loss_score",
                     "kl_div_score", "frac_alive", "n_tokens", "frac_alive_train", "n_alive_train_tokens",
                     "dead_tokens", "dead_window_could_trigger", "note")
_RL_SUMMARY_KEYS = ("accuracy_before", "accuracy_after", "entropy_before", "entropy_after", "steps", "train_seconds")
_TUNE_SUMMARY_KEYS = ("steps", "tokens", "eval_loss_before", "eval_loss_after", "final_fvu", "tokens_per_s",
                      "lora_layers")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _eval_accuracy(eval_dirs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Label → greedy exact-match accuracy (``pass@1``), its 95% interval and ``n``, from each eval dir."""
    accuracy: dict[str, dict[str, Any]] = {}
    for label, d in eval_dirs.items():
        r = _read_json(d / "eval" / "results.json")["toy"]
        accuracy[label] = {"accuracy": r["pass@1"], "ci95": r.get("ci95"), "n": r["n"]}
    return accuracy


def _stage_costs(parent: Path) -> dict[str, Any]:
    """Sub-run (relative to ``parent``) → its manifest's ``estimated_cost_usd`` (0.0 if none)."""
    cost = {}
    for p in sorted(parent.rglob("manifest.json")):
        m = _read_json(p)
        cost[str(p.parent.relative_to(parent))] = m.get("estimated_cost_usd", 0.0)
    return cost


def _summarise(cfg: DemoConfig, parent: Path, dirs: dict[str, Any], times: dict[str, float]) -> dict:
    """The demo's summary, read back from the stages' run dirs (``dirs`` from :func:`demo_steps`)."""
    source_dir, cache_dir, sae_dir, tune_dir = (dirs[k] for k in ("source", "cache", "sae", "tune"))
    accuracy = _eval_accuracy(dirs["eval"])
    r = next(iter(_read_json(sae_dir / "results.json").values()))
    tune_res = _read_json(tune_dir / "results.json")
    rl = {}
    if cfg.source == "rl":
        rr = _read_json(source_dir / "results.json")
        rl = {k: rr.get(k) for k in _RL_SUMMARY_KEYS}
    cache_summary = _read_json(cache_dir / "manifest.json").get("summary", {})
    cost = _stage_costs(parent)
    return {
        "accuracy": accuracy, "toy_accuracy": accuracy["base"]["accuracy"],
        "cache_tokens": cache_summary.get("n_tokens"), "cache_bytes_per_token": cache_summary.get("bytes_per_token"),
        "sae": {k: r.get(k) for k in _SAE_SUMMARY_KEYS},
        "rl": rl,
        "tune": {k: tune_res.get(k) for k in _TUNE_SUMMARY_KEYS},
        "seconds": times, "total_seconds": round(sum(times.values()), 2), "cost_usd": cost,
        "stages": {name: record_path(parent / name, parent) for name in times},  # relative: the dir may move
    }


def demo(cfg: DemoConfig, out: str | Path | None = None, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the demo pipeline into ``out`` (a parent dir of per-stage run dirs); returns the summary.

    base → a stronger source (RL-trained, or the base pre-trained further) → the source's activations → an SAE on
    them → SAE-Tuning of the base through that SAE → merge; controls: the same LoRA fine-tuning
    without the SAE, on the traces and CoT-free; greedy exact-match accuracy of every model.
    """
    parent = _prepare_parent(cfg, out, resume, overwrite)
    steps, dirs = demo_steps(cfg, parent)
    times = run_steps(parent, steps, time_kept=True)  # a kept stage is timed too: the table lists every stage
    summary = _summarise(cfg, parent, dirs, times)
    atomic_write_json(parent / "summary.json", summary)
    print(format_table(summary))
    print(f"\nrun dir: {parent}")
    return summary


def demo_steps(cfg: DemoConfig, parent: Path) -> tuple[list[Step], dict[str, Any]]:
    """The demo as a recipe: its sub-runs of ``parent`` in order (run by :func:`saetune.pipeline.run_steps`), and
    the dirs the summary reads (``"eval"``: label → eval dir). Each stage builds its config when it runs."""
    from .activations import CacheConfig, cache
    from .config import load_config
    from .evaluate import EvalConfig, run as run_eval
    from .merging import MergeConfig, merge
    from .models import torch_threads
    from .sae_trainer import TrainSAEConfig, train_sae
    from .toy.build import ToyBuildConfig, build_toy, shipped_base_path, shipped_source_path
    from .tuning import tune

    steps: list[Step] = []

    def stage(name: str, fn) -> Path:
        steps.append(Step(name, "running", fn))
        return parent / name

    def base_stage(path: Path, partial: bool):
        if cfg.build_toy:
            build_toy(ToyBuildConfig(seed=cfg.seed), path, resume=partial, progress=cfg.progress)
        else:
            _copy_shipped(path, shipped_base_path(), "shipped")

    base_dir = stage("toy-base", base_stage)
    base_model = base_dir / "model"

    def source_stage(path: Path, partial: bool):
        if cfg.source == "rl":
            from .rl import RLConfig, train as rl_train
            over = dict(model=str(base_model), seed=cfg.seed, eval_problems=cfg.eval_problems, progress=cfg.progress)
            if cfg.rl_steps:
                over["steps"] = cfg.rl_steps
            rl_train(load_config(RLConfig, cfg.rl_recipe, over), path, resume=partial)
        elif cfg.build_toy:
            build_toy(ToyBuildConfig(seed=cfg.seed + 1, init_from=str(base_model), **SOURCE_BUILD), path,
                      resume=partial, progress=cfg.progress)
        else:
            _copy_shipped(path, shipped_source_path(), "shipped")

    source_dir = stage("rl-source" if cfg.source == "rl" else "toy-source", source_stage)
    source_model = source_dir / "model"

    def cache_stage(path: Path, partial: bool):
        cache(CacheConfig(model=str(source_model), hooks=[cfg.hook], dataset="toy", max_examples=cfg.examples,
                          context_size=cfg.context_size, data_seed=cfg.seed, progress=cfg.progress), path,
              resume=partial)

    cache_dir = stage("cache", cache_stage)

    def sae_stage(path: Path, partial: bool):
        train_sae(TrainSAEConfig(model=str(source_model), activations=str(cache_dir), hooks=[cfg.hook],
                                 d_sae=[cfg.d_sae], k=[cfg.k], batch_size=cfg.batch_size, dead_tokens=cfg.dead_tokens,
                                 seed=cfg.seed, context_size=cfg.context_size, data_seed=cfg.seed, eval_seqs=32,
                                 checkpoint_every=50, log_every=2, progress=cfg.progress), path, resume=partial)

    sae_dir = stage("sae", sae_stage)

    def tuned(kw: dict[str, Any]):
        def run(path: Path, partial: bool):
            c = load_config(TuneConfig, cfg.tune_recipe, dict(model=str(base_model), hook=cfg.hook, seed=cfg.seed,
                                                              max_steps=cfg.tune_steps, progress=cfg.progress, **kw))
            with torch_threads(1):  # a 1M-parameter model: one thread beats two (no spin-waits on tiny matmuls)
                return tune(c, path, resume=partial)
        return run

    tune_dir = stage("tune", tuned(dict(sae=str(sae_dir))))
    merge_dir = stage("merge", lambda p, partial: merge(MergeConfig(adapter=str(tune_dir)), p, resume=partial))
    models = {"base": base_dir, "source": source_dir, "SAE-tuned": merge_dir}
    if cfg.controls:
        for name, dataset in (("control-sft", "toy"), ("control-cotfree", "toy-cotfree")):
            models[name] = stage(name, tuned(dict(sae="", loss="ce", dataset=dataset)))

    def eval_stage(label: str, model_dir: Path):
        def run(path: Path, partial: bool):
            run_eval(EvalConfig(model=str(model_dir), label=label, benchmarks=["toy"], temperature=0.0,
                                toy_problems=cfg.eval_problems, seed=cfg.seed + 12345, progress=cfg.progress), path,
                     resume=partial)
        return run

    evals = {label: stage(f"eval/{label}", eval_stage(label, d)) for label, d in models.items()}

    if cfg.features:
        def features_stage(path: Path, partial: bool):
            from .analysis.feature_build import FeaturesConfig, features
            features(FeaturesConfig(sae=str(sae_dir), model=str(source_model), max_examples=600, n_tokens=16384,
                                    progress=cfg.progress), path, resume=partial)

        stage("features", features_stage)
    return steps, {"source": source_dir, "cache": cache_dir, "sae": sae_dir, "tune": tune_dir,
                   "eval": evals}


SOURCE_BUILD = dict(steps=200, lr=1e-3, warmup_steps=20)  # the base trained further: the demo's stronger source


def alive_line(sae: dict) -> str:
    """The SAE's liveness with its saved (averaged) weights: the share of latents that fire at least once over its
    training tokens (a store-trained SAE) and over the held-out evaluation tokens (SAEBench's ``frac_alive``);
    then the training-time dead counter, which watched the training weights over its last ``dead_tokens``, and
    whether a window that long could trigger at all in this run."""
    parts = []
    if sae.get("frac_alive_train") is not None:
        parts.append(f"{sae['frac_alive_train']:.1%} of {sae['d_sae']:,} fire on its {sae['n_alive_train_tokens']:,} "
                     "training tokens")
    if sae.get("frac_alive") is not None:
        parts.append(f"{sae['frac_alive']:.1%} on {sae['n_tokens']:,} held-out")
    text = ", ".join(parts) + (" (saved weights)" if parts else "")
    window = sae.get("dead_tokens")
    counter = f"dead counter {sae['dead_frac']:.3f}"
    if window and sae.get("dead_window_could_trigger") is False:
        counter += f" (its {window:,}-token window is longer than the run: it could not trigger)"
    elif window:
        counter += f" (training weights, {window:,}-token window)"
    return f"{text}; {counter}" if parts else counter


def format_table(s: dict) -> str:
    sae, tu = s["sae"], s["tune"]
    rows = []
    for label, a in s["accuracy"].items():
        ci = a.get("ci95") or [float("nan"), float("nan")]
        rows.append((f"accuracy: {label}", f"{a['accuracy']:.1%}  (95% CI {ci[0]:.1%}–{ci[1]:.1%}, n {a['n']})"))
    rl = s.get("rl") or {}
    if rl:
        rows.append(("RL source (GRPO + CURE)", f"greedy accuracy {rl['accuracy_before']:.1%} → {rl['accuracy_after']:.1%}, "
                                              f"mean entropy {rl['entropy_before']:.3f} → {rl['entropy_after']:.3f} "
                                              f"({rl['steps']} steps)"))
    rows += [
        ("activations cached (source)", f"{s['cache_tokens']:,} tokens, {s['cache_bytes_per_token']:.0f} B/token"),
        ("SAE", f"{sae['hook']}, d_sae {sae['d_sae']}, k {sae['k']}, {sae['train_tokens']:,} tokens"),
        ("SAE FVU / L0", f"{sae['fvu']:.4f} / {sae['l0']:.1f}"),
        ("SAE alive latents", alive_line(sae)),
        ("SAE CE loss recovered", f"{sae['ce_loss_recovered']:.3f}" + (
            f" (KL score {sae['kl_div_score']:.3f}; SAEBench's scores, zero-ablation baseline)"
            if sae.get("kl_div_score") is not None else "")),
        ("SAE-Tuning held-out KL", f"{tu['eval_loss_before']:.3f} → {tu['eval_loss_after']:.3f} per sequence "
                                   f"({tu['steps']} steps, FVU in the base {tu['final_fvu']:.3f})"),
    ] + [(f"time: {k}", f"{v:.1f} s, ${s['cost_usd'].get(k, 0.0):.2f}") for k, v in s["seconds"].items()] + [
        ("time: total", f"{s['total_seconds']:.1f} s")]
    w = max(len(a) for a, _ in rows)
    line = "-" * (w + 50)
    return "\n".join([line] + [f"{a:<{w}}  {b}" for a, b in rows] + [line])
