"""Safe demand expressions: a whitelisted subset of Python expression syntax, compiled to
closures (never `eval`).

Grammar: numbers, `true`/`false` (or `True`/`False`), signal names, `and`/`or`/`not`,
comparisons (`< <= > >= == !=`, chained), `+ - * / %`, unary `-`, and the functions
`abs`, `min`, `max`. Values are numbers or bools; a stale or missing signal is *unknown*
(`None`) and unknown propagates with Kleene three-valued logic: `unknown and false` is false,
`unknown or true` is true, anything else touching unknown is unknown.
"""

from __future__ import annotations

import ast
import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Value = float | bool | None
Env = Mapping[str, Value]
Evaluator = Callable[[Env], Value]

_COMPARE: dict[type[ast.cmpop], Callable[[float, float], bool]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}
_ARITH: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
}
_FUNCTIONS: dict[str, Callable[..., float]] = {"abs": abs, "min": min, "max": max}
_CONSTANTS: dict[str, bool] = {"true": True, "false": False}
MAX_EXPRESSION_LENGTH = 2000
MAX_NODES = 200


class ExpressionError(ValueError):
    """An expression that does not parse, uses a forbidden construct or names an unknown
    signal. `column` is 1-based within the expression text when known."""

    def __init__(self, message: str, column: int | None = None) -> None:
        super().__init__(message)
        self.column = column


@dataclass(frozen=True, slots=True)
class Expression:
    source: str
    names: frozenset[str]
    evaluate: Evaluator

    def __call__(self, env: Env) -> Value:
        return self.evaluate(env)


def compile_expression(source: str, known_names: frozenset[str] | None = None) -> Expression:
    """Parse and compile `source`. With `known_names`, every name must be one of them."""
    if len(source) > MAX_EXPRESSION_LENGTH:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_LENGTH} characters")
    try:
        with warnings.catch_warnings():
            # What Python only warns about (`1and x`: "invalid decimal literal"; an invalid
            # escape such as "\>", a DeprecationWarning before 3.12) is an error in a demand:
            # ambiguous text must not reach a car's wake logic.
            warnings.simplefilter("error", SyntaxWarning)
            warnings.simplefilter("error", DeprecationWarning)
            tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxWarning, DeprecationWarning) as exc:
        raise ExpressionError(f"does not parse: {exc}") from None
    except SyntaxError as exc:
        raise ExpressionError(f"does not parse: {exc.msg}", exc.offset) from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ExpressionError(f"expression has more than {MAX_NODES} syntax nodes")
    names: set[str] = set()
    evaluate = _compile(tree.body, names)
    if known_names is not None:
        unknown = sorted(names - known_names)
        if unknown:
            raise ExpressionError(f"unknown signal(s): {', '.join(unknown)}")
    return Expression(source=source, names=frozenset(names), evaluate=evaluate)


def _fail(node: ast.AST, what: str) -> ExpressionError:
    col = getattr(node, "col_offset", None)
    return ExpressionError(what, None if col is None else col + 1)


def _compile(node: ast.expr, names: set[str]) -> Evaluator:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or (isinstance(value, int | float) and not isinstance(value, complex)):
            const = float(value) if not isinstance(value, bool) else value
            return lambda env: const
        raise _fail(node, f"constant {value!r} is not a number or bool")
    if isinstance(node, ast.Name):
        ident = node.id
        if ident in _CONSTANTS:
            const_b = _CONSTANTS[ident]
            return lambda env: const_b
        if ident in _FUNCTIONS:
            raise _fail(node, f"{ident} is a function; call it")
        names.add(ident)
        return lambda env: env.get(ident)
    if isinstance(node, ast.BoolOp):
        parts = [_compile(v, names) for v in node.values]
        return _and(parts) if isinstance(node.op, ast.And) else _or(parts)
    if isinstance(node, ast.UnaryOp):
        inner = _compile(node.operand, names)
        if isinstance(node.op, ast.Not):
            return lambda env: _not(inner(env))
        if isinstance(node.op, ast.USub):
            return lambda env: _neg(inner(env))
        if isinstance(node.op, ast.UAdd):
            return inner
        raise _fail(node, "only 'not', '-' and '+' are allowed as unary operators")
    if isinstance(node, ast.BinOp):
        op = _ARITH.get(type(node.op))
        if op is None:
            raise _fail(node, f"operator {type(node.op).__name__} is not allowed")
        left, right = _compile(node.left, names), _compile(node.right, names)
        return lambda env: _arith(op, left(env), right(env))
    if isinstance(node, ast.Compare):
        ops = []
        for cmp in node.ops:
            fn = _COMPARE.get(type(cmp))
            if fn is None:
                raise _fail(node, f"comparison {type(cmp).__name__} is not allowed")
            ops.append(fn)
        operands = [_compile(node.left, names), *(_compile(c, names) for c in node.comparators)]
        return lambda env: _compare(ops, [o(env) for o in operands])
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            raise _fail(node, f"only the functions {', '.join(_FUNCTIONS)} may be called")
        if node.keywords or not node.args:
            raise _fail(node, f"{node.func.id}() takes positional arguments only")
        name = node.func.id
        function = _FUNCTIONS[name]
        if name == "abs" and len(node.args) != 1:
            raise _fail(node, "abs() takes one argument")
        if name != "abs" and len(node.args) < 2:
            raise _fail(node, f"{name}() takes at least two arguments")
        args = [_compile(a, names) for a in node.args]
        return lambda env: _call(function, [a(env) for a in args])
    raise _fail(node, f"{type(node).__name__} is not allowed in a demand expression")


def _truth(value: Value) -> bool | None:
    return None if value is None else bool(value)


def _and(parts: list[Evaluator]) -> Evaluator:
    def evaluate(env: Env) -> Value:
        unknown = False
        for part in parts:
            truth = _truth(part(env))
            if truth is False:
                return False
            if truth is None:
                unknown = True
        return None if unknown else True

    return evaluate


def _or(parts: list[Evaluator]) -> Evaluator:
    def evaluate(env: Env) -> Value:
        unknown = False
        for part in parts:
            truth = _truth(part(env))
            if truth is True:
                return True
            if truth is None:
                unknown = True
        return None if unknown else False

    return evaluate


def _not(value: Value) -> Value:
    return None if value is None else not value


def _neg(value: Value) -> Value:
    return None if value is None else -float(value)


def _arith(op: Callable[[float, float], float], a: Value, b: Value) -> Value:
    if a is None or b is None:
        return None
    try:
        return op(float(a), float(b))
    except ZeroDivisionError:
        return None


def _compare(ops: list[Callable[[float, float], bool]], values: list[Value]) -> Value:
    if any(v is None for v in values):
        return None
    floats = [float(v) for v in values if v is not None]
    return all(op(floats[i], floats[i + 1]) for i, op in enumerate(ops))


def _call(fn: Callable[..., float], args: list[Value]) -> Value:
    if any(a is None for a in args):
        return None
    return fn(*(float(a) for a in args if a is not None))
