"""Grading math answers and pass@k: the pure core of evaluation.

This module holds only the parts every evaluation needs and that can be tested without a model:

- :func:`extract_graded_text` / :func:`last_boxed` — what part of a response is graded;
- :func:`is_correct` — math-verify grading with a bounded run time, safe from any thread;
- :func:`pass_at_k`, :func:`avg_at_k`, :func:`summarize` — the numbers in ``eval/results.json``;
- :func:`load_benchmark` — ``problem``/``answer`` rows from a local JSONL or a HF dataset id.

Generation backends, the ``saetune eval`` CLI verb (``saetune.evaluate.run(cfg)``) and the
benchmark runs that write ``eval/results.json`` and ``eval/samples.jsonl`` come later.

Grading rules (SPEC_RL, "Grading math answers"): grade the response only, never the prompt (the
prompt itself asks for ``\\boxed{}``); after ``</think>`` when present; only the last
brace-matched ``\\boxed{...}`` (two boxes parsed together become a set and fail against a single
gold); ``verify(parse(gold), parse(pred))`` with the gold first, because math-verify is
asymmetric (gold ``x<2`` accepts ``(-\\infty, 2)``, not the other way round).
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import math
import multiprocessing
import re
import threading
from typing import Any, Sequence

from .errors import SaetuneError

__all__ = [
    "extract_graded_text", "last_boxed", "last_answer_tag", "normalize_answer", "is_correct",
    "pass_at_k", "avg_at_k", "summarize", "load_benchmark",
]

# --------------------------------------------------------------------------------------------
# What is graded
# --------------------------------------------------------------------------------------------

_THINK_END = "</think>"
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def extract_graded_text(response: str) -> str:
    """The part of a response that is graded: the text after the last ``</think>``, else all of it.

    Pass the model's response only — never prompt + response.
    """
    i = response.rfind(_THINK_END)
    return response if i < 0 else response[i + len(_THINK_END):]


def _match_brace(text: str, open_idx: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_idx``, or -1; ``\\{`` / ``\\}`` are skipped."""
    depth = 0
    i = open_idx
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped char (\{, \}, \\) never opens or closes a group
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def last_boxed(text: str) -> str | None:
    """Content of the last brace-matched ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed {...}``).

    Braces nest (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``). "Last" is by start position
    among the boxes whose brace closes, so an unclosed trailing box (a truncated response) is
    ignored, and for ``\\boxed{\\boxed{1}}`` the inner ``1`` is returned. ``None`` if there is no
    closed box.
    """
    best = None
    for m in _BOX_RE.finditer(text):
        open_idx = m.end() - 1
        close = _match_brace(text, open_idx)
        if close >= 0:
            best = text[open_idx + 1:close]
    return best


def last_answer_tag(text: str) -> str | None:
    """Content of the last ``<answer> ... </answer>`` with a leading ``Answer:`` removed, or ``None``."""
    tags = _ANSWER_TAG_RE.findall(text)
    if not tags:
        return None
    content = re.sub(r"^\s*answer\s*:\s*", "", tags[-1], flags=re.IGNORECASE).strip()
    return content or None


def _prediction(response_text: str) -> str | None:
    """The predicted answer string: last box of the graded text, else the last answer tag."""
    graded = extract_graded_text(response_text)
    boxed = last_boxed(graded)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    return last_answer_tag(graded)


# --------------------------------------------------------------------------------------------
# DeepScaleR-style string fallback
# --------------------------------------------------------------------------------------------

_TEXT_WRAP_RE = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{(.*)\}$", re.DOTALL)


def normalize_answer(s: str) -> str:
    """Normalised answer string for the DeepScaleR-style fallback match.

    Removes dollar signs, ``\\left``/``\\right``, ``\\!``, degree marks (``^\\circ``,
    ``^{\\circ}``), a whole-answer ``\\text{...}`` wrapper, all whitespace and a trailing ``.``.
    """
    s = str(s).strip().replace("$", "")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.strip()
    m = _TEXT_WRAP_RE.match(s)
    if m and _match_brace(s, s.index("{")) == len(s) - 1:  # only if the wrapper spans the answer
        s = m.group(1)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


# --------------------------------------------------------------------------------------------
# math-verify grading with a bounded run time
# --------------------------------------------------------------------------------------------

def _wrap_gold(gold: str) -> str:
    """``$gold$``: bare LaTeX like ``\\left( 3, \\frac{\\pi}{2} \\right)`` otherwise parses to ``3``."""
    g = gold.strip()
    if len(g) >= 2 and g.startswith("$") and g.endswith("$"):
        g = g.strip("$").strip()
    return f"${g}$"


def _grade(pred: str, gold: str, timeout_s: int | None) -> bool:
    """math-verify, gold first; with ``timeout_s`` only in a main thread (its timeouts use signals).

    Any exception (parse failure, timeout, sympy error) counts as incorrect.
    """
    from math_verify import parse, verify

    try:
        gold_parsed = parse(_wrap_gold(gold), parsing_timeout=timeout_s)
        pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout_s)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))
    except Exception:
        return False


_POOL: cf.ProcessPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_POOL_START_TIMEOUT_S = 120.0  # a fresh spawned worker imports sympy + math-verify


def _ping() -> bool:
    import math_verify  # noqa: F401  (warms the worker's imports)
    return True


def _get_pool() -> cf.ProcessPoolExecutor:
    """The module's grading pool: one spawned worker, created on first use from a non-main thread.

    ``spawn`` (not ``fork``): forking a process that runs other threads (Streamlit) can deadlock.
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            pool.submit(_ping).result(timeout=_POOL_START_TIMEOUT_S)
            _POOL = pool
            atexit.register(_shutdown_pool)
        return _POOL


def _shutdown_pool() -> None:
    """At exit: stop the worker before the interpreter tears down the executor's module globals."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _kill_pool(pool: cf.ProcessPoolExecutor) -> None:
    """Drop a pool whose worker overran its time, killing the worker so it cannot pile up."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is pool:
            _POOL = None
    for p in list(getattr(pool, "_processes", {}).values()):  # no public API to kill workers
        p.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _grade_bounded(pred: str, gold: str, timeout_s: float) -> bool:
    """Grade in this thread if it is the main thread, else in the worker process; never hang."""
    t = max(1, math.ceil(timeout_s))  # math-verify takes whole seconds
    if threading.current_thread() is threading.main_thread():
        return _grade(pred, gold, t)
    try:
        pool = _get_pool()
    except Exception as e:
        raise SaetuneError(
            f"could not start the grading worker process ({type(e).__name__}: {e}); grading outside the "
            "main thread needs one (math-verify's timeouts fail in threads). Run from a script file "
            "whose top-level code is under `if __name__ == '__main__':`, or grade in the main thread") from e
    fut = pool.submit(_grade, pred, gold, t)
    try:
        # parse(gold) + parse(pred) + verify are each bounded by t inside the worker; margin for IPC.
        return bool(fut.result(timeout=3 * t + 5))
    except cf.TimeoutError:
        _kill_pool(pool)
        return False
    except cf.process.BrokenProcessPool as e:
        _kill_pool(pool)
        raise SaetuneError(f"the grading worker process died while grading {pred!r} against {gold!r}") from e


def is_correct(response_text: str, gold_answer: Any, timeout_s: float = 5) -> bool:
    """Whether a model response's final answer equals the gold answer.

    1. Graded text: after the last ``</think>`` of the response (:func:`extract_graded_text`).
    2. Prediction: the last brace-matched ``\\boxed{...}``, else the last ``<answer>...</answer>``
       (leading ``Answer:`` stripped); none -> ``False``.
    3. ``verify(parse("$gold$"), parse("\\boxed{pred}"))`` — gold first (math-verify is
       asymmetric). Each parse/verify is bounded by ``timeout_s`` seconds (rounded up): through
       math-verify's signal timeouts in the main thread, in a spawned worker process from any
       other thread (math-verify's timeouts fail in threads). Errors and timeouts -> ``False``.
    4. DeepScaleR-style fallback when math-verify says no: the normalised strings are equal
       (:func:`normalize_answer`) — catches text answers math-verify cannot parse.
    """
    if timeout_s is None or not timeout_s > 0:
        raise SaetuneError(f"timeout_s={timeout_s!r}; it must be a positive number of seconds")
    if not isinstance(response_text, str):
        raise SaetuneError(f"response_text must be a string, got {type(response_text).__name__}")
    pred = _prediction(response_text)
    if pred is None or gold_answer is None:
        return False
    gold = str(gold_answer).strip()
    if not gold:
        return False
    if _grade_bounded(pred, gold, timeout_s):
        return True
    norm_pred = normalize_answer(pred)
    return bool(norm_pred) and norm_pred == normalize_answer(gold)


# --------------------------------------------------------------------------------------------
# pass@k and the results layout
# --------------------------------------------------------------------------------------------

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


def _default_ks(n: int) -> list[int]:
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
    ks = _default_ks(s) if ks is None else list(ks)
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


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------

def load_benchmark(source: str, problem_field: str = "problem", answer_field: str = "answer",
                   limit: int = 0, split: str = "train") -> list[dict[str, str]]:
    """Rows ``{"problem": str, "answer": str}`` from a local JSONL/JSON/Parquet file or a HF id.

    Reads through :func:`saetune.data.read_records`; ``limit`` > 0 keeps the first rows. A row
    missing ``problem_field`` or ``answer_field`` is an error naming the field and the fields
    present. Answers are stringified (some datasets store AIME answers as ints).
    """
    from .data import read_records

    rows = read_records(source, split=split, limit=limit)
    out = []
    for i, row in enumerate(rows):
        for field in (problem_field, answer_field):
            if field not in row:
                raise SaetuneError(f"benchmark {source!r} row {i} has no field {field!r}; fields present: "
                                   f"{sorted(row)} (set problem_field/answer_field)")
        out.append({"problem": str(row[problem_field]), "answer": str(row[answer_field]).strip()})
    return out
