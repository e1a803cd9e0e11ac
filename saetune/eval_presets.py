"""Evaluation presets: what a benchmark problem becomes as a prompt and how a response is graded.

Two presets (``EvalConfig.preset``, ``saetune eval --preset``):

- ``saetune`` (the default): the problem as the user message, with "Please reason step by step,
  and put your final answer within \\boxed{}." appended when it does not mention ``\\boxed``;
  gold = the ``answer`` field; graded strictly by :func:`saetune.grading.is_correct` (after
  ``</think>``, the last box only, gold first, a string fallback).
- ``resa``: the reference evaluation behind Resa's table (SPEC_RESA.md, "How the reference
  evaluation is configured exactly"): the user message is :data:`RESA_MATH_INSTRUCTION`, a blank
  line and the problem (chat template, no system prompt); golds are the ``answer`` field parsed
  as an expression (AIME24/25, AMC23) or the whole ``solution`` text with its LaTeX (boxed)
  answer extracted (MATH500, Minerva); predictions are extracted from the whole response by
  math-verify with an expression and a LaTeX target (boxed matches first), the first string
  match kept as a fallback candidate, and the response is correct when any candidate equals any
  gold candidate at ``float_rounding=5``; 32,768 tokens in total (4,096 for Qwen2.5-Math-1.5B).

Local copies of the benchmarks may end each problem with an instruction sentence and lack
``solution``: under ``resa`` a known trailing instruction (:data:`KNOWN_INSTRUCTIONS`) is cut
before the template is filled and ``\\boxed{answer}`` stands in for the solution; each sample
records what was done (``prompt_edits``, ``gold_source``).

GPQA-Diamond is multiple choice and evaluated the same under both presets: the reference's
prompt (:data:`GPQA_INSTRUCTION`, the question, the lines ``A) …`` to ``D) …``), the correct
answer at a seeded random one of the four places (:func:`gpqa_choices`), the letter read from
the response (:func:`extract_letter`) and compared with the right one.
"""

from __future__ import annotations

import re
import threading
import zlib
from typing import Any, Mapping, Sequence

from .benchmarks import BOXED_INSTRUCTION, GPQA_NAMES, canonical_benchmark
from .errors import SaetuneError

__all__ = ["PRESETS", "RESA_MATH_INSTRUCTION", "GPQA_INSTRUCTION", "KNOWN_INSTRUCTIONS", "strip_instruction",
           "prompt_messages", "gpqa_choices", "extract_letter", "resa_gold_kind", "resa_gold", "grade_one",
           "gold_ok", "grade_kind", "preset_is_correct", "resa_lengths"]

PRESETS = ("saetune", "resa")

#: The reference's user message before the problem (two spaces after "clearly.").
RESA_MATH_INSTRUCTION = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be of the "
    "following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' (without quotes) "
    "where ANSWER is just the final number or expression that solves the problem. Think step by step before "
    "answering.")
#: The reference's GPQA-Diamond user message before the question and its four choices.
GPQA_INSTRUCTION = (
    "Answer the following multiple choice question. The last line of your response should be of the following "
    "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before answering.")
#: Instruction sentences local benchmark copies append to a problem (the vendored files: the first).
KNOWN_INSTRUCTIONS = (
    BOXED_INSTRUCTION,
    "Let's think step by step and output the final answer within \\boxed{}.",
)
LETTERS = "ABCD"

#: How the resa preset reads each benchmark's gold: ``expr`` = the ``answer`` field parsed as an
#: expression, ``latex`` = the ``solution`` text with its (boxed) LaTeX answer extracted.
RESA_GOLD_KINDS = {"aime24": "expr", "aime25": "expr", "amc23": "expr", "math500": "latex", "minerva": "latex"}

# math-verify settings of the reference (SPEC_RESA.md)
RESA_FALLBACK_MODE = "first_match"  # the first string match joins the candidates even when it does not parse
# SPEC_RESA names no extraction mode: the reference's metric keeps the default, which tries each match (rightmost
# first, by priority) until one parses, rather than giving up after the first
RESA_EXTRACTION_MODE = "any_match"
RESA_FLOAT_ROUNDING = 5             # "precision=5"
#: Total tokens (prompt + response) and new tokens of the reference; Qwen2.5-Math-1.5B's context is 4,096.
RESA_MAX_TOKENS, RESA_MATH_MODEL_MAX_TOKENS = 32768, 4096


def _check_preset(preset: Any) -> str:
    if preset not in PRESETS:
        raise SaetuneError(f"preset {preset!r}; valid: {', '.join(PRESETS)}")
    return preset


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

def strip_instruction(problem: str) -> tuple[str, bool]:
    """``(problem without a known trailing instruction sentence, whether one was cut)``."""
    text = problem.rstrip()
    for sentence in KNOWN_INSTRUCTIONS:
        if text.endswith(sentence):
            return text[:-len(sentence)].rstrip(), True
    return problem, False


def _user_message(problem: str, preset: str, add_instruction: bool = True) -> tuple[str, list[str]]:
    """The user message of a math problem under ``preset`` and the edits made to the problem text."""
    if preset == "resa":
        question, cut = strip_instruction(problem)
        return f"{RESA_MATH_INSTRUCTION}\n\n{question}", ["stripped trailing instruction"] if cut else []
    if add_instruction and "\\boxed" not in problem:
        return f"{problem.rstrip()}\n{BOXED_INSTRUCTION}", ["appended boxed instruction"]
    return problem, []


def gpqa_prompt(question: str, choices: Sequence[str]) -> str:
    """The reference's GPQA user message: instruction, blank line, question, blank line, ``A) …`` to ``D) …``."""
    if len(choices) != 4:
        raise SaetuneError(f"a GPQA question has 4 choices, got {len(choices)}")
    lines = "\n".join(f"{letter}) {c}" for letter, c in zip(LETTERS, choices))
    return f"{GPQA_INSTRUCTION}\n\n{question}\n\n{lines}"


def prompt_messages(problem: str | Mapping[str, Any], preset: str, *, add_instruction: bool = True
                    ) -> list[dict[str, str]]:
    """The chat messages ``preset`` sends for one problem (one user turn, no system prompt).

    ``problem`` is a math problem's text, or for GPQA a mapping with ``question`` and
    ``choices`` (the four answers in A–D order; :func:`gpqa_choices` places them). ``resa``:
    :data:`RESA_MATH_INSTRUCTION`, a blank line and the problem with a known trailing instruction
    cut; ``saetune``: the problem, with the boxed instruction appended when it has no ``\\boxed``
    and ``add_instruction``.

    >>> prompt_messages("What is 1+1?", "resa")[0]["content"].endswith("answering.\\n\\nWhat is 1+1?")
    True
    """
    _check_preset(preset)
    if isinstance(problem, Mapping):
        return [{"role": "user", "content": gpqa_prompt(str(problem["question"]), list(problem["choices"]))}]
    if not isinstance(problem, str):
        raise SaetuneError(f"problem must be a string (or a GPQA mapping), got {type(problem).__name__}")
    return [{"role": "user", "content": _user_message(problem, preset, add_instruction)[0]}]


# --------------------------------------------------------------------------------------------
# GPQA: choices and letters
# --------------------------------------------------------------------------------------------

def gpqa_choices(correct: str, incorrect: Sequence[str], seed: int, index: int) -> tuple[list[str], str]:
    """``(choices in A–D order, gold letter)``: the correct answer at a seeded random place.

    The place is ``crc32("gpqa:{seed}:{index}") % 4`` (the same for every sample of a problem and
    for every run with this seed); the incorrect answers fill the other places in their order.
    """
    if len(incorrect) != 3:
        raise SaetuneError(f"a GPQA question has 3 incorrect answers, got {len(incorrect)}")
    pos = zlib.crc32(f"gpqa:{seed}:{index}".encode()) % 4
    choices = list(incorrect)
    choices.insert(pos, correct)
    return choices, LETTERS[pos]


# "Answer: B", "**Answer:** B", "Answer: $B$", "answer is (C)", "Answer: \boxed{D}", "ANSWER: \textbf{A}"
_LETTER_RE = re.compile(r"(?i:answer)\s*(?:(?i:is)\s*)?[:：]?[\s*_$(\[{]*"
                        r"(?:\\(?:boxed|text|textbf|mathbf|mathrm)\s*\{[\s*_$(]*)?([ABCD])(?![A-Za-z0-9])")
_BOXED_LETTER_RE = re.compile(r"\\boxed\s*\{\s*(?:\\(?:text|textbf|mathrm)\s*\{\s*)?\(?([ABCD])\)?\s*\}")


def extract_letter(response: str) -> str | None:
    """The chosen letter: the last ``Answer: X`` (any case of "answer", ``$X$``, bold, ``(X)``,
    ``\\boxed{X}``, ``\\text{X}`` around it), else the last ``\\boxed{X}``; ``None`` if neither."""
    found = _LETTER_RE.findall(response) or _BOXED_LETTER_RE.findall(response)
    return found[-1] if found else None


# --------------------------------------------------------------------------------------------
# Golds
# --------------------------------------------------------------------------------------------

def resa_gold_kind(benchmark: str) -> str:
    """``expr``, ``latex`` or ``letter``: how the resa preset reads the gold of ``benchmark``.

    Benchmarks outside the reference's five read like MATH500 (``solution``, else
    ``\\boxed{answer}``), which :func:`resa_gold` records per sample.
    """
    name = canonical_benchmark(benchmark) or benchmark
    if name in GPQA_NAMES:
        return "letter"
    return RESA_GOLD_KINDS.get(name, "latex")


def resa_gold(row: Mapping[str, Any], kind: str) -> tuple[str, str]:
    """``(gold text, where it came from)`` of a benchmark row for gold kind ``kind``.

    ``expr``: the ``answer`` field. ``latex``: the whole ``solution`` field, or — for copies
    without one — ``\\boxed{answer}``, so that the same LaTeX extraction reads it.
    """
    if kind == "expr":
        return str(row.get("answer", "")), "answer"
    solution = row.get("solution")
    if solution is not None and str(solution).strip():
        return str(solution), "solution"
    return f"\\boxed{{{row.get('answer', '')}}}", "\\boxed{answer} (no solution field)"


# --------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------

def _math_verify_configs(kind: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig
    gold = [ExprExtractionConfig()] if kind == "expr" else [LatexExtractionConfig()]
    pred = [ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0)]
    return gold, pred


def _parse(text: str, config, t: int | None) -> list:
    from math_verify import parse
    try:
        return list(parse(text, config, fallback_mode=RESA_FALLBACK_MODE, extraction_mode=RESA_EXTRACTION_MODE,
                          parsing_timeout=t))
    except Exception:
        return []


def _resa_grade_here(response: str, gold: str, kind: str, t: int | None) -> dict[str, Any]:
    from math_verify import verify

    gold_cfg, pred_cfg = _math_verify_configs(kind)
    gold_parsed = _parse(gold, gold_cfg, t)
    pred_parsed = _parse(response, pred_cfg, t)
    correct = False
    if gold_parsed and pred_parsed:
        try:  # gold first; with lists, verify is true when any pair matches (the best over candidates)
            correct = bool(verify(gold_parsed, pred_parsed, float_rounding=RESA_FLOAT_ROUNDING, timeout_seconds=t))
        except Exception:
            correct = False
    return {"correct": correct, "extracted": [str(x) for x in pred_parsed],
            "gold_extracted": [str(x) for x in gold_parsed]}


def _gold_ok_here(gold: str, kind: str, t: int | None) -> bool:
    return any(not isinstance(x, str) for x in _parse(gold, _math_verify_configs(kind)[0], t))


def _bounded(fn, *args, timeout_s: float, calls: int = 3):
    """``fn(*args, t)`` with t = ``timeout_s`` in whole seconds: here in the main thread (math-verify's
    signal timeouts), else in :mod:`saetune.grading`'s worker process; ``None`` when it overruns."""
    import concurrent.futures as cf
    import math

    from . import grading

    t = max(1, math.ceil(timeout_s))
    if threading.current_thread() is threading.main_thread():
        return fn(*args, t)
    try:
        pool = grading._get_pool()
    except Exception as e:
        raise SaetuneError(f"could not start the grading worker process ({type(e).__name__}: {e}); grading "
                           "outside the main thread needs one (math-verify's timeouts fail in threads)") from e
    fut = pool.submit(fn, *args, t)
    try:
        return fut.result(timeout=calls * t + 5)
    except cf.TimeoutError:
        grading._kill_pool(pool)
        return None


def grade_one(response: str, gold: str, kind: str, timeout_s: float = 5) -> dict[str, Any]:
    """Grade one response; ``{"correct", "extracted", "gold_extracted"}`` (candidates as strings).

    ``kind``: ``saetune`` (:func:`saetune.grading.is_correct`; ``extracted`` holds the graded
    box or answer tag), ``expr`` / ``latex`` (the resa preset's math-verify grading, gold read as
    that kind), ``letter`` (GPQA: :func:`extract_letter` equals ``gold``). A module-level
    function, so :class:`saetune.grading.Grader` can run it in worker processes.
    """
    if kind == "saetune":
        from .grading import _prediction, is_correct
        pred = _prediction(response)
        return {"correct": is_correct(response, gold, timeout_s=timeout_s),
                "extracted": [] if pred is None else [pred], "gold_extracted": None}
    if kind == "letter":
        letter = extract_letter(response)
        return {"correct": letter is not None and letter == str(gold).strip().upper(),
                "extracted": [] if letter is None else [letter], "gold_extracted": [str(gold).strip().upper()]}
    if kind not in ("expr", "latex"):
        raise SaetuneError(f"grading kind {kind!r}; valid: saetune, expr, latex, letter")
    out = _bounded(_resa_grade_here, response, str(gold), kind, timeout_s=timeout_s)
    return out if out is not None else {"correct": False, "extracted": [], "gold_extracted": []}


def gold_ok(gold: str, kind: str, timeout_s: float = 5) -> bool:
    """Whether a gold parses under grading kind ``kind`` (see :func:`grade_one`)."""
    if kind == "saetune":
        from .grading import gold_parses
        return gold_parses(gold, timeout_s)
    if kind == "letter":
        return str(gold).strip().upper() in tuple(LETTERS)
    return bool(_bounded(_gold_ok_here, str(gold), kind, timeout_s=timeout_s, calls=1))


def grade_kind(preset: str, benchmark: str | None) -> str:
    """The grading kind of ``benchmark`` under ``preset`` (GPQA: ``letter`` under both)."""
    _check_preset(preset)
    name = canonical_benchmark(benchmark) if benchmark else None
    if name in GPQA_NAMES:
        return "letter"
    if preset == "saetune":
        return "saetune"
    if name not in RESA_GOLD_KINDS:
        raise SaetuneError(f"preset 'resa' grades per benchmark; benchmark={benchmark!r}, valid: "
                           f"{', '.join([*RESA_GOLD_KINDS, *GPQA_NAMES])}")
    return RESA_GOLD_KINDS[name]


def preset_is_correct(response: str, gold: Any, preset: str, benchmark: str | None, timeout_s: float = 5) -> bool:
    """:func:`saetune.grading.is_correct` with a preset: grade as ``preset`` grades ``benchmark``."""
    if gold is None:
        return False
    return bool(grade_one(response, str(gold), grade_kind(preset, benchmark), timeout_s)["correct"])


# --------------------------------------------------------------------------------------------
# Length
# --------------------------------------------------------------------------------------------

def resa_lengths(names: Sequence[str | None]) -> int:
    """The reference's total token budget for a model known by ``names`` (paths, hub ids):
    4,096 when one names Qwen2.5-Math-1.5B, else 32,768 (new tokens are capped at the same)."""
    if any(n and "qwen2.5-math-1.5b" in str(n).lower() for n in names):
        return RESA_MATH_MODEL_MAX_TOKENS
    return RESA_MAX_TOKENS
