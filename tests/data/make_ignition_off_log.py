"""Writes tests/data/ignition_off.log: a candump -L log (python-can's CanutilsLogWriter) of the
project's demo DBC for a car standing with the ignition off while its bus goes to sleep.

- 0 to 2.0 s: two ECUs (NM nodes 0x10, 0x20) send NM PDUs every 200 ms with no request
  (ready sleep: nobody needs the network); the BCM sends BodyStatus (Ignition 0, 12.4 V)
  every 100 ms, the VCU VehicleDynamics (0 km/h, gear P) every 20 ms, ADAS all quiet every 50 ms;
- 2.0 s: the NM PDUs stop; 2.5 s: the application frames stop; then silence (bus sleep).

Run `python tests/data/make_ignition_off_log.py` to regenerate; the log is deterministic.
"""

from __future__ import annotations

from pathlib import Path

import can

from cerebellumd.drivers.dbc import load_dbc

OUT = Path(__file__).with_name("ignition_off.log")
T0 = 1_700_000_000.0
NM_END_S = 2.0
APP_END_S = 2.5
VALUES = {
    "VehicleDynamics": {"VehicleSpeed": 0, "LongAccel": 0, "Gear": 0, "DynCounter": 0},
    "AdasStatus": {"HighwayAssistAvailable": 0, "HighwayAssistEngaged": 0, "UrbanPerceptionReq": 0,
                   "ParkAssistReq": 0, "CollisionRisk": 0, "ParkSearch": 0, "TrafficDensity": 0,
                   "ObstacleDistance": 0, "AdasCounter": 0},
    "BodyStatus": {"BatteryVoltage": 12.4, "Ignition": 0, "AmbientTemp": 15},
}
PERIOD_MS = {"VehicleDynamics": 20, "AdasStatus": 50, "BodyStatus": 100}


def main() -> None:
    db = load_dbc("builtin:vehicle.dbc")
    frames: list[can.Message] = []
    for ms in range(0, int(APP_END_S * 1000), 10):
        t = T0 + ms / 1000
        if ms < NM_END_S * 1000 and ms % 200 == 0:
            for node in (0x10, 0x20):
                frames.append(can.Message(timestamp=t, arbitration_id=0x500 + node, is_extended_id=False,
                                          data=bytes([node, 0, 0, 0, 0, 0, 0, 0]), channel="vcan0"))
        for name, period in PERIOD_MS.items():
            if ms % period == 0:
                msg = db.get_message_by_name(name)
                frames.append(can.Message(timestamp=t, arbitration_id=msg.frame_id, is_extended_id=False,
                                          data=msg.encode(VALUES[name]), channel="vcan0"))
    writer = can.CanutilsLogWriter(OUT, channel="vcan0")
    try:
        for frame in frames:
            writer.on_message_received(frame)
    finally:
        writer.stop()
    print(f"{OUT}: {len(frames)} frames")


if __name__ == "__main__":
    main()
