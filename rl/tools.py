"""A calculator tool for rollouts: a safe arithmetic evaluator and the call syntax around it.

The model may write a call ``<calc> EXPR </calc>``; the rollout (``saetune.rl.rollout``) stops
there, evaluates ``EXPR`` with :func:`safe_eval` and appends `` = RESULT`` (or `` = error``)
before generation continues. Those inserted tokens are the tool's, not the policy's: they carry
no gradient and no log-prob.

:func:`safe_eval` never calls ``eval``: it parses with :mod:`ast` and walks only numeric
literals, ``+ - * / // % **`` and unary ``+ -``. Everything else (names, calls, attributes,
strings, comprehensions, lambdas, …) is rejected. Bounds keep a hostile or runaway expression
from costing more than a few microseconds of work:

- the source is at most ``max_chars`` characters (checked before parsing);
- the tree has at most ``max_nodes`` nodes and depth ``max_depth``;
- ``**`` needs a small exponent (|e| ≤ ``max_exponent``) and an estimated result size within
  ``max_digits`` decimal digits *before* it is computed (``9 ** 9 ** 9`` is refused, not run);
- every intermediate integer stays within ``max_digits`` digits, floats must be finite.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass

from saetune.errors import SaetuneError

__all__ = ["CALL_OPEN", "CALL_CLOSE", "Calculator", "CalculatorError", "safe_eval"]

CALL_OPEN = "<calc>"
CALL_CLOSE = "</calc>"


class CalculatorError(SaetuneError):
    """An expression the calculator refuses: not arithmetic, or over one of its bounds."""


_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _digits(x: int | float) -> float:
    """Decimal digits of |x| (an estimate for floats; 1 for 0)."""
    ax = abs(x)
    return 1.0 if ax < 10 else math.log10(ax) + 1


def safe_eval(expr: str, *, max_chars: int = 200, max_nodes: int = 64, max_depth: int = 16,
              max_exponent: int = 64, max_digits: int = 60) -> int | float:
    """Evaluate an arithmetic expression safely (no ``eval``), within the bounds in the module doc.

    Accepts int and float literals, parentheses, ``+ - * / // % **`` and unary ``+ -``.
    Raises :class:`CalculatorError` naming what was refused.
    """
    if not isinstance(expr, str):
        raise CalculatorError(f"the calculator takes a string expression, got {type(expr).__name__}")
    if len(expr) > max_chars:
        raise CalculatorError(f"expression of {len(expr)} characters is longer than the limit of {max_chars}")
    text = expr.strip()
    if not text:
        raise CalculatorError("empty expression")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError) as e:
        raise CalculatorError(f"not an arithmetic expression: {text[:40]!r} ({e.__class__.__name__})") from None
    n_nodes = sum(1 for _ in ast.walk(tree))
    if n_nodes > max_nodes:
        raise CalculatorError(f"expression has {n_nodes} syntax nodes, more than the limit of {max_nodes}")

    def ev(node: ast.AST, depth: int) -> int | float:
        if depth > max_depth:
            raise CalculatorError(f"expression nests deeper than {max_depth} levels")
        if isinstance(node, ast.Expression):
            return ev(node.body, depth + 1)
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise CalculatorError(f"only numbers are allowed, got the literal {v!r:.40}")
            return check(v)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return check(_UNARY[type(node.op)](ev(node.operand, depth + 1)))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = ev(node.left, depth + 1), ev(node.right, depth + 1)
            if isinstance(node.op, ast.Pow):
                if abs(b) > max_exponent:
                    raise CalculatorError(f"exponent {b!r} is larger than the limit of {max_exponent}")
                if abs(a) > 1 and b > 0 and _digits(a) * b > max_digits + 1:
                    raise CalculatorError(f"{a!r} ** {b!r} would have more than {max_digits} digits")
                if a == 0 and b < 0:
                    raise CalculatorError("zero to a negative power")
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
                raise CalculatorError("division by zero")
            try:
                return check(_BINOPS[type(node.op)](a, b))
            except (OverflowError, ValueError, ZeroDivisionError) as e:
                raise CalculatorError(f"arithmetic error: {e}") from None
        what = type(node.op).__name__ if isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node).__name__
        raise CalculatorError(f"{what} is not arithmetic; allowed: numbers, parentheses, + - * / // % **")

    def check(v):
        if isinstance(v, complex):
            raise CalculatorError("complex results are not supported")
        if isinstance(v, float) and not math.isfinite(v):
            raise CalculatorError(f"result {v} is not finite")
        if _digits(v) > max_digits:
            raise CalculatorError(f"a value has more than {max_digits} digits")
        return v

    return ev(tree, 0)


def _format(v: int | float) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        v = int(v)
    return str(v) if isinstance(v, int) else f"{v:.10g}"


@dataclass
class Calculator:
    """The rollout's tool hook: finds a call at the end of a response and answers it.

    ``open``/``close`` delimit a call; the text between them is the expression. With the toy's
    word-level tokenizer, the call tags must be tokens of the vocabulary for the model to emit
    them; any tokenizer can encode the inserted answer text.
    """

    open: str = CALL_OPEN
    close: str = CALL_CLOSE
    max_chars: int = 200

    def stop_string(self) -> str:
        return self.close

    def pending_call(self, text: str) -> str | None:
        """The expression of a call that ``text`` ends with (after stripping), else None."""
        t = text.rstrip()
        if not t.endswith(self.close):
            return None
        start = t.rfind(self.open, 0, len(t) - len(self.close))
        if start < 0:
            return None
        return t[start + len(self.open):len(t) - len(self.close)]

    def answer(self, expr: str) -> str:
        """The text appended after a call: `` = RESULT``, or `` = error`` for a refused expression."""
        try:
            return f" = {_format(safe_eval(expr, max_chars=self.max_chars))}"
        except CalculatorError:
            return " = error"
