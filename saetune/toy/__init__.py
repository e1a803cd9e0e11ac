"""The built-in model organism: a tiny Qwen2 reasoning model for a synthetic arithmetic task.

``load_toy()`` gives the shipped model (``saetune/toy/base``) and its word-level tokenizer;
``toy_texts`` gives task texts for activation capture; ``build_toy`` retrains it. See
:mod:`saetune.toy.task` for the task and its reasoning-trace format.

Names load on first use, so ``import saetune.toy.task`` pulls in neither torch nor transformers
(and ``python -m saetune.toy.build`` runs without importing the module twice).
"""

from __future__ import annotations

from saetune._lazy import lazy_exports

_LAZY = {
    **{name: "saetune.toy.task" for name in (
        "Problem", "example", "examples", "extract_answer", "is_correct", "make_problem", "prompt",
        "sample_problem", "solution")},
    "build_tokenizer": "saetune.toy.tokenizer",
    **{name: "saetune.toy.model" for name in ("build_model", "toy_config")},
    **{name: "saetune.toy.build" for name in (
        "ToyBuildConfig", "build_toy", "evaluate_toy", "generate_responses", "load_toy", "ship_base",
        "shipped_base_path", "toy_texts")},
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)
