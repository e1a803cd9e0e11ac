"""A synthetic arithmetic task whose solutions read like reasoning traces.

A problem is a chain of two operations on operands 1..9, evaluated left to right and written
with explicit parentheses, ``( a op1 b ) op2 c``; ops come from ``+ - *`` with at most one
``*`` so every value stays in a small range (``-72 .. 162``; negatives allowed). Every token is
a space-separated word, so a word-level tokenizer covers the task exactly.

A solution is a trace in the shape of a reasoning model's output::

    <think> 3 + 4 = 7 . 7 * 2 = 14 . wait , let me check : 7 * 2 = 14 .
    therefore the answer is 14 . </think> <answer> 14 </answer>

After each step the re-verification phrase ``wait , let me check :`` (restating the step)
appears with probability ``check_prob``: a cheap stand-in for the "wait"/"let me check"
patterns that SAE features pick up in real reasoning traces. Everything is a pure function
of a ``random.Random``, so a seed fixes every problem and every trace.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from typing import Any

from ..errors import SaetuneError

OPS = ("+", "-", "*")
OPERANDS = tuple(range(1, 10))
N_OPS = 2
CHECK_PHRASE = "wait , let me check :"
CONCLUSION = "therefore the answer is"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
SPECIAL_WORDS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
#: Every non-number word the task writes (prompts, steps, phrases), in a fixed order.
WORDS = ("User", ":", "compute", "Assistant", "(", ")", "+", "-", "*", "=", ".",
         "wait", ",", "let", "me", "check", "therefore", "the", "answer", "is")


def apply_op(x: int, op: str, y: int) -> int:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    raise SaetuneError(f"unknown op {op!r}; valid ops: {', '.join(OPS)}")


@dataclass(frozen=True)
class Problem:
    """``( operands[0] ops[0] operands[1] ) ops[1] operands[2]``, evaluated left to right."""

    question: str  # the user's request, e.g. "compute ( 3 + 4 ) * 2 ."
    operands: tuple[int, ...]
    ops: tuple[str, ...]
    answer: int

    @property
    def expression(self) -> str:
        """The bare expression, e.g. ``( 3 + 4 ) * 2``."""
        return _expression(self.operands, self.ops)

    def steps(self) -> list[tuple[int, str, int, int]]:
        """The left-to-right steps ``(x, op, y, x op y)``."""
        out, acc = [], self.operands[0]
        for op, y in zip(self.ops, self.operands[1:]):
            res = apply_op(acc, op, y)
            out.append((acc, op, y, res))
            acc = res
        return out


def _expression(operands: tuple[int, ...], ops: tuple[str, ...]) -> str:
    # Parenthesise every prefix but the whole: ( ( a + b ) - c ) * d for longer chains.
    text = str(operands[0])
    for i, (op, y) in enumerate(zip(ops, operands[1:])):
        text = f"{text} {op} {y}"
        if i < len(ops) - 1:
            text = f"( {text} )"
    return text


def make_problem(operands: tuple[int, ...], ops: tuple[str, ...]) -> Problem:
    """The problem for given operands and ops (checked against the task's rules)."""
    operands, ops = tuple(operands), tuple(ops)
    if len(operands) != len(ops) + 1:
        raise SaetuneError(f"{len(ops)} ops need {len(ops) + 1} operands, got {len(operands)}")
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise SaetuneError(f"unknown op {bad[0]!r}; valid ops: {', '.join(OPS)}")
    if ops.count("*") > 1:
        raise SaetuneError(f"at most one '*' per problem keeps values small; got ops {ops}")
    acc = operands[0]
    for op, y in zip(ops, operands[1:]):
        acc = apply_op(acc, op, y)
    question = f"compute {_expression(operands, ops)} ."
    return Problem(question=question, operands=operands, ops=ops, answer=acc)


def _op_chains() -> list[tuple[str, ...]]:
    return [c for c in itertools.product(OPS, repeat=N_OPS) if c.count("*") <= 1]


OP_CHAINS = tuple(_op_chains())


def sample_problem(rng: random.Random) -> Problem:
    """A uniformly random problem: ops chain uniform over the allowed chains, operands 1..9."""
    ops = rng.choice(OP_CHAINS)
    operands = tuple(rng.choice(OPERANDS) for _ in range(N_OPS + 1))
    return make_problem(operands, ops)


def all_problems() -> list[Problem]:
    """Every problem the task can pose (a few thousand), in a fixed order."""
    return [make_problem(operands, ops) for ops in OP_CHAINS
            for operands in itertools.product(OPERANDS, repeat=N_OPS + 1)]


def value_range() -> tuple[int, int]:
    """Smallest and largest integer any operand, intermediate or answer can take."""
    vals = set(OPERANDS)
    for p in all_problems():
        vals.update(r for *_, r in p.steps())
    return min(vals), max(vals)


def prompt(problem: Problem) -> str:
    """The chat-formatted prompt, e.g. ``User : compute ( 3 + 4 ) * 2 . Assistant :``."""
    return f"User : {problem.question} Assistant :"


def solution(problem: Problem, rng: random.Random, check_prob: float = 0.3) -> str:
    """A reasoning trace that solves ``problem``; each step is re-checked with ``check_prob``."""
    if not 0.0 <= check_prob <= 1.0:
        raise SaetuneError(f"check_prob must lie in [0, 1], got {check_prob}")
    parts = [THINK_OPEN]
    for x, op, y, res in problem.steps():
        step = f"{x} {op} {y} = {res} ."
        parts.append(step)
        if rng.random() < check_prob:
            parts.append(f"{CHECK_PHRASE} {step}")
    parts.append(f"{CONCLUSION} {problem.answer} . {THINK_CLOSE}")
    parts.append(f"{ANSWER_OPEN} {problem.answer} {ANSWER_CLOSE}")
    return " ".join(parts)


def max_response_words() -> int:
    """Words in the longest possible response (every step re-checked)."""
    p = make_problem((9,) * (N_OPS + 1), OP_CHAINS[0])
    return len(solution(p, random.Random(0), check_prob=1.0).split())


def example(rng: random.Random, check_prob: float = 0.3) -> dict[str, Any]:
    """One training/eval example: ``problem``, ``prompt``, ``response``, ``answer``, ``text``."""
    p = sample_problem(rng)
    pr, resp = prompt(p), solution(p, rng, check_prob)
    return {"problem": p.question, "prompt": pr, "response": resp, "answer": str(p.answer),
            "text": f"{pr} {resp}"}


def cot_free(ex: dict[str, Any]) -> dict[str, Any]:
    """The example without its reasoning: the think holds only the answer (Resa's CoT-free data text)."""
    resp = f"{THINK_OPEN} {ex['answer']} {THINK_CLOSE} {ANSWER_OPEN} {ex['answer']} {ANSWER_CLOSE}"
    return {**ex, "response": resp, "text": f"{ex['prompt']} {resp}"}


def examples(n: int, seed: int, check_prob: float = 0.3) -> list[dict[str, Any]]:
    """``n`` examples drawn from ``random.Random(seed)`` (same seed, same list)."""
    rng = random.Random(seed)
    return [example(rng, check_prob) for _ in range(n)]


_ANSWER_RE = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.S)


def extract_answer(response: str) -> str | None:
    """Stripped content of the last ``<answer> ... </answer>``, or None if there is none."""
    found = _ANSWER_RE.findall(response)
    return found[-1].strip() if found else None


def is_correct(response: str, answer: str | int) -> bool:
    """Exact match of the extracted answer with ``answer``."""
    got = extract_answer(response)
    return got is not None and got == str(answer).strip()
