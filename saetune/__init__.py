"""saetune: sparse autoencoders, Resa-style SAE-Tuning and RL tools for reasoning models.

Heavy modules load on first use, so ``import saetune`` stays fast::

    from saetune import SAE, SAEConfig, train_sae
"""

from __future__ import annotations

import importlib

from .verbs import lazy_exports as _verb_exports  # cheap: the verb table only

__version__ = "0.1.0"

# name → (module, attribute); each verb's function and config class come from saetune.verbs
_LAZY = {
    **_verb_exports(),
    "SAE": ("saetune.sae", "SAE"),
    "SAEConfig": ("saetune.sae", "SAEConfig"),
    "fit_sae": ("saetune.fit", "fit_sae"),
    "ActivationStore": ("saetune.activations", "ActivationStore"),
    "load_model": ("saetune.models", "load_model"),
    "attach_sae": ("saetune.attach", "attach_sae"),
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
