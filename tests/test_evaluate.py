"""The fast-forward evaluator: contract JSON, event-driven == plain 10 ms loop, determinism."""

from __future__ import annotations

import json

import pytest

from cerebellumd.accel import AccelState
from cerebellumd.config import builtin_example, parse_config
from cerebellumd.profiles import load_profile
from cerebellumd.sim.cycles import load_cycle, parse_cycle
from cerebellumd.sim.evaluate import (
    SimAccelerator,
    evaluate,
    ladder_for_profile,
    resume_draw,
    run_evaluation,
)
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


# -- flap figures and failed resumes ----------------------------------------------------------

FLAP_KEYS = {"state_changes", "state_changes_per_h", "peak_state_changes_per_h", "unserved_wakes", "failed_resumes"}


def test_flap_figures_are_extra_keys_from_the_accelerator_timeline(config) -> None:  # type: ignore[no-untyped-def]
    result = evaluate(config, build_scenario(load_cycle("us06"), 1))
    rows = {r["policy"]: r for r in result["results"]}
    for row in rows.values():
        assert set(row) >= FLAP_KEYS
        # Starting idle, each wake cycle is a change in and (unless still active at the end) out.
        assert row["state_changes"] >= 2 * row["wake_cycles"] - 1
        assert row["state_changes_per_h"] == pytest.approx(row["state_changes"] * 3600 / 600, abs=1e-3)
        assert row["peak_state_changes_per_h"] == row["state_changes"]  # the run is < 1 h
        # Same notion as false_wakes when the run starts at rest.
        assert row["unserved_wakes"] == row["false_wakes"]
    assert rows["always_on"]["state_changes"] == 0
    assert rows["timeout"]["unserved_wakes"] == 1  # us06 seed 1: one timeout wake serves nothing


def test_zero_resume_failure_probability_keeps_the_previous_numbers(config) -> None:  # type: ignore[no-untyped-def]
    scenario = build_scenario(load_cycle("us06"), 1)
    default = evaluate(config, scenario)
    zero = evaluate(config, scenario, resume_failure_probability=0.0)
    assert zero == default
    assert "resume_failure_probability" not in zero
    # Figures from before failed resumes existed (orin_nano, us06 seed 1); cerebellum_first's
    # since entry risk spaces out its entries into sleep (policies/entry_risk.py), below.
    before = {
        "cerebellum_first": (6772.21, 1.0, 430.0, 5),
        "always_on": (9000.0, 1.0, 0.0, 0),
        "timeout": (8732.47, 1.0, 525.0, 2),
        "oracle": (5940.258, 1.0, 1000.0, 5),
    }
    for row in zero["results"]:
        got = (row["accelerator_energy_j"], row["readiness"], row["mean_wake_latency_ms"], row["wake_cycles"])
        assert got == before[row["policy"]]
        assert row["failed_resumes"] == 0
    # With the spacing off, the policy is the one those figures were taken with.
    unspaced = config.model_copy(update={"policy": config.policy.model_copy(update={"mid_entry_late_share": 0.0})})
    mine = evaluate(unspaced, scenario, causal_baselines=False)["results"][0]
    assert (mine["accelerator_energy_j"], mine["readiness"], mine["wake_cycles"]) == (6542.78, 1.0, 5)


def test_every_resume_failing_costs_readiness_and_latency(config) -> None:  # type: ignore[no-untyped-def]
    scenario = build_scenario(load_cycle("us06"), 1)
    ok = {r["policy"]: r for r in evaluate(config, scenario)["results"]}
    evaluation = run_evaluation(config, scenario, resume_failure_probability=1.0)
    failing = evaluation.result
    assert failing["resume_failure_probability"] == 1.0
    bad = {r["policy"]: r for r in failing["results"]}
    for run in evaluation.runs[:3]:
        assert run.accelerator.failed_resumes == run.accelerator.resumes
    for name in ("cerebellum_first", "timeout"):
        assert bad[name]["failed_resumes"] > 0
        # jetson ladder: 5 s until the retry, then a second exit (latencies count from the
        # last wake command, which may come after the first one of a transition).
        assert bad[name]["mean_wake_latency_ms"] >= ok[name]["mean_wake_latency_ms"] + 3000
    assert bad["cerebellum_first"]["readiness"] < ok["cerebellum_first"]["readiness"]
    assert bad["cerebellum_first"]["missed_events"] > 0
    assert bad["always_on"] == ok["always_on"]  # never resumes
    assert bad["oracle"] == ok["oracle"]  # the no-failure lower bound


def test_failed_resumes_are_deterministic_and_loop_independent(config) -> None:  # type: ignore[no-untyped-def]
    model = EventModel(surprise_rate_per_h=120.0, false_precursor_rate_per_h=60.0)
    scenario = build_scenario(_short_cycle(), 3, model)
    fast = evaluate(config, scenario, resume_failure_probability=0.5, profile="hailo8")
    plain = evaluate(config, scenario, resume_failure_probability=0.5, profile="hailo8", event_driven=False)
    again = evaluate(config, scenario, resume_failure_probability=0.5, profile="hailo8")
    assert fast == plain == again
    assert fast["results"][0]["failed_resumes"] > 0


def test_resume_draws_are_keyed_by_seed_and_index() -> None:
    assert resume_draw(1, 0) == resume_draw(1, 0)
    draws = [resume_draw(1, i) for i in range(2000)]
    assert all(0.0 <= d < 1.0 for d in draws)
    assert 0.45 < sum(d < 0.5 for d in draws) / len(draws) < 0.55
    assert draws[:20] != [resume_draw(2, i) for i in range(20)]


def test_failed_resume_costs_the_ladder_wait_and_a_second_exit() -> None:
    model = load_profile("orin_nano")
    assert ladder_for_profile(model).backend == "jetson"
    assert ladder_for_profile(load_profile("hailo8")).backend == "hailo_pcie"
    wait = ladder_for_profile(model).wake_timeout_s  # 5 s
    acc = SimAccelerator(model, AccelState.SLEEP, resume_fails=lambda i: i == 0, retry_after_s=wait)
    acc.command(10.0, AccelState.ACTIVE)  # fails: SC7 exit (1 s, 8 J), rest at 1 W until 15 s, retry
    acc.command(30.0, AccelState.SLEEP)  # 1.5 s, 9 J
    acc.command(40.0, AccelState.ACTIVE)  # resume 1 succeeds
    acc.finish(50.0)
    assert acc.failed_resumes == 1 and acc.resumes == 2
    assert acc.wake_latencies == [pytest.approx(6.0), pytest.approx(1.0)]
    assert not acc.is_active_at(15.5) and acc.is_active_at(16.0)
    expected = (
        1.0 * 10  # asleep until the wake
        + 8.0 + 1.0 * 4.0 + 8.0  # failed exit, wait, retry
        + 15 * (30 - 16)  # active
        + 9.0 + 1.0 * (40 - 31.5) + 8.0  # sleep again, good resume
        + 15 * (50 - 41)
    )
    assert acc.energy_j == pytest.approx(expected)
