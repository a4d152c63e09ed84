"""The calculator parses; it never evaluates code. Hostile input gets a clear error, fast."""

from __future__ import annotations

import math

import pytest

from parley.tools.calculator import MAX_EXPRESSION_CHARS, CalculatorError, evaluate


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 ** 10", 1024),
        ("2 ^ 10", 1024),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 % 3", 2),
        ("-(3 - 5)", 2),
        ("sqrt(16) + abs(-2)", 6.0),
        ("max(1, 5, 3) - min(4, 2)", 3),
        ("round(pi, 3)", 3.142),
        ("2 * e", 2 * math.e),
        ("10 ** 100", 10**100),
        ("1e3 + 0.5", 1000.5),
    ],
)
def test_evaluates_arithmetic(expression: str, expected: float) -> None:
    assert evaluate(expression) == expected


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("__import__('os').system('rm -rf /')", "only these functions"),
        ("open('/etc/passwd').read()", "only these functions"),
        ("().__class__.__bases__[0].__subclasses__()", "only these functions"),
        ("(1).__class__", "unsupported syntax"),
        ("x + 1", "unknown name 'x'"),
        ("pi.real", "unsupported syntax"),
        ("[1, 2, 3]", "unsupported syntax"),
        ("lambda: 1", "unsupported syntax"),
        ("'a' * 10", "unsupported constant"),
        ("True + 1", "unsupported constant"),
        ("1 if 1 else 2", "unsupported syntax"),
        ("sqrt(x=4)", "positional"),
        ("1 / 0", "division by zero"),
        ("10 % 0", "division by zero"),
        ("sqrt(-1)", "invalid operation"),
        ("", "empty expression"),
        ("1 +", "not an arithmetic expression"),
        ("import os", "not an arithmetic expression"),
    ],
)
def test_refuses_what_is_not_arithmetic(expression: str, reason: str) -> None:
    with pytest.raises(CalculatorError, match=reason):
        evaluate(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "9 ** 9 ** 9",
        "10 ** 100000",
        "2 ** 5000",
        "(10 ** 1000) ** 10",
        "10.0 ** 400",
        "exp(1000)",
        "(2 ** 4000) * (2 ** 4000)",
    ],
)
def test_huge_results_are_refused(expression: str) -> None:
    # Refused before computing: pytest-timeout fails the test if the bound check is missing.
    with pytest.raises(CalculatorError, match=r"too large|not a finite"):
        evaluate(expression)


def test_deep_nesting_is_refused() -> None:
    # Redundant parentheses do not nest the tree and are fine, up to the parser's own limit.
    assert evaluate("(" * 150 + "1" + ")" * 150) == 1
    with pytest.raises(CalculatorError, match="not an arithmetic expression"):
        evaluate("(" * 210 + "1" + ")" * 210)
    with pytest.raises(CalculatorError, match="nested too deeply"):
        evaluate("(1+" * 60 + "1" + ")" * 60)
    with pytest.raises(CalculatorError, match="nested too deeply"):
        evaluate("-" * 60 + "1")


def test_long_expressions_are_refused() -> None:
    with pytest.raises(CalculatorError, match="longer than"):
        evaluate("1+" * MAX_EXPRESSION_CHARS + "1")
