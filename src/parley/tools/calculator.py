"""Safe arithmetic: the expression is parsed by Python's own parser (`ast.parse`) and the tree
is walked over a short whitelist of node kinds. Nothing is ever evaluated by `eval`; names,
attributes, subscripts, comprehensions and the like are refused, and every intermediate
result is bounded so hostile input (huge powers, factorial-like chains) cannot eat the CPU.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

MAX_EXPRESSION_CHARS = 500
MAX_INT_BITS = 4096
MAX_DEPTH = 50

Number = int | float


class CalculatorError(ValueError):
    pass


_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_FUNCTIONS: dict[str, Callable[..., Number]] = {
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "sqrt": math.sqrt,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "floor": math.floor,
    "ceil": math.ceil,
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression, or `CalculatorError` saying why not."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    expression = expression.replace("^", "**").strip()
    if not expression:
        raise CalculatorError("empty expression")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise CalculatorError(f"not an arithmetic expression: {exc.__class__.__name__}") from None
    try:
        return _eval(tree.body, 0)
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result too large") from None
    except (TypeError, ValueError) as exc:
        raise CalculatorError(f"invalid operation: {exc}") from None


def _eval(node: ast.expr, depth: int) -> Number:
    if depth > MAX_DEPTH:
        raise CalculatorError("expression nested too deeply")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalculatorError(f"unsupported constant {node.value!r}")
        return _bounded(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left = _eval(node.left, depth + 1)
        right = _eval(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand, depth + 1))
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise CalculatorError(f"unknown name {node.id!r}")
    if isinstance(node, ast.Call):
        return _call(node, depth)
    raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


def _call(node: ast.Call, depth: int) -> Number:
    if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
        raise CalculatorError("only these functions are allowed: " + ", ".join(sorted(_FUNCTIONS)))
    if node.keywords or not node.args or len(node.args) > 8:
        raise CalculatorError(f"{node.func.id}() takes 1 to 8 positional arguments")
    args = [_eval(arg, depth + 1) for arg in node.args]
    return _bounded(_FUNCTIONS[node.func.id](*args))


def _check_power(base: Number, exponent: Number) -> None:
    if abs(exponent) > 100_000:
        raise CalculatorError("exponent too large")
    exact = isinstance(base, int) and isinstance(exponent, int)
    if exact and exponent > 0 and abs(base) > 1 and exponent * math.log2(abs(base)) > MAX_INT_BITS:
        raise CalculatorError("result too large")


def _bounded(value: Number) -> Number:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError("result too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number")
    return value
