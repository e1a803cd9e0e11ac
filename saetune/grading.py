"""Grading a math response against a gold answer: what is graded, math-verify with bounded time.

- :func:`extract_graded_text` / :func:`last_boxed` / :func:`last_answer_tag` — what part of a
  response is graded and which answer is read from it;
- :func:`is_correct` — math-verify grading with a bounded run time, safe from any thread, with a
  DeepScaleR-style string fallback (:func:`normalize_answer`);
- :func:`gold_parses` — whether a gold answer parses at all;
- :class:`Grader` — many gradings at once, here or spread over spawned worker processes.

Grading rules (SPEC_RL, "Grading math answers"): grade the response only, never the prompt (the
prompt itself asks for ``\\boxed{}``); after ``</think>`` when present; only the last
brace-matched ``\\boxed{...}`` (two boxes parsed together become a set and fail against a single
gold); ``verify(parse(gold), parse(pred))`` with the gold first, because math-verify is
asymmetric (gold ``x<2`` accepts ``(-\\infty, 2)``, not the other way round).

Time bounds: math-verify's timeouts use signals, which work only in a main thread. In the main
thread each parse/verify is bounded there; from any other thread (Streamlit, a server) the work
goes to one spawned worker process, which is killed when it overruns.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import math
import multiprocessing
import re
import threading
from typing import Any

from .errors import SaetuneError

__all__ = ["extract_graded_text", "last_boxed", "last_answer_tag", "normalize_answer", "is_correct", "gold_parses",
           "Grader"]

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


def is_correct(response_text: str, gold_answer: Any, timeout_s: float = 5, *, preset: str | None = None,
               benchmark: str | None = None) -> bool:
    """Whether a model response's final answer equals the gold answer.

    With ``preset`` (``"saetune"`` or ``"resa"``, see :mod:`saetune.eval_presets`) it grades as
    that preset grades ``benchmark`` (``aime24``, ``aime25``, ``amc23``, ``math500``,
    ``minerva``; ``gpqa``: ``gold_answer`` is the right letter), ``gold_answer`` being the raw
    field the preset reads (``resa``: ``answer`` for AIME/AMC, the whole ``solution`` for
    MATH500/Minerva). Without it, saetune's own grading:

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
    if isinstance(timeout_s, str):
        raise SaetuneError(f"is_correct's third argument is timeout_s, got {timeout_s!r}; pass preset= and "
                           "benchmark= by keyword")
    if timeout_s is None or not timeout_s > 0:
        raise SaetuneError(f"timeout_s={timeout_s!r}; it must be a positive number of seconds")
    if not isinstance(response_text, str):
        raise SaetuneError(f"response_text must be a string, got {type(response_text).__name__}")
    if preset is not None or benchmark is not None:
        from .eval_presets import preset_is_correct
        return preset_is_correct(response_text, gold_answer, preset or "saetune", benchmark, timeout_s)
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
# Gold answers
# --------------------------------------------------------------------------------------------

def _parse_gold(gold: str, timeout_s: int | None) -> bool:
    """Whether math-verify reads anything but the raw string back from ``$gold$``."""
    from math_verify import parse

    try:
        parsed = parse(_wrap_gold(gold), parsing_timeout=timeout_s)
    except Exception:
        return False
    return any(not isinstance(x, str) for x in parsed)  # unparsable LaTeX comes back as its own text


def gold_parses(gold_answer: Any, timeout_s: float = 5) -> bool:
    """Whether math-verify can parse a gold answer (wrapped in ``$…$``) into an expression.

    An empty gold, or one math-verify returns only as raw text (e.g. ``\\frac{``), is
    unparsable: such a problem can still be graded by the string fallback of :func:`is_correct`,
    but an evaluation reports and counts it. Bounded like :func:`is_correct`.
    """
    gold = "" if gold_answer is None else str(gold_answer).strip()
    if not gold:
        return False
    t = max(1, math.ceil(timeout_s))
    if threading.current_thread() is threading.main_thread():
        return _parse_gold(gold, t)
    pool = _get_pool()
    fut = pool.submit(_parse_gold, gold, t)
    try:
        return bool(fut.result(timeout=t + 5))
    except cf.TimeoutError:
        _kill_pool(pool)
        return False


# --------------------------------------------------------------------------------------------
# Many gradings: here or in worker processes
# --------------------------------------------------------------------------------------------

def _grade_one(text: str, gold: str, timeout_s: float) -> bool:
    return is_correct(text, gold, timeout_s=timeout_s)


def _gold_parses_one(gold: str, timeout_s: float) -> bool:
    return gold_parses(gold, timeout_s)


class Grader:
    """Grades many items at once: here, or spread over ``workers`` spawned processes (0 = here).

    In a worker each call runs in that process's main thread, so math-verify's signal timeouts
    bound it; never threads. Here (``workers=0``) the bound is :func:`is_correct`'s own: the main
    thread, or the module's single worker process from another thread. Call :meth:`close` when done.
    """

    def __init__(self, workers: int, timeout_s: float):
        self.timeout_s, self.workers = timeout_s, workers
        self.pool = (cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                     if workers else None)

    def grade(self, texts: list[str], golds: list[str]) -> list[bool]:
        """:func:`is_correct` of each response against its gold answer."""
        return self.map(_grade_one, texts, golds)

    def gold_parses(self, golds: list[str]) -> list[bool]:
        """:func:`gold_parses` of each gold answer."""
        return self.map(_gold_parses_one, golds)

    def map(self, fn, *columns: list) -> list[bool]:
        """``bool(fn(*row, timeout_s))`` for each row of ``columns``; ``fn`` must be a module-level function."""
        return [bool(x) for x in self.apply(fn, *columns)]

    def apply(self, fn, *columns: list) -> list[Any]:
        """``fn(*row, timeout_s)`` for each row of ``columns``, as returned; ``fn`` must be module-level."""
        n = len(columns[0])
        if self.pool is None:
            return [fn(*args, self.timeout_s) for args in zip(*columns)]
        try:
            return list(self.pool.map(fn, *columns, [self.timeout_s] * n, chunksize=max(1, n // (4 * self.workers))))
        except cf.process.BrokenProcessPool as e:
            raise SaetuneError("a grading worker process died; rerun with --resume (finished samples are kept)") from e

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
