"""Key-on to accelerator-ready, through the real daemon (docs/parked.md).

The daemon runs in this process with the demo configuration plus `[vehicle_power]` on the DBC's
BodyStatus.Ignition, on a python-can virtual bus, with the simulated accelerator taking the
profile's latencies. A vehicle task sends every DBC message every 20 ms. Each cycle: key-off
(Ignition 0) until the accelerator rests in the parked state (policy.deepest_state), then key-on
(Ignition 1); the daemon's own `cerebellumd_keyon_ready_seconds` measure (first evidence of the key-on to
the accelerator in a state whose exit latency fits the latency budget) is read per cycle.

Policy time runs `--speedup` times faster than the wall clock (the simulated accelerator too), so
the numbers are vehicle seconds. For each profile and parked state it prints the measured
readiness, the profile's exit latency from the parked state to active (the baseline: what a
challenge at key-on would wait) and the parked draw, and the ratio measured / baseline.

    python bench/keyon_ready.py [--cycles N] [--speedup X] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import can

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cerebellumd.accel import AccelState
from cerebellumd.config import builtin_example, parse_config
from cerebellumd.daemon.clock import Clock
from cerebellumd.daemon.runtime import Daemon
from cerebellumd.daemon.vehicle_power import VehiclePower
from cerebellumd.drivers.accel_simulated import SimulatedAccelerator
from cerebellumd.drivers.dbc import load_dbc
from cerebellumd.policies.vehicle_power import PowerState
from cerebellumd.profiles import load_profile

VP = """
[signals.ignition]
can = "BodyStatus.Ignition"
max_age_ms = 500

[vehicle_power]
enabled = true
can_ignition_signal = "ignition"
interval_ms = 20
"""
VALUES: dict[str, dict[str, float]] = {
    "VehicleDynamics": {"VehicleSpeed": 0, "LongAccel": 0, "Gear": 0, "DynCounter": 0},
    "AdasStatus": {"HighwayAssistAvailable": 0, "HighwayAssistEngaged": 0, "UrbanPerceptionReq": 0,
                   "ParkAssistReq": 0, "CollisionRisk": 0, "ParkSearch": 0, "TrafficDensity": 0,
                   "ObstacleDistance": 80, "AdasCounter": 0},
    "BodyStatus": {"BatteryVoltage": 12.6, "Ignition": 1, "AmbientTemp": 20},
    "AcceleratorThermal": {"AcceleratorTemp": 40, "RailOn": 1},
}
_channels = itertools.count()


async def until(predicate: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.002)


async def measure(profile: str, parked: str, cycles: int, speedup: float) -> dict[str, Any]:
    channel = f"bench-keyon-{next(_channels)}"
    text = builtin_example().replace('channel = "cerebellumd-demo"', f'channel = "{channel}"')
    text = text.replace('profile = "orin_nano"', f'profile = "{profile}"')
    text = text.replace('deepest_state = "off"', f'deepest_state = "{parked}"')
    config = parse_config(text + VP)
    config = config.model_copy(update={"prometheus": config.prometheus.model_copy(update={"enabled": False})})
    model = await asyncio.to_thread(load_profile, profile)
    db = await asyncio.to_thread(load_dbc, "builtin:vehicle.dbc")
    driver = SimulatedAccelerator(model, initial=AccelState.IDLE, time_scale=speedup)
    daemon = await Daemon.async_create(config, clock=Clock(scale=speedup), driver=driver, model=model)
    values = {k: dict(v) for k, v in VALUES.items()}
    bus = can.Bus(interface="virtual", channel=channel)

    async def vehicle() -> None:
        while True:
            for name, signals in values.items():
                msg = db.get_message_by_name(name)
                bus.send(can.Message(arbitration_id=msg.frame_id, data=msg.encode(signals), is_extended_id=False))
            await asyncio.sleep(0.02)

    sender = asyncio.create_task(vehicle())
    ready: list[float] = []
    try:
        await daemon.async_start()
        vp = next(p for p in daemon.parts if isinstance(p, VehiclePower))
        parked_state = AccelState(parked)
        wait = 120.0
        for _ in range(cycles):
            values["BodyStatus"]["Ignition"] = 0
            await until(lambda: vp.state is PowerState.OFF, wait, "key-off")
            await until(lambda: daemon.actuator.state is parked_state, wait, "parked")
            before = vp.m_ready.collect()[0].samples
            count = next(s.value for s in before if s.name.endswith("_count"))
            values["BodyStatus"]["Ignition"] = 1

            def done(count: float = count) -> bool:
                samples = vp.m_ready.collect()[0].samples
                return next(s.value for s in samples if s.name.endswith("_count")) > count

            await until(done, wait, "ready after key-on")
            assert vp.last_ready_s is not None
            ready.append(vp.last_ready_s)
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        await daemon.async_stop()
        bus.shutdown()
    baseline = model.exit_latency_s(parked_state)
    p50 = statistics.median(ready)
    return {
        "profile": profile, "parked_state": parked, "cycles": len(ready),
        "ready_p50_s": round(p50, 4), "ready_max_s": round(max(ready), 4),
        "profile_exit_s": baseline, "ratio_to_exit": round(p50 / baseline, 3) if baseline > 0 else None,
        "parked_w": model.power_w[parked_state],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    profiles = ("hailo8",) if args.quick else ("orin_nano", "hailo8")
    for profile in profiles:
        for parked in ("off", "sleep"):
            rows.append(await measure(profile, parked, args.cycles, args.speedup))
    return {"speedup": args.speedup, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--speedup", type=float, default=10.0)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--quick", action="store_true", help="one profile, two cycles (CI smoke)")
    args = parser.parse_args()
    if args.quick:
        args.cycles = min(args.cycles, 2)
    result = asyncio.run(main_async(args))
    if not args.json:
        print(f"key-on to accelerator ready (vehicle seconds, speedup {args.speedup:g}x)")
        print(f"{'profile':<10} {'parked':<6} {'cycles':>6} {'p50 s':>8} {'max s':>8} {'exit s':>7} "
              f"{'ratio':>6} {'parked W':>8}")
        for r in result["rows"]:
            ratio = "-" if r["ratio_to_exit"] is None else f"{r['ratio_to_exit']:.2f}"
            print(f"{r['profile']:<10} {r['parked_state']:<6} {r['cycles']:>6} {r['ready_p50_s']:>8.3f} "
                  f"{r['ready_max_s']:>8.3f} {r['profile_exit_s']:>7.3f} {ratio:>6} {r['parked_w']:>8.2f}")
    with contextlib.suppress(BrokenPipeError):
        print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
