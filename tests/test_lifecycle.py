"""The wake watchdog driven by the daemon: an in-process daemon with the simulated accelerator
(real state transitions with the model's latencies, resume failures injected by its options);
operator commands go through the same CommandProcessor MQTT uses."""

from __future__ import annotations

import asyncio
import json

from cerebellumd.accel import AccelState
from cerebellumd.config import Config, parse_config
from cerebellumd.daemon.lifecycle import Lifecycle
from cerebellumd.daemon.runtime import Daemon
from cerebellumd.policies.escalation import Phase

from .helpers import until


def toml(failure_probability: float, escalation: str) -> str:
    return (
        '[daemon]\nnode = "t"\ntick_ms = 10\ntelemetry_interval_ms = 50\ninitial_state = "sleep"\n'
        'safe_state = "off"\n'
        "[prometheus]\nenabled = false\n"
        '[accelerator]\nprofile = "orin_nano"\ndriver = "simulated"\nretries = 0\ncommand_timeout_ms = 500\n'
        f"options = {{ wake_failure_probability = {failure_probability} }}\n"
        f"[accelerator.escalation]\n{escalation}\n"
        "[policy]\nmin_dwell_ms = 0\nrelease_ms = 0\n"
    )


async def make(failure_probability: float, escalation: str, scale: float = 10.0) -> Daemon:
    from cerebellumd.daemon.clock import Clock

    config: Config = await asyncio.to_thread(parse_config, toml(failure_probability, escalation))
    return await Daemon.async_create(config, clock=Clock(scale=scale))


def lifecycle(daemon: Daemon) -> Lifecycle:
    return next(s for s in daemon.parts if isinstance(s, Lifecycle))


def sample(daemon: Daemon, name: str, labels: dict[str, str] | None = None) -> float:
    return daemon.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def wake(daemon: Daemon, cid: str, owner: str = "op") -> None:
    cmd = {"command": "wake", "owner": owner, "id": cid, "ttl_s": 600}
    result = daemon.commands.handle_payload(json.dumps(cmd), daemon.clock.now())
    assert result.ok, result.error


async def test_healthy_wake_is_measured_per_backend_and_counts_no_escalation() -> None:
    daemon = await make(0.0, 'backend = "simulated"')
    await daemon.async_start()
    try:
        wake(daemon, "w1")
        await until(lambda: daemon.actuator.state is AccelState.ACTIVE)
        lc = lifecycle(daemon)
        await until(lambda: lc.watch.phase is Phase.SUCCEEDED)
        assert sample(daemon, "cerebellumd_escalation_results_total", {"result": "succeeded"}) == 1
        assert sample(daemon, "cerebellumd_escalations_total", {"step": "retry"}) == 0
        count = sample(daemon, "cerebellumd_backend_wake_latency_seconds_count", {"backend": "simulated"})
        assert count == 1
        # the orin_nano profile wakes from sleep in 1.0 s of policy time (0.1 s wall at 10x)
        total = sample(daemon, "cerebellumd_backend_wake_latency_seconds_sum", {"backend": "simulated"})
        assert 0.9 <= total < 3.0
        assert sample(daemon, "cerebellumd_transition_seconds_count",
                      {"backend": "simulated", "target": "active"}) == 1
    finally:
        await daemon.async_stop()


async def test_failed_resumes_climb_the_ladder_give_up_and_stay_safe_until_asked_again() -> None:
    ladder = ('backend = "simulated"\nwake_timeout_ms = 3000\nsafe_state = "off"\n'
              'rungs = [ { rung = "retry", timeout_ms = 3000 }, { rung = "rail_cycle", timeout_ms = 4000 } ]')
    daemon = await make(1.0, ladder)
    await daemon.async_start()
    lc = lifecycle(daemon)
    try:
        wake(daemon, "w1")
        await until(lambda: lc.alarm is not None, timeout=20)
        assert sample(daemon, "cerebellumd_escalations_total", {"step": "retry"}) == 1
        assert sample(daemon, "cerebellumd_escalations_total", {"step": "rail_cycle"}) == 1
        assert sample(daemon, "cerebellumd_escalations_total", {"step": "give_up"}) == 1
        assert sample(daemon, "cerebellumd_accelerator_alarm") == 1
        assert lc.state_extra()["watchdog"]["alarm"].startswith("rail_cycle timed out")
        # the rail cycle really went through off (the simulated driver records commands)
        assert AccelState.OFF in daemon.driver.commands  # type: ignore[attr-defined]
        # the policy still wants the accelerator awake (the hold), but it is kept in the safe state
        await until(lambda: daemon.actuator.state is AccelState.OFF)
        commands = len(daemon.driver.commands)  # type: ignore[attr-defined]
        await asyncio.sleep(0)  # let a few ticks run: no new wake attempt may follow
        await until(lambda: daemon.decisions > 20)
        assert daemon.actuator.goal is AccelState.OFF
        assert len(daemon.driver.commands) == commands  # type: ignore[attr-defined]
        # its energy is the alarm's, named as the evaluator names it, not the hold's
        assert daemon.actuator.clamped_by == "path:watchdog_alarm"
        alarm_energy = {"reason": "path:watchdog_alarm"}
        await until(lambda: (sample(daemon, "cerebellumd_accelerator_energy_joules_total", alarm_energy) or 0) > 0)
        # an operator asks again: the alarm clears and the daemon tries once more
        wake(daemon, "w2", owner="op2")
        await until(lambda: lc.alarm is None)
        assert sample(daemon, "cerebellumd_accelerator_alarm") == 0
        assert daemon.actuator.clamped_by is None
        await until(lambda: len(daemon.driver.commands) > commands)  # type: ignore[attr-defined]
    finally:
        await daemon.async_stop()


async def test_a_sleep_decision_cancels_the_watch_without_escalating() -> None:
    daemon = await make(1.0, 'backend = "simulated"\nwake_timeout_ms = 5000')
    await daemon.async_start()
    lc = lifecycle(daemon)
    try:
        wake(daemon, "w1")
        await until(lambda: lc.watch.phase is Phase.WATCHING)
        result = daemon.commands.handle_payload(
            json.dumps({"command": "release", "owner": "op", "id": "r1"}), daemon.clock.now())
        assert result.ok
        await until(lambda: lc.watch.phase is Phase.IDLE)
        assert sample(daemon, "cerebellumd_escalation_results_total", {"result": "cancelled"}) == 1
        assert sample(daemon, "cerebellumd_escalations_total", {"step": "retry"}) == 0
    finally:
        await daemon.async_stop()
