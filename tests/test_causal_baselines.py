"""Causal baselines on the Pareto plane: the timeout sweep, warm_idle and `dominated_by`."""

from __future__ import annotations

from pathlib import Path

import pytest

from cerebellumd.accel import AccelState
from cerebellumd.config import builtin_example, parse_config
from cerebellumd.sim.cycles import load_cycle
from cerebellumd.sim.evaluate import TIMEOUT_SWEEP_S, dominated_by, run_evaluation
from cerebellumd.sim.events import build_scenario
from cerebellumd.sim.plot import plot


@pytest.fixture(scope="module")
def us06():  # type: ignore[no-untyped-def]
    scenario = build_scenario(load_cycle("us06"), 1)
    return scenario, run_evaluation(parse_config(builtin_example()), scenario)


def test_contract_results_unchanged_and_baselines_added(us06) -> None:  # type: ignore[no-untyped-def]
    _, ev = us06
    result = ev.result
    assert [r["policy"] for r in result["results"]] == ["cerebellum_first", "always_on", "timeout", "oracle"]
    names = [r["policy"] for r in result["causal_baselines"]]
    assert names[: len(TIMEOUT_SWEEP_S)] == [f"timeout_{t:g}s_sleep" for t in TIMEOUT_SWEEP_S]
    assert "timeout_2s_idle" in names and "timeout_120s_idle" in names and names[-1] == "warm_idle"
    assert isinstance(result["dominated_by"], list)
    plain = run_evaluation(parse_config(builtin_example()), us06[0], causal_baselines=False).result
    assert "causal_baselines" not in plain and plain["results"] == result["results"]


def test_baselines_never_rest_deeper_than_they_may(us06) -> None:  # type: ignore[no-untyped-def]
    _, ev = us06
    for run in ev.baseline_runs:
        states = {state for _, _, state in run.accelerator.segments}
        if run.name.endswith("_idle"):
            assert not states & {AccelState.SLEEP, AccelState.OFF}, run.name
        else:
            assert AccelState.OFF not in states, run.name


def test_a_longer_timeout_costs_no_less_energy(us06) -> None:  # type: ignore[no-untyped-def]
    _, ev = us06
    rows = {r["policy"]: r for r in ev.result["causal_baselines"]}
    for rest in ("sleep", "idle"):
        energies = [rows[f"timeout_{t:g}s_{rest}"]["accelerator_energy_j"] for t in TIMEOUT_SWEEP_S]
        assert energies == sorted(energies)
        assert energies[0] < energies[-1]


def test_dominated_by_means_as_ready_and_cheaper() -> None:
    mine = {"policy": "me", "readiness": 0.95, "accelerator_energy_j": 100.0}
    others = [
        {"policy": "a", "readiness": 0.95, "accelerator_energy_j": 99.0},  # as ready, cheaper
        {"policy": "b", "readiness": 1.0, "accelerator_energy_j": 100.0},  # not cheaper
        {"policy": "c", "readiness": 0.94, "accelerator_energy_j": 10.0},  # less ready
        {"policy": "d", "readiness": 1.0, "accelerator_energy_j": 50.0},
    ]
    assert dominated_by(mine, others) == ["a", "d"]


@pytest.mark.parametrize(("cycle", "seed"), [("us06", 5), ("udds", 1)])
def test_configured_policy_is_not_dominated(cycle: str, seed: int) -> None:
    result = run_evaluation(parse_config(builtin_example()), build_scenario(load_cycle(cycle), seed)).result
    assert result["dominated_by"] == []


def test_plot_draws_the_plane(us06, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    scenario, ev = us06
    with_plane = plot(ev.runs, scenario, tmp_path / "plane.png", ev.result).read_bytes()
    without = plot(ev.runs, scenario, tmp_path / "plain.png").read_bytes()
    assert with_plane[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(with_plane) > len(without)
