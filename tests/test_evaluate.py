"""The fast-forward evaluator: contract JSON, event-driven == plain 10 ms loop, determinism."""

from __future__ import annotations

import json

import pytest

from cerebellumd.config import builtin_example, parse_config
from cerebellumd.policies.model import AccelState
from cerebellumd.profiles import load_profile
from cerebellumd.sim.cycles import load_cycle, parse_cycle
from cerebellumd.sim.evaluate import SimAccelerator, evaluate
from cerebellumd.sim.events import EventModel, build_scenario

CONTRACT_KEYS = {
    "policy",
    "accelerator_energy_j",
    "total_energy_j",
    "readiness",
    "missed_events",
    "wake_cycles",
    "false_wakes",
    "mean_wake_latency_ms",
}


@pytest.fixture(scope="module")
def config():  # type: ignore[no-untyped-def]
    return parse_config(builtin_example())


def _short_cycle():  # type: ignore[no-untyped-def]
    """Two minutes with a stop-and-go start, a fast steady stretch and a final stop."""
    pts = [(t, 0.0) for t in range(0, 5)] + [(t, min(25.0, (t - 4) * 3.0)) for t in range(5, 20)]
    pts += [(t, 0.0) for t in range(20, 25)] + [(t, min(95.0, (t - 24) * 4.0)) for t in range(25, 90)]
    pts += [(t, max(0.0, 95.0 - (t - 89) * 8.0)) for t in range(90, 102)] + [(t, 0.0) for t in range(102, 120)]
    text = "time_s,speed_kmh\n" + "".join(f"{t},{v}\n" for t, v in pts)
    return parse_cycle(text, "short")


def test_json_has_exactly_the_contract_keys(config) -> None:  # type: ignore[no-untyped-def]
    result = evaluate(config, build_scenario(load_cycle("us06"), 1))
    assert list(result)[:7] == ["scenario", "cycle", "seed", "duration_s", "tick_ms", "events", "results"]
    assert result["cycle"] == "us06" and result["scenario"] == "default" and result["tick_ms"] == 10
    assert result["duration_s"] == 600.0
    assert [r["policy"] for r in result["results"]] == ["cerebellum_first", "always_on", "timeout", "oracle"]
    for row in result["results"]:
        assert set(row) >= CONTRACT_KEYS
        assert 0.0 <= row["readiness"] <= 1.0
        assert row["missed_events"] == round(result["events"] * (1 - row["readiness"]))
    json.dumps(result)  # plain JSON types only


def test_total_energy_adds_the_constant_domains(config) -> None:  # type: ignore[no-untyped-def]
    result = evaluate(config, build_scenario(load_cycle("us06"), 1))
    for row in result["results"]:
        assert row["total_energy_j"] == pytest.approx(row["accelerator_energy_j"] + (3.5 + 0.6) * 600, abs=0.01)


def test_always_on_costs_active_power_times_duration(config) -> None:  # type: ignore[no-untyped-def]
    result = evaluate(config, build_scenario(load_cycle("hwfet"), 1))
    always = result["results"][1]
    assert always["accelerator_energy_j"] == pytest.approx(15.0 * 765, rel=1e-6)
    assert always["readiness"] == 1.0 and always["wake_cycles"] == 0


@pytest.mark.parametrize("seed", [1, 2])
def test_event_driven_equals_a_plain_10ms_loop(config, seed: int) -> None:  # type: ignore[no-untyped-def]
    model = EventModel(surprise_rate_per_h=120.0, false_precursor_rate_per_h=60.0)
    scenario = build_scenario(_short_cycle(), seed, model)
    assert scenario.events
    fast = evaluate(config, scenario)
    plain = evaluate(config, scenario, event_driven=False)
    assert fast == plain


def test_deterministic_for_a_seed(config) -> None:  # type: ignore[no-untyped-def]
    a = evaluate(config, build_scenario(load_cycle("us06"), 5))
    b = evaluate(config, build_scenario(load_cycle("us06"), 5))
    assert a == b


def test_no_events_means_full_readiness(config) -> None:  # type: ignore[no-untyped-def]
    cycle = parse_cycle("time_s,speed_kmh\n0,0\n60,0\n", "parked")
    model = EventModel(surprise_rate_per_h=0, false_precursor_rate_per_h=0, parking_min_stop_s=1e6)
    result = evaluate(config, build_scenario(cycle, 1, model))
    assert result["events"] == 0
    assert all(r["readiness"] == 1.0 for r in result["results"])


def test_sim_accelerator_costs_transitions_with_the_model() -> None:
    model = load_profile("orin_nano")
    acc = SimAccelerator(model, AccelState.ACTIVE)
    acc.command(10.0, AccelState.SLEEP)  # 1.5 s entry, 9 J
    acc.command(11.0, AccelState.ACTIVE)  # queued until the entry completes
    acc.finish(20.0)
    expected = 15 * 10 + 9.0 + 8.0 + 15 * (20 - 12.5)  # active again at 11.5 + 1.0
    assert acc.energy_j == pytest.approx(expected)
    assert acc.wake_latencies == [pytest.approx(1.5)]
    assert not acc.is_active_at(12.0) and acc.is_active_at(12.5)
