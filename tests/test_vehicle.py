"""The virtual vehicle: values follow the scenario, frames encode at DBC cycle times."""

from __future__ import annotations

import numpy as np
import pytest

from cerebellumd.sim.cycles import load_cycle
from cerebellumd.sim.events import EventKind, build_scenario
from cerebellumd.sim.vehicle import VirtualVehicle, load_vehicle_dbc, quantise


@pytest.fixture(scope="module")
def vehicle() -> VirtualVehicle:
    return VirtualVehicle(build_scenario(load_cycle("udds"), 3), load_vehicle_dbc())


def test_periods_come_from_the_dbc(vehicle: VirtualVehicle) -> None:
    assert vehicle.message_periods() == {
        "VehicleDynamics": 0.02,
        "AdasStatus": 0.05,
        "BodyStatus": 0.1,
        "AcceleratorThermal": 0.1,
    }


def test_frames_due_sends_each_message_at_its_cycle_time(vehicle: VirtualVehicle) -> None:
    frames = vehicle.frames_due(100.0, 101.0)
    by_id: dict[int, int] = {}
    for f in frames:
        by_id[f.arbitration_id] = by_id.get(f.arbitration_id, 0) + 1
        assert 100.0 < f.timestamp <= 101.0
    assert by_id == {257: 50, 288: 20, 512: 10, 528: 10}
    assert [f.timestamp for f in frames] == sorted(f.timestamp for f in frames)
    # Consecutive windows neither drop nor repeat a frame.
    joined = vehicle.frames_due(100.0, 100.5) + vehicle.frames_due(100.5, 101.0)
    assert [f.timestamp for f in joined] == [f.timestamp for f in frames]


def test_frames_decode_to_the_scenario(vehicle: VirtualVehicle) -> None:
    sc = vehicle.scenario
    event = next(e for e in sc.events if e.kind is EventKind.URBAN)
    mid = (event.start_s + event.end_s) / 2
    frames = vehicle.frames_due(mid - 0.05, mid)
    decoded = {
        f.arbitration_id: vehicle.db.decode_message(f.arbitration_id, f.data, decode_choices=False) for f in frames
    }
    assert decoded[288]["UrbanPerceptionReq"] == 1
    speed = decoded[257]["VehicleSpeed"]
    assert speed == pytest.approx(sc.cycle.speed_at(mid), abs=1.0)


def test_values_are_deterministic_and_noisy(vehicle: VirtualVehicle) -> None:
    again = VirtualVehicle(vehicle.scenario)
    assert vehicle.message_values(500.0) == again.message_values(500.0)
    _times, values = vehicle.trace("BodyStatus")
    assert np.std(np.diff(values["BatteryVoltage"])) > 0.001
    assert 13.0 < values["BatteryVoltage"].mean() < 14.5


def test_highway_flags_follow_highway_events() -> None:
    sc = build_scenario(load_cycle("hwfet"), 2)
    v = VirtualVehicle(sc)
    times, values = v.trace("AdasStatus")
    engaged = values["HighwayAssistEngaged"] == 1
    inside = np.zeros(len(times), dtype=bool)
    for e in sc.events:
        if e.kind is EventKind.HIGHWAY:
            inside |= (times >= e.start_s) & (times < e.end_s)
    assert engaged.any()
    assert (engaged == inside).all()
    assert (values["HighwayAssistAvailable"][engaged] == 1).all()


def test_quantise_equals_a_cantools_round_trip(vehicle: VirtualVehicle) -> None:
    rng = np.random.default_rng(0)
    message = vehicle.db.get_message_by_name("VehicleDynamics")
    for _ in range(200):
        phys = {
            "VehicleSpeed": rng.uniform(0, 700),
            "LongAccel": rng.uniform(-40, 40),
            "Gear": float(rng.integers(0, 15)),
            "DynCounter": 3.0,
        }
        q = {s: float(quantise(message.get_signal_by_name(s), np.array([v]))[0]) for s, v in phys.items()}
        decoded = message.decode(message.encode(q, scaling=True), decode_choices=False)
        for name, value in q.items():
            assert decoded[name] == pytest.approx(value, abs=1e-9)
