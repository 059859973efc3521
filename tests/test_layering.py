"""Imports run one way (ARCHITECTURE.md §2): policies/ is pure and imports nothing of ours
outside itself (nor python-can, nor the clock's modules); drivers/ import only policies' small
types; daemon/ never imports sim/; sim/ never imports daemon/; only cli.py wires both."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cerebellumd"


def our_imports(path: Path) -> set[str]:
    """Top-level subpackages/modules of cerebellumd imported by a file, plus external roots."""
    found: set[str] = set()
    layer = path.relative_to(PACKAGE).parts
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                root = (node.module or "").split(".")[0]
                found.add(root if root != "cerebellumd" else (node.module or "").split(".")[1])
                continue
            base = list(layer[:-1])[: len(layer) - node.level] if node.level > 1 else list(layer[:-1])
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target:
                found.add(target[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found


def files(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).glob("*.py"))


@pytest.mark.parametrize("path", files("policies"), ids=lambda p: p.name)
def test_policies_are_pure(path: Path) -> None:
    forbidden = {"daemon", "drivers", "sim", "config", "cli", "profiles", "can", "cantools", "asyncio", "time",
                 "socket", "serial", "aiomqtt", "prometheus_client", "os", "subprocess"}
    assert not (our_imports(path) & forbidden), our_imports(path) & forbidden


@pytest.mark.parametrize("path", files("drivers"), ids=lambda p: p.name)
def test_drivers_do_not_decide(path: Path) -> None:
    assert not (our_imports(path) & {"daemon", "sim", "config", "cli"})


@pytest.mark.parametrize("path", files("daemon"), ids=lambda p: p.name)
def test_daemon_never_imports_sim(path: Path) -> None:
    assert not (our_imports(path) & {"sim", "cli"})


@pytest.mark.parametrize("path", files("sim"), ids=lambda p: p.name)
def test_sim_never_imports_daemon(path: Path) -> None:
    assert not (our_imports(path) & {"daemon", "cli"})


def test_the_checker_sees_relative_imports() -> None:
    """Guard the guard: the CLI does import both shells."""
    assert {"daemon", "sim"} <= our_imports(PACKAGE / "cli.py")
    assert "policies" in our_imports(PACKAGE / "sim" / "evaluate.py")
