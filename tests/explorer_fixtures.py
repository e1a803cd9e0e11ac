"""A small pipeline dir in the demo's layout, built once per test process for the explorer tests.

``toy-base/`` (the shipped toy model), ``sae/`` (a real SAE trained briefly at two hooks),
``features/`` (``saetune features`` on it), ``rl-source/`` (hand-written traces, some holding
HTML/script payloads, and metrics), ``eval/<label>/eval/results.json`` runs for base and
SAE-tuned, a ``tune/`` stage with a cost, and ``summary.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'
_BUILT: dict[str, Path] = {}


def _manifest(path: Path, stage: str, wall: float = 1.0, **extra) -> None:
    path.mkdir(parents=True, exist_ok=True)
    m = {"stage": stage, "status": "complete", "saetune_format": 1, "seed": 0, "device": "cpu",
         "start_time": "2026-11-26T09:00:00+00:00", "end_time": "2026-11-26T09:01:00+00:00",
         "phases": {"main": wall}, "inputs": {}, "artifacts": {}, "wall_seconds": wall, "gpu_hours": 0.0,
         "estimated_cost_usd": 0.0, **extra}
    (path / "manifest.json").write_text(json.dumps(m))
    (path / "config.yaml").write_text(f"stage: {stage}\nseed: 0\n")


def trace_records() -> list[dict]:
    """Three traces: a plain one, one with HTML payloads in every text field, one without entropies."""
    toks = ["<think>", " 3", " +", " 4", " =", " 7", " .", " wait", " ,", " let", " me", " check", " :", " 7", " .",
            " therefore", " the", " answer", " is", " 7", " .", " </think>"]
    resp = "".join(toks)
    from saetune.rl.rewards import reasoning_pattern_hits
    ent = [0.1 * (i % 7) for i in range(len(toks))]
    plain = {"prompt": "User : compute 3 + 4 . Assistant :", "response": resp, "tokens": toks,
             "token_ids": list(range(10, 10 + len(toks))), "logprobs": [-e for e in ent], "entropies": ent,
             "critical_candidates": [11, 7, 15], "critical_position": 11, "rpr_hits": reasoning_pattern_hits(resp),
             "reward": 1.0, "reward_parts": {"correct": 1.0, "rpr": 0.1}, "correct": True}
    bad_toks = ["<think>", " " + XSS, " wait", " </think>"]
    bad_resp = "".join(bad_toks)
    bad = {"prompt": "User : " + XSS, "response": bad_resp, "tokens": bad_toks, "token_ids": [1, 2, 3, 4],
           "entropies": [0.5, 2.0, 1.0, 0.2], "critical_candidates": [1], "critical_position": 1,
           "rpr_hits": {XSS: [[8, 20]], "wait": reasoning_pattern_hits(bad_resp).get("wait", [])},
           "reward": 0.0, "reward_parts": {"correct": 0.0}, "correct": False}
    sparse = {"prompt": "p", "response": "just text", "reward": 0.5}
    return [plain, bad, sparse]


def build(root: Path) -> Path:
    """Write the pipeline dir under ``root`` (memoised per process); returns its path."""
    key = str(root)
    if key in _BUILT:
        return _BUILT[key]
    from saetune.analysis.feature_build import FeaturesConfig, features
    from saetune.toy import shipped_base_path
    from saetune.sae_trainer import TrainSAEConfig, train_sae

    run = root / "demo-mini"
    _manifest(run / "toy-base", "toy", 0.1)
    shutil.copytree(shipped_base_path(), run / "toy-base" / "model")
    model = str(run / "toy-base" / "model")
    train_sae(TrainSAEConfig(model=model, dataset="toy", max_examples=400, hooks=["model.layers.1", "model.layers.2"],
                             d_sae=[256], k=[8], batch_size=1024, context_size=128, eval_seqs=4, log_every=2,
                             checkpoint_every=1000, dead_tokens=10_000, progress=False), run / "sae")
    features(FeaturesConfig(sae=str(run / "sae"), **FEATURES_KW), run / "features")
    src = run / "rl-source"
    _manifest(src, "rl", 30.0)
    (src / "traces").mkdir()
    (src / "traces" / "step_000010.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in trace_records()) + '{"prompt": "cut by a kill", "resp')
    (src / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "tokens": 100 * s, "reward_mean": s / 10, "entropy_mean": 1 - s / 20}) + "\n"
        for s in range(1, 8)))
    _manifest(run / "tune", "tune", 42.0, gpu_hours=0.0, estimated_cost_usd=0.0)
    (run / "tune" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "tokens": 512 * s, "kl": 1.0 / s, "fvu": 0.1}) + "\n" for s in range(1, 6)))
    for label, acc in (("base", 0.25), ("SAE-tuned", 0.5)):
        e = run / "eval" / label
        _manifest(e, "eval", 3.0, label=label,
                  model_run={"wall_seconds": 42.0, "estimated_cost_usd": 0.0} if label == "SAE-tuned" else None)
        (e / "eval").mkdir()
        (e / "eval" / "results.json").write_text(json.dumps({"toy": {
            "n": 64, "samples_per_problem": 1, "pass@1": acc, "avg@k": acc, "pass@k": {"1": acc},
            "ci95": [acc - 0.1, acc + 0.1]}}))
    (run / "summary.json").write_text(json.dumps({"toy_accuracy": 0.25, "seconds": {"toy-base": 0.1, "sae": 3.0},
                                                   "stages": {"toy-base": "x", "sae": "y", "rl-source": "z"}}))
    _BUILT[key] = run
    return run


def pipeline_dir(tmp_path_factory) -> Path:
    """The pipeline dir, built once per test session (every explorer test module shares it)."""
    return build(tmp_path_factory.getbasetemp() / "explorer-pipeline")


FEATURES_KW = dict(max_examples=300, n_tokens=4096, batch_size=16, n_top=6, n_quantiles=3, n_per_quantile=2,
                   progress=False)
