"""The evaluation plot is a real PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from cerebellumd.config import builtin_example, parse_config
from cerebellumd.sim import commands
from cerebellumd.sim.cycles import load_cycle
from cerebellumd.sim.evaluate import run_evaluation
from cerebellumd.sim.events import build_scenario
from cerebellumd.sim.plot import plot


def test_plot_writes_a_png(tmp_path: Path) -> None:
    scenario = build_scenario(load_cycle("us06"), 1)
    evaluation = run_evaluation(parse_config(builtin_example()), scenario)
    out = plot(evaluation.runs, scenario, tmp_path / "e.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000


def test_cli_evaluate_json_and_plot(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    png = tmp_path / "p.png"
    args = parser.parse_args(
        ["evaluate", "--scenario", "us06:no_precursors", "--seed", "2", "--json", "--plot", str(png)]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert '"scenario": "no_precursors"' in out and '"cycle": "us06"' in out
    assert png.exists()
    bad = parser.parse_args(["evaluate", "--scenario", "nope"])
    assert bad.func(bad) == 2
