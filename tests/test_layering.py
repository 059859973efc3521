"""Imports run one way (docs/ARCHITECTURE.md §2). Every module of `src/cerebellumd` is walked
(AST: top-level, function-level and `TYPE_CHECKING` imports alike) and each import of ours is
checked against an allowlist per layer; a new module that breaks the rule fails here. The whole
module graph must also be free of cycles.

Layers, bottom up:
- `accel` (the accelerator-state vocabulary and power model) and `policies/` (the pure core)
  import only the standard library; `policies/` may use `accel`, the shared vocabulary;
- `extras` (which optional extra a command needs) imports nothing of ours;
- `drivers/` move bytes: the vocabulary and third-party transports, nothing that decides;
- `profiles` and `config/` build the core's parameters from files;
- `daemon/` and `sim/` are the two shells and never import each other; `discover` (a recording's
  statistics and role candidates) is a tool beside `sim/`;
- `cli` wires everything.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cerebellumd"
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}

#: layer -> the layers of ours it may import (besides itself).
ALLOWED: dict[str, frozenset[str]] = {
    "accel": frozenset(),
    "extras": frozenset(),
    "policies": frozenset({"accel"}),
    "drivers": frozenset({"accel"}),
    "profiles": frozenset({"accel"}),
    "config": frozenset({"accel", "policies", "drivers", "profiles"}),
    "daemon": frozenset({"accel", "policies", "drivers", "profiles", "config", "extras"}),
    "sim": frozenset({"accel", "policies", "drivers", "profiles", "config", "extras"}),
    "discover": frozenset({"accel", "policies", "drivers", "profiles", "config", "extras"}),
    "cli": frozenset({"accel", "policies", "drivers", "profiles", "config", "daemon", "sim", "discover", "extras",
                     "__init__"}),
    "__main__": frozenset({"cli"}),
    "__init__": frozenset(),
}
#: Layers whose third-party imports are also restricted: the pure ones, none at all.
PURE = frozenset({"accel", "policies"})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    return module.split(".")[0]


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, text: str | None = None) -> Iterator[tuple[str, int]]:
    """(absolute module name, line) of every import in the file (or in `text` read as that file);
    ours as `cerebellumd.x.y`."""
    own = module_name(path)
    package = own.split(".") if path.name == "__init__.py" else own.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text("utf-8") if text is None else text)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                anchor = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                base = ".".join(["cerebellumd", *anchor, *([node.module] if node.module else [])])
            yield base, node.lineno
            for alias in node.names:  # `from . import x` or `from .pkg import module`
                candidate = f"{base}.{alias.name}"
                if candidate.startswith("cerebellumd.") and candidate.removeprefix("cerebellumd.") in MODULES:
                    yield candidate, node.lineno


MODULES = modules()


def ours(name: str) -> str | None:
    """Our module `name` refers to (a package's module, or the package itself), or None."""
    if name == "cerebellumd":
        return "__init__"
    if not name.startswith("cerebellumd."):
        return None
    dotted = name.removeprefix("cerebellumd.")
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


@pytest.mark.parametrize("module", sorted(MODULES), ids=str)
def test_imports_follow_the_layers(module: str) -> None:
    layer = layer_of(module)
    assert layer in ALLOWED, f"{module}: new top-level module, give its layer an allowlist in this test"
    bad = []
    for name, line in imports(MODULES[module]):
        target = ours(name)
        if target is not None:
            other = layer_of(target)
            if other != layer and other not in ALLOWED[layer]:
                bad.append(f"line {line}: {name} ({layer} may not import {other})")
        elif layer in PURE and name.split(".")[0] not in STDLIB:
            bad.append(f"line {line}: {name} (the pure core imports only the standard library)")
    assert not bad, f"{module}:\n" + "\n".join(bad)


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name, _line in imports(path):
            target = ours(name)
            # A package's __init__ re-exporting its modules is not a dependency of theirs on it.
            if target is not None and target != module and not module.startswith(f"{target}."):
                graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_no_import_cycles_type_only_imports_included() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_checker_sees_what_it_must() -> None:
    """Guard the guard: relative, function-level and TYPE_CHECKING imports are all seen, and a
    planted cycle is found."""
    cli = {ours(n) for n, _ in imports(MODULES["cli"])}
    assert any(m and m.startswith("daemon") for m in cli) and any(m and m.startswith("sim") for m in cli)
    assert "accel" in {ours(n) for n, _ in imports(MODULES["policies.cerebellum"])}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_type_checking_import_counts() -> None:
    probe = PACKAGE / "drivers" / "base.py"
    text = probe.read_text("utf-8") + (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..daemon.runtime import Daemon\n")
    assert "daemon.runtime" in {ours(n) for n, _ in imports(probe, text)}
