"""saetune: sparse autoencoders, Resa-style SAE-Tuning and RL tools for reasoning models.

Heavy modules load on first use, so ``import saetune`` stays fast::

    from saetune import SAE, SAEConfig, train_sae
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "SAE": ("saetune.sae", "SAE"),
    "SAEConfig": ("saetune.sae", "SAEConfig"),
    "train_sae": ("saetune.sae_trainer", "train_sae"),
    "fit_sae": ("saetune.fit", "fit_sae"),
    "eval_sae": ("saetune.sae_eval", "eval_sae"),
    "EvalSAEConfig": ("saetune.sae_eval", "EvalSAEConfig"),
    "TrainSAEConfig": ("saetune.sae_trainer", "TrainSAEConfig"),
    "ActivationStore": ("saetune.activations", "ActivationStore"),
    "cache": ("saetune.activations", "cache"),
    "CacheConfig": ("saetune.activations", "CacheConfig"),
    "load_model": ("saetune.models", "load_model"),
    "demo": ("saetune.demo_pipeline", "demo"),
    "tune": ("saetune.tuning", "tune"),
    "TuneConfig": ("saetune.tuning", "TuneConfig"),
    "merge": ("saetune.merging", "merge"),
    "attach_sae": ("saetune.attach", "attach_sae"),
    "run_pipeline": ("saetune.pipeline", "run_pipeline"),
    "SaetuneError": ("saetune.errors", "SaetuneError"),
    "saes": ("saetune.hooked", "saes"),
    "run_with_cache": ("saetune.hooked", "run_with_cache"),
    "run_with_saes": ("saetune.hooked", "run_with_saes"),
    "run_with_hooks": ("saetune.hooked", "run_with_hooks"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'saetune' has no attribute {name!r}")
