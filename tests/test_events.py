"""The ground-truth event model: rules, determinism, precursors."""

from __future__ import annotations

import pytest

from cerebellumd.sim.cycles import load_cycle, parse_cycle, shipped_cycles
from cerebellumd.sim.events import (
    GEAR_REVERSE,
    EventKind,
    EventModel,
    build_scenario,
    named_scenario,
)


def _cycle(points: list[tuple[float, float]], name: str = "synthetic"):  # type: ignore[no-untyped-def]
    text = "time_s,speed_kmh\n" + "".join(f"{t},{v}\n" for t, v in points)
    return parse_cycle(text, name)


def test_same_seed_same_scenario_other_seed_differs() -> None:
    cycle = load_cycle("udds")
    a, b = build_scenario(cycle, 7), build_scenario(cycle, 7)
    assert a.events == b.events and a.precursors == b.precursors and a.battery_v == b.battery_v
    others = [build_scenario(cycle, s).events for s in range(8, 12)]
    assert any(o != a.events for o in others)


def test_steady_cruise_gives_one_highway_event_after_the_steady_time() -> None:
    points = [(t, min(100.0, t * 5.0)) for t in range(0, 120)]
    model = EventModel(surprise_rate_per_h=0, false_precursor_rate_per_h=0)
    sc = build_scenario(_cycle(points), 1, model)
    highway = [e for e in sc.events if e.kind is EventKind.HIGHWAY]
    assert len(highway) == 1
    # 100 km/h reached at t=20, steady from t=21 (3 s accel window), engaged 8 s later.
    assert 25 <= highway[0].start_s <= 32
    assert highway[0].deadline_ms == 1000


def test_stop_and_go_gives_urban_pull_aways_but_not_into_fast_segments() -> None:
    slow = [(t, 0.0 if (t % 40) < 10 else 25.0) for t in range(0, 160)]
    model = EventModel(surprise_rate_per_h=0, false_precursor_rate_per_h=0, parking_min_stop_s=1e6)
    sc = build_scenario(_cycle(slow), 3, model)
    urban = [e for e in sc.events if e.kind is EventKind.URBAN]
    assert len(urban) == 4
    assert all(e.deadline_ms == 500 for e in urban)
    fast = [(t, 0.0 if (t % 40) < 10 else 90.0) for t in range(0, 160)]
    sc_fast = build_scenario(_cycle(fast), 3, model)
    assert not [e for e in sc_fast.events if e.kind is EventKind.URBAN]


def test_last_long_stop_holds_a_parking_maneuver_in_reverse() -> None:
    points = [(t, 30.0) for t in range(0, 60)] + [(t, 0.0) for t in range(60, 100)]
    model = EventModel(surprise_rate_per_h=0, false_precursor_rate_per_h=0)
    sc = build_scenario(_cycle(points), 5, model)
    parking = [e for e in sc.events if e.kind is EventKind.PARKING]
    assert len(parking) == 1
    event = parking[0]
    assert 60 <= event.start_s < event.end_s <= 99
    assert sc.gear_at((event.start_s + event.end_s) / 2) == GEAR_REVERSE


def test_surprises_follow_the_configured_rate_and_have_no_precursor() -> None:
    cruise = [(t, 50.0) for t in range(0, 36001)]  # 10 h of driving
    model = EventModel(surprise_rate_per_h=12.0, false_precursor_rate_per_h=0)
    sc = build_scenario(_cycle(cruise), 11, model)
    surprises = [e for e in sc.events if e.kind is EventKind.SURPRISE]
    assert 90 <= len(surprises) <= 150  # Poisson(120): +-3 sigma is about +-33
    assert all(e.precursor is None for e in surprises)


def test_precursors_lead_their_events_by_a_varying_time_some_missing_some_false() -> None:
    leads, missing, false = [], 0, 0
    for cycle in shipped_cycles():
        for seed in range(5):
            sc = build_scenario(load_cycle(cycle), seed)
            for e in sc.events:
                if e.kind is EventKind.SURPRISE:
                    continue
                if e.precursor is None:
                    missing += 1
                else:
                    leads.append(e.start_s - e.precursor[0])
            false += sum(p.event is None for p in sc.precursors)
    assert missing > 0 and false > 0
    assert min(leads) >= 0 and max(leads) <= 15.0
    assert max(leads) - min(leads) > 5  # random, not a constant lead


def test_no_precursors_scenario_has_none() -> None:
    sc = build_scenario(load_cycle("udds"), 1, named_scenario("no_precursors"))
    assert sc.precursors == ()
    assert sc.events


def test_unknown_scenario_name() -> None:
    with pytest.raises(ValueError, match="unknown scenario"):
        named_scenario("nope")


def test_event_model_forbids_unknown_keys() -> None:
    with pytest.raises(ValueError):
        EventModel.model_validate({"surprise_rate": 3})
