"""The daemon's whole decision path in the evaluator (sim/path.py): NM clamp and pause with
key-off periods, the vehicle power state, the 12 V budget, the watchdog, holds and leases from
the scenario file, and signals the virtual vehicle cannot send."""

from __future__ import annotations

from importlib import resources

import pytest

from cerebellumd.accel import AccelState
from cerebellumd.config import ConfigError, builtin_example, parse_config
from cerebellumd.sim.cycles import parse_cycle
from cerebellumd.sim.evaluate import EvaluationError, results_by_policy, run_evaluation
from cerebellumd.sim.events import build_scenario
from cerebellumd.sim.events_config import parse_event_file

PARKED = resources.files("cerebellumd").joinpath("examples", "parked.toml").read_text("utf-8")
# Standing, up to 50 km/h and back to standing by 60 s; then standing until 400 s.
CYCLE = "time_s,speed_kmh\n" + "".join(
    f"{t},{0 if t < 5 or t > 60 else min(50, (t - 5) * 5) if t < 40 else max(0, 50 - (t - 40) * 3)}\n"
    for t in range(401))


def _config(text: str = PARKED, **sections: str) -> object:
    return parse_config(text + "".join(sections.values()), "parked.toml")


def _scenario(events: str, seed: int = 1):  # type: ignore[no-untyped-def]
    name, model = parse_event_file(events, "scenario.toml", "scenario")
    return build_scenario(parse_cycle(CYCLE, "short"), seed, model, name)


SCHEDULE = """
[signals.battery_mcu]
series = [[0, 13.8], [100, 12.6], [300, 13.8]]
period_ms = 500

[[key_off]]
at_s = 100
duration_s = 200

[[holds]]
at_s = 180
duration_s = 40
owner = "app:ota"
reason = "model update"
"""


def test_event_driven_equals_the_plain_loop_on_the_whole_path() -> None:
    config = _config()
    scenario = _scenario(SCHEDULE)
    fast = run_evaluation(config, scenario, causal_baselines=False)
    slow = run_evaluation(config, scenario, causal_baselines=False, event_driven=False)
    for a, b in zip(fast.result["results"], slow.result["results"], strict=True):
        assert a == b
    assert sum(r.steps for r in fast.runs) < sum(r.steps for r in slow.runs) / 5


def test_key_off_sleeps_the_bus_clamps_the_accelerator_and_a_lease_wakes_it() -> None:
    config = _config()
    ev = run_evaluation(config, _scenario(SCHEDULE), causal_baselines=False)
    mine = ev.runs[0]
    path = mine.path
    assert path is not None
    # NM went to bus sleep after the key-off (and woke for the lease and at key-on).
    assert path.nm_transitions.get("bus_sleep", 0) >= 1
    acc = mine.accelerator
    # The accelerator rests in its deepest state once NM prepares bus sleep after key-off.
    assert [s for a, b, s in acc.segments if a <= 110 and b >= 175] == [AccelState.OFF]
    # The lease keeps it awake while parked: active within the lease (after the off exit), and
    # counted once as a keep-awake event with its owner and reason.
    assert acc.is_active_at(215.0)
    assert not acc.is_active_at(250.0)
    assert path.keep_awake["lease"] == 1
    assert any(kind == "lease" and "app:ota: model update" in why for _, kind, why in path.keep_awake_log)
    # The always-on baseline goes through the same clamp: off while the bus sleeps.
    always = next(r for r in ev.runs if r.name == "always_on")
    assert not always.accelerator.is_active_at(150.0)
    result = results_by_policy(ev.result)[config.policy.name]
    assert result["path"]["bus_sleeps"] >= 1
    assert result["path"]["keyon_ready_s"], "the key-on at 300 s is timed"


def test_without_the_key_off_the_accelerator_never_sleeps_with_the_bus() -> None:
    config = _config()
    scenario = _scenario("[signals.battery_mcu]\nconstant = 13.8\n")
    path = run_evaluation(config, scenario, causal_baselines=False).runs[0].path
    assert path is not None
    assert path.nm_transitions.get("bus_sleep", 0) == 0
    assert path.keep_awake == dict.fromkeys(path.keep_awake, 0)


def test_a_signal_the_evaluator_cannot_feed_is_an_error_naming_it() -> None:
    config = _config()
    with pytest.raises(EvaluationError, match=r"battery_mcu.*mcu 'battery_v'.*\[signals\.battery_mcu\]"):
        run_evaluation(config, _scenario(""), causal_baselines=False)
    with pytest.raises(EvaluationError, match=r"speed_kmh.*virtual vehicle feeds it"):
        run_evaluation(config, _scenario("[signals.speed_kmh]\nconstant = 3\n[signals.battery_mcu]\nconstant = 13\n"),
                       causal_baselines=False)
    with pytest.raises(EvaluationError, match="'nope' is not a configured signal"):
        run_evaluation(config, _scenario("[signals.nope]\nconstant = 3\n[signals.battery_mcu]\nconstant = 13\n"),
                       causal_baselines=False)


def test_the_wake_deadline_counts_the_exit_latency_from_where_the_wake_starts() -> None:
    # The demo's 2 s simulated ladder against orin_nano's 25 s exit from off: the watchdog's
    # deadline is the model's exit latency plus that allowance, so a key-on cold start is no
    # failure (before the deadline counted the exit, every key-on gave up and held the safe state).
    text = PARKED.replace("wake_timeout_ms = 30000", "wake_timeout_ms = 2000")
    path = run_evaluation(_config(text), _scenario(SCHEDULE), causal_baselines=False).runs[0].path
    assert path is not None
    assert path.escalations.get("give_up", 0) == 0 and path.alarms == 0
    # A wake that does not complete still escalates and gives up: tests/test_lifecycle.py.


def test_the_plain_demo_runs_step_alone() -> None:
    config = parse_config(builtin_example(), "demo.toml")
    ev = run_evaluation(config, _scenario(""), causal_baselines=False)
    assert all(r.path is None for r in ev.runs)
    assert "path" not in ev.result["results"][0]


def test_schedule_errors_name_file_and_line() -> None:
    text = "surprise_rate_per_h = 3\n\n[[holds]]\nat_s = 1\nduration_s = 2\nmood = \"awake\"\n"
    with pytest.raises(ConfigError) as err:
        parse_event_file(text, "w.toml")
    issue = err.value.issues[0]
    assert (issue.file, issue.line, issue.key) == ("w.toml", 6, "holds[0].mood")
    with pytest.raises(ConfigError, match="before the one at 10"):
        parse_event_file("[[key_off]]\nat_s = 10\nduration_s = 20\n[[key_off]]\nat_s = 15\nduration_s = 5\n",
                         "k.toml")
    with pytest.raises(ConfigError, match="exactly one of constant or series"):
        parse_event_file("[signals.x]\nperiod_ms = 10\n", "s.toml")
