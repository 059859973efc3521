"""The oracle: optimal over every schedule of resting choices, and a lower bound."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cerebellumd.accel import AccelState
from cerebellumd.config import builtin_example, parse_config
from cerebellumd.policies.oracle import need_intervals, plan
from cerebellumd.profiles import load_profile
from cerebellumd.sim.cycles import load_cycle
from cerebellumd.sim.evaluate import SimAccelerator, evaluate
from cerebellumd.sim.events import build_scenario

MODEL = load_profile("orin_nano")
STATES = (AccelState.ACTIVE, AccelState.IDLE, AccelState.SLEEP, AccelState.OFF)


def _simulate(commands: list[tuple[float, AccelState]], initial: AccelState, end: float) -> SimAccelerator:
    acc = SimAccelerator(MODEL, initial)
    for t, target in sorted(commands, key=lambda c: c[0]):
        acc.command(t, target)
    acc.finish(end)
    return acc


def _brute_force(needs: list[tuple[float, float]], initial: AccelState, end: float) -> float:
    """Least simulated energy over every sequence of resting choices that meets every need."""
    best = float("inf")
    n = len(needs)
    for head, *rest in itertools.product(STATES, repeat=n + 1):
        gaps, tail = rest[: n - 1], rest[n - 1]
        cmds: list[tuple[float, AccelState]] = []
        first = needs[0][0]
        if head is not initial:
            cmds.append((0.0, head))
        lat = MODEL.exit_latency_s(head) + (MODEL.exit_latency_s(initial) if head is not initial else 0)
        if first < lat:
            continue
        cmds.append((first - MODEL.exit_latency_s(head), AccelState.ACTIVE))
        for (_a, b), (c, _), state in zip(needs, needs[1:], gaps, strict=False):
            if state is not AccelState.ACTIVE:
                if c - b < MODEL.round_trip_s(state):
                    break
                cmds += [(b, state), (c - MODEL.exit_latency_s(state), AccelState.ACTIVE)]
        else:
            if tail is not AccelState.ACTIVE:
                cmds.append((needs[-1][1], tail))
            acc = _simulate(cmds, initial, end)
            if all(acc.is_active_at(a) and acc.is_active_at(b) for a, b in needs):
                best = min(best, acc.energy_j)
    return best


@st.composite
def _cases(draw: st.DrawFn) -> tuple[list[tuple[float, float]], AccelState, float]:
    n = draw(st.integers(1, 3))
    t, needs = draw(st.floats(0.0, 60.0)), []
    for _ in range(n):
        length = draw(st.floats(0.1, 20.0))
        needs.append((t, t + length))
        t += length + draw(st.floats(0.01, 80.0))
    initial = draw(st.sampled_from((AccelState.IDLE, AccelState.SLEEP, AccelState.ACTIVE)))
    return needs, initial, t + draw(st.floats(0.0, 100.0))


@settings(max_examples=60, deadline=None)
@given(_cases())
def test_oracle_is_optimal_against_brute_force(case: tuple[list[tuple[float, float]], AccelState, float]) -> None:
    needs, initial, end = case
    result = plan(needs, MODEL, end, initial)
    brute = _brute_force(needs, initial, end)
    if result.feasible:
        acc = _simulate(list(result.commands), initial, end)
        # The plan's own arithmetic and the simulated accelerator agree.
        assert acc.energy_j == pytest.approx(result.energy_j, rel=1e-9, abs=1e-6)
        assert all(acc.is_active_at(a) and acc.is_active_at(b) for a, b in needs)
        assert result.energy_j <= brute + 1e-6
    else:
        assert brute == float("inf")


def test_need_intervals_merge_and_clip() -> None:
    needs = need_intervals([(0, 5, 1.0), (4, 10, 0.5), (20, 20.2, 1.5), (99, 120, 1)], 100)
    assert needs == [(1.0, 10.0), (21.5, 21.5), (100.0, 100.0)]


def test_long_gap_goes_deep_short_gap_stays_active() -> None:
    deep = plan([(10, 20), (300, 310)], MODEL, 400, AccelState.ACTIVE)
    assert (20, AccelState.SLEEP) in deep.commands or (20, AccelState.OFF) in deep.commands
    short = plan([(10, 20), (20.05, 30)], MODEL, 40, AccelState.ACTIVE)  # < idle round trip
    assert all(t < 20 or t >= 30 for t, _ in short.commands)


@pytest.mark.parametrize("cycle", ["udds", "us06"])
def test_oracle_is_a_lower_bound_of_every_policy_at_its_readiness(cycle: str) -> None:
    config = parse_config(builtin_example())
    result = evaluate(config, build_scenario(load_cycle(cycle), 4))
    rows = {r["policy"]: r for r in result["results"]}
    oracle = rows.pop("oracle")
    assert oracle["readiness"] == 1.0
    for row in rows.values():
        assert row["readiness"] <= oracle["readiness"]
        assert oracle["accelerator_energy_j"] <= row["accelerator_energy_j"] + 1e-6
