"""One scenario, two engines: the evaluator's whole decision path (sim/path.py) against the real
daemon (`cerebellumd run`) fed by the plant (`cerebellumd sim`) over udp_multicast, with two
key-off periods (NM bus sleep, the fused vehicle power state, the budget) in the scenario.

Compared: accelerator wakes (commands to active), sleeps (commands to a resting state), NM bus
sleeps and accelerator energy.

Tolerance, and why: the daemon sees each frame after a UDP hop and acts on its own 10 ms tick
(a phase unrelated to the frames'), steps the power fusion every 100 ms (`vehicle_power.
interval_ms`) and integrates energy on its telemetry tick (100 ms here); at speed-up 2 a wall-clock
stall of up to ~100 ms on this shared machine is 200 ms of plant time. Each state change may
therefore land up to ~0.3 s of plant time off the evaluator's, costing at most 0.3 s x the
active power (2.5 W on hailo8) per change, plus 1 % for the integration. Counts must match
within one (a change near the end of a stretch may fall either side of a key-off).

Measured: 75.84 J in the evaluator, 75.61 to 75.74 J in the daemon (3 runs). Until both engines
moved by `AcceleratorModel.next_leg`, the daemon's simulated driver cut transitions short (a
command overrode the one under way; resting -> resting skipped the wake) and the daemon spent
70.3 J: the 5.5 J gap the old 5 % tolerance hid.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import sys
from importlib import resources
from pathlib import Path

import pytest

from cerebellumd.accel import AccelState
from cerebellumd.config import load_config
from cerebellumd.sim.breakdown import breakdown, by_reason
from cerebellumd.sim.cycles import load_cycle
from cerebellumd.sim.evaluate import run_evaluation
from cerebellumd.sim.events import build_scenario
from cerebellumd.sim.events_config import load_event_file

from .helpers import free_port
from .test_hil import Processes, _try_scrape, total, wait_for


def _by_reason(metrics: dict) -> dict[str, float]:
    return {dict(labels)["reason"]: v for (n, labels), v in metrics.items()
            if n == "cerebellumd_accelerator_energy_joules_total"}

SPEEDUP = 2.0
# Standing, a drive to 50 km/h and back (5-22 s), key-off 26-40 s, a second drive (44-54 s),
# key-off from 58 s to the end.
CYCLE = "time_s,speed_kmh\n" + "".join(
    f"{t},{min(50, (t - 5) * 5, (22 - t) * 5) if 5 <= t <= 22 else min(30, (t - 44) * 6, (54 - t) * 6) if 44 <= t <= 54 else 0}\n"  # noqa: E501
    for t in range(76))
EVENTS = """
surprise_rate_per_h = 0
false_precursor_rate_per_h = 0

[[key_off]]
at_s = 26
duration_s = 14

[[key_off]]
at_s = 58
duration_s = 17
"""
TOLERANCE_S_PER_CHANGE = 0.3
ACTIVE_W = 2.5


def _run_config(tmp: Path, udp_port: int, metrics_port: int) -> Path:
    text = resources.files("cerebellumd").joinpath("examples", "demo.toml").read_text("utf-8")
    text = re.sub(r'interface = "virtual"\nchannel = "cerebellumd-demo"',
                  f'interface = "udp_multicast"\nchannel = "239.74.163.2"\noptions = {{ port = {udp_port} }}', text)
    text = text.replace('profile = "orin_nano"', 'profile = "hailo8"').replace("port = 9108", f"port = {metrics_port}")
    text = text.replace("tick_ms = 10", "tick_ms = 10\ntelemetry_interval_ms = 100")
    text += """
[signals.ignition]
can = "BodyStatus.Ignition"
max_age_ms = 1000

[nm]
enabled = true
ignition_signal = "ignition"

[vehicle_power]
enabled = true
can_ignition_signal = "ignition"

[battery]
enabled = true
voltage_signal = "battery_v"

[accelerator.escalation]
wake_timeout_ms = 5000
"""
    path = tmp / "run.toml"
    path.write_text(text)
    return path


def _counts(acc) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Wakes: commands to active (the daemon's `cerebellumd_transition_seconds_count{target=
    "active"}`); sleeps: commands from active to a resting state (its `cerebellumd_sleeps_total`,
    the step-downs from active). The daemon re-sends a resting target when NM's clamp starts (a
    driver command that changes nothing), so commands to resting states are not compared."""
    targets = [target for _, target in acc.commands]
    wakes = sum(1 for target in targets if target is AccelState.ACTIVE)
    sleeps = sum(1 for a, b in itertools.pairwise(targets)
                 if a is AccelState.ACTIVE and b is not AccelState.ACTIVE)
    return wakes, sleeps


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_evaluator_and_daemon_agree_on_a_scenario_with_key_offs(tmp_path: Path) -> None:
    (tmp_path / "short.csv").write_text(CYCLE)
    (tmp_path / "keyoffs.toml").write_text(EVENTS)
    udp_port, metrics_port = random.randint(20000, 60000), free_port()
    run_toml = _run_config(tmp_path, udp_port, metrics_port)
    (tmp_path / "sim.toml").write_text(
        f'[plant]\ncycle = "{tmp_path / "short.csv"}"\nseed = 1\nspeedup = {SPEEDUP}\n'
        f'events = "{tmp_path / "keyoffs.toml"}"\n\n'
        f'[can]\ninterface = "udp_multicast"\nchannel = "239.74.163.2"\noptions = {{ port = {udp_port} }}\n')

    # The evaluator first (in-process, a fraction of a second).
    config = load_config(run_toml)
    name, world = load_event_file(tmp_path / "keyoffs.toml")
    scenario = build_scenario(load_cycle(tmp_path / "short.csv"), 1, world, name)
    ev = run_evaluation(config, scenario, causal_baselines=False)
    mine = ev.runs[0]
    assert mine.path is not None
    e_wakes, e_sleeps = _counts(mine.accelerator)
    e_energy = mine.accelerator.energy_j
    e_bus_sleeps = mine.path.nm_transitions.get("bus_sleep", 0)
    assert e_wakes >= 2 and e_bus_sleeps == 2, (e_wakes, mine.path.nm_transitions)

    procs = Processes(tmp_path)
    try:
        procs.start("run", sys.executable, "-m", "cerebellumd", "run", "--config", str(run_toml),
                    "--speedup", str(SPEEDUP))
        wait_for(lambda: _try_scrape(metrics_port), 30, "the daemon's metrics endpoint", procs)
        before = _try_scrape(metrics_port) or {}
        e0 = total(before, "cerebellumd_domain_energy_joules_total", domain="accelerator")
        r0 = _by_reason(before)
        w0 = total(before, "cerebellumd_transition_seconds_count", target="active")
        s0 = total(before, "cerebellumd_sleeps_total")
        sim = procs.start("sim", sys.executable, "-m", "cerebellumd", "sim", "--config", str(tmp_path / "sim.toml"))
        assert sim.stdout is not None
        ready = json.loads(sim.stdout.readline() or "{}")
        assert ready.get("ready"), procs.logs()
        sim.wait(timeout=75 / SPEEDUP + 20)
        # The scenario ends parked: wait for the second bus sleep, then read the totals.
        m = wait_for(lambda: (lambda x: x if x and total(x, "cerebellumd_nm_transitions_total", state="bus_sleep")
                              >= 2 else None)(_try_scrape(metrics_port)), 20, "the second bus sleep", procs)
    finally:
        procs.stop()
    d_energy = total(m, "cerebellumd_domain_energy_joules_total", domain="accelerator") - e0
    d_by_reason = {r: j - r0.get(r, 0.0) for r, j in _by_reason(m).items()}
    d_wakes = total(m, "cerebellumd_transition_seconds_count", target="active") - w0
    d_sleeps = total(m, "cerebellumd_sleeps_total") - s0
    d_bus_sleeps = total(m, "cerebellumd_nm_transitions_total", state="bus_sleep")
    report = {"evaluator": {"wakes": e_wakes, "sleeps": e_sleeps, "bus_sleeps": e_bus_sleeps,
                            "energy_j": round(e_energy, 2)},
              "daemon": {"wakes": d_wakes, "sleeps": d_sleeps, "bus_sleeps": d_bus_sleeps,
                         "energy_j": round(d_energy, 2)}}
    print(json.dumps(report))
    assert d_bus_sleeps == e_bus_sleeps, report
    assert abs(d_wakes - e_wakes) <= 1, report
    assert abs(d_sleeps - e_sleeps) <= 1, report
    changes = e_wakes + e_sleeps
    allowed = 0.01 * e_energy + TOLERANCE_S_PER_CHANGE * ACTIVE_W * changes
    assert abs(d_energy - e_energy) <= allowed, (report, allowed)
    # the same energy split by reason: every joule under one reason, and the reasons of the
    # evaluator's breakdown (the daemon does not name the clamps: their time is the policy's)
    assert sum(d_by_reason.values()) == pytest.approx(d_energy, rel=0.01, abs=0.5), d_by_reason
    e_by_reason = by_reason(breakdown(mine.accelerator.charges, mine.reasons))
    print(json.dumps({"daemon": d_by_reason, "evaluator": e_by_reason}))
    big = {r for r, j in e_by_reason.items() if j > 0.05 * e_energy}  # the reasons that matter
    assert len(big) >= 2, e_by_reason
    for reason in big:  # measured within 3 % here; the margin is for a loaded machine
        assert d_by_reason.get(reason, 0.0) == pytest.approx(e_by_reason[reason], rel=0.2, abs=1.0), (
            reason, d_by_reason, e_by_reason)
