"""``calculator(EXPR)``: integer and decimal arithmetic by a whitelist walk of the syntax tree (never eval).

Accepted: numeric literals, ``+ - * / // % **``, unary ``+ -`` and parentheses. Bounds, each checked
*before* the work it would cause: expression length (the tool's ``max_argument_chars``), nesting depth
(``max_depth``), exponent (|e| <= MAX_EXPONENT, integer), and magnitude (every intermediate value within
MAX_MAGNITUDE, a power is refused when log10 |base| * e would exceed it), so no input can make it run long.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable

from forge_models.tools.registry import Tool, ToolError, ToolLimits

MAX_EXPONENT = 64
MAX_MAGNITUDE_DIGITS = 30
MAX_MAGNITUDE = 10**MAX_MAGNITUDE_DIGITS

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def parse_expression(text: str, limits: ToolLimits) -> ast.expr:
    """The checked syntax tree of ``text``; ToolError if it is not bounded plain arithmetic."""
    if not text.strip():
        raise ToolError("empty expression")
    if len(text) > limits.max_argument_chars:
        raise ToolError(f"expression too long ({len(text)} > {limits.max_argument_chars} chars)")
    # The parser recurses per parenthesis; counting first refuses deep nesting before it is parsed.
    depth = 0
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if depth > limits.max_depth:
            raise ToolError(f"expression nested deeper than {limits.max_depth}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolError(f"not an arithmetic expression: {text[:60]!r}") from None
    _check(tree.body, 1, limits.max_depth)
    return tree.body


def _check(node: ast.AST, depth: int, max_depth: int) -> None:
    if depth > max_depth:
        raise ToolError(f"expression nested deeper than {max_depth}")
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):  # bool is an int subclass; type() excludes it
            raise ToolError(f"only numbers are allowed, not {node.value!r}"[:80])
        return
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check(node.left, depth + 1, max_depth)
        _check(node.right, depth + 1, max_depth)
        return
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check(node.operand, depth + 1, max_depth)
        return
    raise ToolError(f"unsupported syntax {type(node).__name__}; use numbers, + - * / // % ** and parentheses")


def evaluate(node: ast.expr) -> int | float:
    """Value of a tree accepted by :func:`parse_expression`; ToolError on a bound or an undefined value."""
    if isinstance(node, ast.Constant):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp):
        return _bounded(_UNARY[type(node.op)](evaluate(node.operand)))
    assert isinstance(node, ast.BinOp)  # _check admitted nothing else
    left, right = evaluate(node.left), evaluate(node.right)
    if isinstance(node.op, ast.Pow):
        _check_power(left, right)
    try:
        value = _BINARY[type(node.op)](left, right)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("result out of range") from None
    return _bounded(value)


def _check_power(base: int | float, exponent: int | float) -> None:
    if isinstance(exponent, float) and not exponent.is_integer():
        raise ToolError("only integer exponents are allowed")
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"exponent {exponent:g} exceeds {MAX_EXPONENT}")
    if base == 0 and exponent < 0:
        raise ToolError("division by zero")
    if abs(base) > 1 and abs(exponent) * math.log10(abs(base)) > MAX_MAGNITUDE_DIGITS:
        raise ToolError(f"result would exceed 1e{MAX_MAGNITUDE_DIGITS}")


def _bounded(value: Any) -> int | float:
    if isinstance(value, complex):  # e.g. a negative base to a fractional power; excluded above, kept safe
        raise ToolError("result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("result is not finite")
    if abs(value) > MAX_MAGNITUDE:
        raise ToolError(f"result exceeds 1e{MAX_MAGNITUDE_DIGITS}")
    return value


def format_number(value: int | float) -> str:
    """Integers as integers; a float that is a whole number too ("6 / 3" -> "2"); others to 10 significant digits."""
    if isinstance(value, int):
        return str(value)
    if value.is_integer():
        return str(int(value))
    return format(value, ".10g")


def _execute(node: ast.expr, _limits: ToolLimits) -> str:
    return format_number(evaluate(node))


def calculator_tool(limits: ToolLimits | None = None) -> Tool:
    """The calculator as a registry entry."""
    return Tool(
        name="calculator",
        description="evaluates arithmetic with + - * / // % ** and parentheses.",
        usage="<tool>calculator(12 * (3 + 4))</tool>",
        parse=parse_expression,
        execute=_execute,
        limits=limits or ToolLimits(),
    )
