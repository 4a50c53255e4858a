"""Calculator tool: exact arithmetic, the two string helpers, and refusal of everything else (fast, bounded)."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.calculator import MAX_EXPR_CHARS, CalculatorError, evaluate, format_number


@pytest.mark.parametrize("expression, expected", [
    ("1 + 2", "3"),
    ("48/2", "24"),  # GSM8K writes 48/2=24: integer-valued floats print as integers
    ("7/2", "3.5"),
    ("10/3", "3.333333"),
    ("-3 + 4 * 2", "5"),
    ("(1 + 2) * 3", "9"),
    ("2 ** 10", "1024"),
    ("2 ** -1", "0.5"),
    ("17 // 5", "3"),
    ("17 % 5", "2"),
    ("+5", "5"),
    ("1,200 * 3", "3600"),  # thousands separators as GSM8K writes them
    ("0.1 + 0.2", "0.3"),
    ("3.5 * 2", "7"),
    ('"strawberry".count("r")', "3"),
    ("'banana'.count('an')", "2"),
    ('len("hello")', "5"),
    ('len("abc") * 2', "6"),
])
def test_correct_results(expression, expected):
    assert evaluate(expression) == expected


@pytest.mark.parametrize("expression", [
    "__import__('os').system('echo hi')",
    "().__class__.__bases__[0].__subclasses__()",
    "'a'.__class__",
    "'abc'.upper()",  # only .count is whitelisted
    "open('/etc/passwd')",
    "eval('1+1')",
    "print(1)",
    "len([1, 2])",  # len only of string literals
    "x + 1",
    "[1, 2, 3]",
    "{1: 2}",
    "lambda: 1",
    "1 if True else 2",
    "True + 1",
    "'a' * 3",
    "'a' + 'b'",
    "1 < 2",
    "1 & 3",
    "1 << 3",
    "(1).real",
    "'abc'[0]",
    "len(s='a')",
    "",
    "1 +",
    "1/0",
    "5 % 0",
    "0 ** -1",
    "(-8) ** 0.5",
])
def test_rejected(expression):
    with pytest.raises(CalculatorError):
        evaluate(expression)


@pytest.mark.parametrize("expression", ["9 ** 9 ** 9", "2 ** 100000", "10 ** 1000", "10.0 ** 400",
                                        "99999999999 ** 99", "(2 ** 200) * (2 ** 200)", "1e308 * 10"])
def test_huge_results_rejected_quickly(expression):
    t0 = time.perf_counter()
    with pytest.raises(CalculatorError):
        evaluate(expression)
    assert time.perf_counter() - t0 < 0.1  # refused before Python builds a giant number


def test_size_limits():
    with pytest.raises(CalculatorError, match="longer"):
        evaluate("1+" * MAX_EXPR_CHARS + "1")
    with pytest.raises(CalculatorError, match="nodes"):
        evaluate("+".join(["1"] * 60))
    with pytest.raises(CalculatorError):
        evaluate(123)  # not a string


def test_calculator_error_is_value_error():
    assert issubclass(CalculatorError, ValueError)


def test_format_number():
    assert format_number(5) == "5"
    assert format_number(2.0) == "2"
    assert format_number(-0.125) == "-0.125"
    assert format_number(1 / 3) == "0.333333"


@settings(max_examples=200, deadline=None)
@given(st.integers(-10**6, 10**6), st.integers(-10**6, 10**6), st.sampled_from(["+", "-", "*", "//", "%"]))
def test_matches_python_on_integers(a, b, op):
    expression = f"{a} {op} ({b})"
    if op in ("//", "%") and b == 0:
        with pytest.raises(CalculatorError):
            evaluate(expression)
        return
    assert evaluate(expression) == str(eval(expression))  # the reference is Python itself, on trusted input
