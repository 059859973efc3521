"""Flap figures over decision timelines: changes per hour, peak rate, unserved wake cycles."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cerebellumd.accel import AccelState
from cerebellumd.policies.flapping import TimelinePoint, flap_figures, wake_cycles

ACT, IDLE, SLP, OFF = AccelState.ACTIVE, AccelState.IDLE, AccelState.SLEEP, AccelState.OFF


def tl(*pts: tuple[float, AccelState, bool]) -> list[TimelinePoint]:
    return [TimelinePoint(t, s, served) for t, s, served in pts]


@pytest.mark.parametrize(
    ("points", "changes", "cycles", "unserved"),
    [
        (tl((0, OFF, False), (3600, OFF, False)), 0, 0, 0),
        # One served wake: off -> active (served) -> off.
        (tl((0, OFF, False), (100, ACT, True), (200, ACT, False), (300, OFF, False), (3600, OFF, False)),
         2, 1, 0),
        # ACT wake that nothing used (e.g. a false wake candidate that validated and vanished).
        (tl((0, OFF, False), (100, ACT, False), (110, IDLE, False), (3600, IDLE, False)), 2, 1, 1),
        # Still awake at the end, served late in the cycle.
        (tl((0, SLP, False), (10, ACT, False), (20, ACT, False), (30, ACT, True)), 1, 1, 0),
        # Rest-state changes count as changes but are no wake cycles.
        (tl((0, IDLE, False), (10, SLP, False), (20, OFF, False), (30, IDLE, False)), 3, 0, 0),
    ],
    ids=["quiet", "served", "unserved", "awake-at-end", "rest-only"],
)
def test_figures(points: list[TimelinePoint], changes: int, cycles: int, unserved: int) -> None:
    f = flap_figures(points)
    assert (f.state_changes, f.wake_cycles, f.unserved_wakes) == (changes, cycles, unserved)
    assert f.unserved_fraction == (unserved / cycles if cycles else 0.0)


def test_rates_and_peak_window() -> None:
    # 6 changes in the first 10 minutes, then quiet for 1h50: average 3/h, peak 6 in an hour.
    pts = [TimelinePoint(0, OFF)]
    for k in range(1, 7):
        pts.append(TimelinePoint(k * 100.0, ACT if k % 2 else OFF, served=k == 1))
    pts.append(TimelinePoint(7200.0, OFF))
    f = flap_figures(pts)
    assert f.duration_s == 7200
    assert f.changes_per_hour == pytest.approx(3.0)
    assert f.peak_changes_per_hour == 6
    assert (f.wake_cycles, f.unserved_wakes) == (3, 2)
    assert f.wakes_per_hour == pytest.approx(1.5)


def test_short_cycles_and_explicit_span() -> None:
    pts = tl((0, OFF, False), (10, ACT, True), (12, OFF, False), (100, ACT, True), (400, OFF, False))
    f = flap_figures(pts, start=0, end=3600, short_cycle_s=5)
    assert f.short_cycles == 1 and f.duration_s == 3600
    assert [c.duration_s for c in wake_cycles(pts)] == [2, 300]


def test_empty_timeline() -> None:
    f = flap_figures([])
    assert (f.state_changes, f.wake_cycles, f.changes_per_hour) == (0, 0, 0.0)


states = st.sampled_from([ACT, IDLE, SLP, OFF])


@given(st.lists(st.tuples(st.floats(0.001, 600), states, st.booleans()), min_size=1, max_size=80))
def test_invariants(steps: list[tuple[float, AccelState, bool]]) -> None:
    t, pts = 0.0, []
    for dt, s, served in steps:
        t += dt
        pts.append(TimelinePoint(t, s, served))
    f = flap_figures(pts)
    entries = sum(
        1 for i, p in enumerate(pts) if p.target is ACT and (i == 0 or pts[i - 1].target is not ACT)
    )
    assert f.wake_cycles == entries
    assert 0 <= f.unserved_wakes <= f.wake_cycles
    assert f.peak_changes_per_hour <= f.state_changes
    assert f.state_changes >= 2 * f.wake_cycles - 2  # each cycle has an entry and (bar the
    # first and last) an exit
