"""The contracts as docs/contracts.md states them, parsed from its tables: the tests check the
code against this file, the repository's own copy of the contracts."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "contracts.md"


def section(title: str) -> str:
    text = DOC.read_text("utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    if match is None:
        raise AssertionError(f"docs/contracts.md has no section {title!r}")
    return match.group(1)


def tables(title: str) -> list[list[list[str]]]:
    """Every table of a section: rows of cells (header and rule lines dropped)."""
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*section(title).splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            current.append(cells)
        elif current:
            found.append(current[2:])  # header, rule
            current = []
    return found


def names(cell: str) -> list[str]:
    """The `code` spans of a cell, in order."""
    return re.findall(r"`([^`]+)`", cell)


def metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """metric family -> (type, label names)."""
    rows = tables("Metrics")[0]
    return {names(r[0])[0]: (r[1], frozenset(names(r[2]))) for r in rows}


def label_values() -> dict[str, tuple[str, ...]]:
    rows = tables("Metrics")[1]
    return {r[0]: tuple(names(r[1])) for r in rows}


def mqtt_topics() -> tuple[str, ...]:
    return tuple(names(r[0])[0] for r in tables("MQTT")[0])


def mqtt_state_keys() -> tuple[str, ...]:
    return tuple(names(r[0])[0] for r in tables("MQTT")[1])


def mqtt_command_keys() -> tuple[str, ...]:
    return tuple(names(r[0])[0] for r in tables("MQTT")[2])


def cli_commands() -> tuple[str, ...]:
    return tuple(names(r[0])[0] for r in tables("CLI")[0])


def evaluation_keys() -> tuple[str, ...]:
    return tuple(names(r[0])[0] for r in tables("Evaluation JSON")[0])


def evaluation_row_keys() -> tuple[str, ...]:
    return tuple(names(r[0])[0] for r in tables("Evaluation JSON")[1])


def evaluation_policies() -> tuple[str, ...]:
    row = next(r for r in tables("Evaluation JSON")[1] if names(r[0]) == ["policy"])
    return tuple(names(row[1]))
