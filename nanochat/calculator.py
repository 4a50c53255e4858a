"""The calculator tool: evaluates what the model writes between <|python_start|> and <|python_end|>.

The model's text is untrusted, so nothing here calls `eval`. The expression is parsed with `ast` and walked by a
tiny interpreter that knows only:

- int / float literals, parentheses, unary + and -;
- binary + - * / // % and ** (exponents bounded so a result stays small);
- two string helpers for the spelling tasks: `len("word")` and `"word".count("r")` on string literals.

Everything else (names, attribute access other than `.count`, calls, subscripts, comprehensions, lambdas, ...) is
rejected with `CalculatorError`. Time and memory are bounded by construction rather than by a timer (signals do not
work off the main thread, e.g. in the web server): the input length and node count are capped and every integer
stays under MAX_INT_BITS bits, so no single operation can be expensive.
"""

import ast
import math
import re

MAX_EXPR_CHARS = 256
MAX_NODES = 64
MAX_INT_BITS = 256  # about 77 decimal digits: plenty for arithmetic, cheap to multiply
MAX_FLOAT_ABS = 1e300
MAX_STRING_CHARS = 256
FLOAT_DIGITS = 6  # decimals kept when printing a non-integer result
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class CalculatorError(ValueError):
    """The expression is not allowed, malformed, or its result would be too large or undefined."""


def _check_number(x):
    if isinstance(x, bool):
        raise CalculatorError("booleans are not numbers here")
    if isinstance(x, int):
        if x.bit_length() > MAX_INT_BITS:
            raise CalculatorError(f"integer result exceeds {MAX_INT_BITS} bits")
        return x
    if isinstance(x, float):
        if not math.isfinite(x) or abs(x) > MAX_FLOAT_ABS:
            raise CalculatorError("float result is not finite or too large")
        return x
    raise CalculatorError(f"expected a number, got {type(x).__name__}")


def _power(base, exponent):
    """`base ** exponent` with the result size bounded *before* computing it."""
    if isinstance(exponent, int):
        if abs(exponent) > 4 * MAX_INT_BITS:
            raise CalculatorError("exponent too large")
        if isinstance(base, int) and exponent > 0 and abs(base) > 1:
            # |base|**e has about e * bit_length(base) bits; refuse before Python builds a huge integer.
            if exponent * (abs(base).bit_length() - 1) > MAX_INT_BITS:
                raise CalculatorError(f"integer result exceeds {MAX_INT_BITS} bits")
        if base == 0 and exponent < 0:
            raise CalculatorError("zero cannot be raised to a negative power")
    elif abs(exponent) > 1e4:
        raise CalculatorError("exponent too large")
    try:
        result = base**exponent
    except OverflowError as e:
        raise CalculatorError("result too large") from e
    if isinstance(result, complex):
        raise CalculatorError("result is not a real number")
    return result


def _divide(op, a, b):
    if b == 0:
        raise CalculatorError("division by zero")
    if isinstance(op, ast.Div):
        return a / b
    if isinstance(op, ast.FloorDiv):
        return a // b
    return a % b


_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
}


def _string_literal(node) -> str:
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        raise CalculatorError("string helpers only work on string literals")
    if len(node.value) > MAX_STRING_CHARS:
        raise CalculatorError("string too long")
    return node.value


def _call(node: ast.Call):
    """The two whitelisted calls: len("...") and "...".count("...")."""
    if node.keywords:
        raise CalculatorError("keyword arguments are not allowed")
    func = node.func
    if isinstance(func, ast.Name) and func.id == "len" and len(node.args) == 1:
        return len(_string_literal(node.args[0]))
    if isinstance(func, ast.Attribute) and func.attr == "count" and len(node.args) == 1:
        return _string_literal(func.value).count(_string_literal(node.args[0]))
    raise CalculatorError("only len(\"...\") and \"...\".count(\"...\") calls are allowed")


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str):
            raise CalculatorError("a bare string is not a number")
        return _check_number(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand)
        return _check_number(-value if isinstance(node.op, ast.USub) else +value)
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left), _eval(node.right)
        if type(node.op) in _BINARY:
            return _check_number(_BINARY[type(node.op)](a, b))
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
            return _check_number(_divide(node.op, a, b))
        if isinstance(node.op, ast.Pow):
            return _check_number(_power(a, b))
        raise CalculatorError(f"operator {type(node.op).__name__} is not allowed")
    if isinstance(node, ast.Call):
        return _call(node)
    raise CalculatorError(f"{type(node).__name__} is not allowed in a calculator expression")


def format_number(x) -> str:
    """Integers as is; floats rounded to FLOAT_DIGITS decimals without trailing zeros (48/2 -> '24')."""
    if isinstance(x, int):
        return str(x)
    rounded = round(x, FLOAT_DIGITS)
    if rounded == int(rounded) and abs(rounded) < 2**53:
        return str(int(rounded))
    return f"{rounded:.{FLOAT_DIGITS}f}".rstrip("0").rstrip(".")


def evaluate(expression: str) -> str:
    """Evaluate an arithmetic expression and return its result as text. Raises CalculatorError."""
    if not isinstance(expression, str):
        raise CalculatorError(f"expression must be a str, got {type(expression).__name__}")
    # "1,200 * 3": drop thousands separators as people (and GSM8K) write them; commas elsewhere stay (and fail).
    text = _THOUSANDS.sub("", expression.strip())
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_EXPR_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"not a valid expression: {e.msg}") from e
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"expression has more than {MAX_NODES} syntax nodes")
    return format_number(_eval(tree))
