"""`check` against the DBCs: every `can = "Message.Signal"` must exist in its bus's DBC.

Given a validated `Config` and the DBC of each bus, `dbc_issues()` returns
- errors: an unknown message or signal (with a did-you-mean from the DBC's names, difflib), a DBC
  that does not load;
- warnings: a demand comparing a CAN signal with a number outside the signal's DBC range, or with a
  number that is none of the signal's DBC choices.

Each is a `config.ConfigIssue` with file and line (found with `config.locate`, as `check` reports
pydantic's errors). `check_text()` does the loading for the CLI's `check`, `run` and `replay`.
This module imports the config layer and cantools only (no daemon, no sim).
"""

from __future__ import annotations

import ast
import difflib
import itertools
from collections.abc import Mapping
from dataclasses import dataclass

from cantools.database.can import Database, Message

from ..drivers.dbc import load_dbc
from . import Config, ConfigIssue, _dotted, locate

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class DbcCheck:
    errors: list[ConfigIssue]
    warnings: list[ConfigIssue]

    @property
    def ok(self) -> bool:
        return not self.errors


def load_dbcs(config: Config) -> tuple[dict[str, Database], list[tuple[Loc, str]]]:
    """The DBC of each bus by bus name, and the problems of those that do not load."""
    dbcs: dict[str, Database] = {}
    problems: list[tuple[Loc, str]] = []
    for i, bus in enumerate(config.can):
        try:
            dbcs[bus.name] = load_dbc(bus.dbc, bus.dbc_strict)
        except OSError as exc:
            problems.append((("can", i, "dbc"), f"cannot read {bus.dbc}: {exc.strerror}"))
        except Exception as exc:  # cantools' parser and checks raise many types
            hint = ""
            if bus.dbc_strict:
                try:
                    load_dbc(bus.dbc, False)
                    hint = " (it loads with dbc_strict = false)"
                except Exception:  # noqa: S110 - only decides the hint
                    pass
            problems.append((("can", i, "dbc"), f"{bus.dbc} does not load: {exc}{hint}"))
    return dbcs, problems


def _suggest(word: str, names: list[str]) -> str:
    close = difflib.get_close_matches(word, names, n=3, cutoff=0.6)
    if not close:
        lowered = {n.lower(): n for n in names}
        close = [lowered[c] for c in difflib.get_close_matches(word.lower(), list(lowered), n=3, cutoff=0.6)]
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def resolve(config: Config, dbcs: Mapping[str, Database]) -> tuple[dict[str, Message], list[tuple[Loc, str]]]:
    """Each CAN signal's DBC message (by our signal name), and the references that do not resolve."""
    found: dict[str, Message] = {}
    problems: list[tuple[Loc, str]] = []
    first_bus = config.can[0].name if config.can else None
    for name, sig in config.signals.items():
        if not sig.can:
            continue
        bus = sig.bus or first_bus
        db = dbcs.get(bus) if bus is not None else None
        if db is None:
            continue  # no bus, or its DBC did not load: reported elsewhere
        message_name, signal_name = sig.can.split(".", 1)
        messages = {m.name: m for m in db.messages}
        message = messages.get(message_name)
        loc: Loc = ("signals", name, "can")
        if message is None:
            owners = sorted(m.name for m in db.messages if any(s.name == message_name for s in m.signals))
            extra = f"; {message_name!r} is a signal of {', '.join(owners[:3])}" if owners else ""
            problems.append((loc, f"no message {message_name!r} in the DBC of bus {bus!r}"
                                  f"{_suggest(message_name, list(messages))}{extra}"))
            continue
        signals = [s.name for s in message.signals]
        if signal_name not in signals:
            others = sorted(m.name for m in db.messages if signal_name in (s.name for s in m.signals))
            extra = f"; {signal_name!r} is in {', '.join(others[:3])}" if others else ""
            problems.append((loc, f"message {message_name!r} has no signal {signal_name!r}"
                                  f"{_suggest(signal_name, signals)}{extra}"))
            continue
        found[name] = message
    return found, problems


def _comparisons(expression: str) -> list[tuple[str, float]]:
    """(signal, number) pairs compared directly in an expression (either side)."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        return []
    out: list[tuple[str, float]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for a, b in itertools.pairwise(operands):
            for x, y in ((a, b), (b, a)):
                number = _number(y)
                if isinstance(x, ast.Name) and number is not None:
                    out.append((x.id, number))
    return out


def _number(node: ast.expr) -> float | None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _number(node.operand)
        return -inner if inner is not None else None
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return float(node.value)
    return None


def demand_warnings(config: Config, messages: Mapping[str, Message]) -> list[tuple[Loc, str]]:
    out: list[tuple[Loc, str]] = []
    for i, demand in enumerate(config.demands):
        for name, number in _comparisons(demand.when):
            message = messages.get(name)
            spec = config.signals.get(name)
            if message is None or spec is None or spec.can is None:
                continue
            sig = message.get_signal_by_name(spec.can.split(".", 1)[1])
            loc: Loc = ("demands", i, "when")
            choices = {int(k): str(v) for k, v in (sig.choices or {}).items()}
            if choices and (not float(number).is_integer() or int(number) not in choices):
                listed = ", ".join(f"{k} = {v!r}" for k, v in sorted(choices.items()))
                out.append((loc, f"{name} is compared with {number:g}, none of {spec.can}'s DBC choices ({listed})"))
                continue
            lo, hi = sig.minimum, sig.maximum
            if lo is not None and hi is not None and not (lo == 0 and hi == 0) and not lo <= number <= hi:
                out.append((loc, f"{name} is compared with {number:g}, outside {spec.can}'s DBC range "
                                 f"[{lo:g}, {hi:g}] {sig.unit or ''}".rstrip()))
    return out


def dbc_issues(config: Config, dbcs: Mapping[str, Database], text: str, file: str,
               load_problems: list[tuple[Loc, str]] | None = None) -> DbcCheck:
    messages, unresolved = resolve(config, dbcs)

    def issues(items: list[tuple[Loc, str]]) -> list[ConfigIssue]:
        return [ConfigIssue(file, locate(text, loc), _dotted(loc), msg) for loc, msg in items]

    return DbcCheck(errors=issues([*(load_problems or []), *unresolved]),
                    warnings=issues(demand_warnings(config, messages)))


def check_text(config: Config, text: str, file: str) -> DbcCheck:
    """Load the config's DBCs and check every CAN signal against them."""
    dbcs, problems = load_dbcs(config)
    return dbc_issues(config, dbcs, text, file, problems)


