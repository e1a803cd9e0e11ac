"""Scoring sampled answers: pass@k, avg@k and one benchmark's entry of ``eval/results.json``.

Pure functions of a correctness matrix ``correct[problem][sample]`` (bools), no model needed:
:func:`pass_at_k` (the unbiased estimator of Chen et al. 2021), :func:`avg_at_k` and
:func:`summarize` (pass@1, avg@k, pass@k for several k, a bootstrap 95 % interval of pass@1).
"""

from __future__ import annotations

from typing import Any, Sequence

from .errors import SaetuneError

__all__ = ["pass_at_k", "avg_at_k", "default_ks", "summarize"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct.

    pass@k = 1 − C(n−c, k) / C(n, k) = 1 − Π_{i=n−c+1}^{n} (1 − k/i)   (Chen et al. 2021,
    HumanEval), the product form being numerically stable; 1.0 when c ≥ n − k + 1 (every
    k-subset holds a correct sample).
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise SaetuneError(f"pass_at_k: {name}={v!r} must be an int")
    if n < 1:
        raise SaetuneError(f"pass_at_k: n={n} samples; need n >= 1")
    if not 0 <= c <= n:
        raise SaetuneError(f"pass_at_k: c={c} correct out of n={n}; need 0 <= c <= n")
    if not 1 <= k <= n:
        raise SaetuneError(f"pass_at_k: k={k} with n={n} samples; need 1 <= k <= n")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _check_matrix(correct: Sequence[Sequence[bool]]) -> int:
    """Samples per problem of a rectangular, non-empty correctness matrix."""
    if len(correct) == 0:
        raise SaetuneError("no problems to score: the correctness matrix is empty")
    lengths = sorted({len(row) for row in correct})
    if len(lengths) != 1:
        raise SaetuneError(f"every problem needs the same number of samples; got row lengths {lengths}")
    if lengths[0] == 0:
        raise SaetuneError("every problem needs at least one sample; got rows of length 0")
    return lengths[0]


def avg_at_k(correct_matrix: Sequence[Sequence[bool]]) -> float:
    """avg@k = (1/P) Σ_p (1/k) Σ_j correct[p][j]: mean accuracy over all k samples per problem."""
    k = _check_matrix(correct_matrix)
    return sum(sum(bool(x) for x in row) for row in correct_matrix) / (k * len(correct_matrix))


def default_ks(n: int) -> list[int]:
    """The default k values of pass@k for ``n`` samples per problem: 1, 4, 16, … up to ``n``."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 4
    return ks


def summarize(correct: Sequence[Sequence[bool]], ks: Sequence[int] | None = None,
              n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """One benchmark's entry of ``eval/results.json`` from ``correct[problem][sample]``.

    Returns ``{"n": problems, "samples_per_problem": s, "pass@1": …, "avg@k": …,
    "pass@k": {"1": …, "4": …}, "ci95": [lo, hi]}``. pass@k is :func:`pass_at_k` averaged over
    problems; ``ks`` defaults to 1, 4, 16, … up to ``s``; the ``pass@k`` keys are strings so the
    dict is the same after a JSON round trip. ``ci95`` is the 2.5/97.5 percentile interval of
    pass@1 over ``n_boot`` bootstrap resamples of the problems (seeded by ``seed``).
    """
    import numpy as np

    s = _check_matrix(correct)
    ks = default_ks(s) if ks is None else list(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= s:
            raise SaetuneError(f"pass@k: k={k!r} is not valid with {s} samples per problem; need 1 <= k <= {s}")
    if n_boot < 1:
        raise SaetuneError(f"n_boot={n_boot}; need at least 1 bootstrap resample")
    counts = [sum(bool(x) for x in row) for row in correct]
    pass_k = {str(k): float(np.mean([pass_at_k(s, c, k) for c in counts])) for k in ks}
    per_problem = np.asarray(counts, dtype=float) / s  # pass@1 of each problem = c/s
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_problem), size=(n_boot, len(per_problem)))
    boot = per_problem[idx].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {
        "n": len(correct),
        "samples_per_problem": s,
        "pass@1": float(per_problem.mean()),
        "avg@k": avg_at_k(correct),
        "pass@k": pass_k,
        "ci95": [float(lo), float(hi)],
    }

