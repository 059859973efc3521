"""`cerebellumd replay`: recorded logs (written here with python-can's own writers) through
decoding and the policy; counts must be exact."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import can
import cantools
import pytest

from cerebellumd.config import builtin_example, parse_config
from cerebellumd.sim.replay import ReplayError, replay

T0 = 1_700_000_000.0


@pytest.fixture
def vehicle_dbc(tmp_path: Path) -> Path:
    path = tmp_path / "vehicle.dbc"
    path.write_text(resources.files("cerebellumd").joinpath("data", "vehicle.dbc").read_text("utf-8"))
    return path


def _frames(db: cantools.database.can.Database, seconds: float, collision_from: float | None) -> list[can.Message]:
    """AdasStatus every 50 ms and VehicleDynamics every 20 ms for `seconds`, plus 3 unknown-ID
    frames and 2 short AdasStatus frames (known ID, too few bytes)."""
    adas = db.get_message_by_name("AdasStatus")
    dyn = db.get_message_by_name("VehicleDynamics")
    out: list[can.Message] = []
    for k in range(round(seconds / 0.05)):
        t = k * 0.05
        risk = 1 if collision_from is not None and t >= collision_from else 0
        data = adas.encode({s.name: 0 for s in adas.signals} | {"CollisionRisk": risk, "ObstacleDistance": 100})
        out.append(can.Message(timestamp=T0 + t, arbitration_id=adas.frame_id, data=data, is_extended_id=False))
    for k in range(round(seconds / 0.02)):
        data = dyn.encode({"VehicleSpeed": 50, "LongAccel": 0, "Gear": 3, "DynCounter": k % 16})
        out.append(can.Message(timestamp=T0 + k * 0.02 + 0.001, arbitration_id=dyn.frame_id, data=data,
                               is_extended_id=False))
    for i in range(3):
        out.append(can.Message(timestamp=T0 + 0.5 + i, arbitration_id=0x7AB, data=b"\x01\x02", is_extended_id=False))
    for i in range(2):
        out.append(can.Message(timestamp=T0 + 0.7 + i, arbitration_id=adas.frame_id, data=b"\x00",
                               is_extended_id=False))
    out.sort(key=lambda m: m.timestamp)
    return out


def _write(path: Path, frames: list[can.Message]) -> Path:
    with can.Logger(str(path)) as logger:
        for msg in frames:
            logger.on_message_received(msg)
    return path


@pytest.mark.parametrize("suffix", [".log", ".asc", ".blf"])
def test_counts_are_exact_in_every_log_format(tmp_path: Path, vehicle_dbc: Path, suffix: str) -> None:
    db = cantools.database.load_file(str(vehicle_dbc))
    frames = _frames(db, 4.0, collision_from=None)
    log = _write(tmp_path / f"drive{suffix}", frames)
    result = replay(log, vehicle_dbc)
    assert result["frames"] == len(frames) == 80 + 200 + 3 + 2
    assert result["unknown_ids"] == 3
    assert result["decode_errors"] == 2
    assert result["decoded"] == 280
    assert "CollisionRisk" in result["signals"] and "VehicleSpeed" in result["signals"]
    assert result["signals"] == sorted(result["signals"])
    assert result["wakes"] == 0 and result["policy"] is None  # no config, no policy


def test_policy_wakes_on_the_recorded_challenge_and_sleeps_after_it(tmp_path: Path, vehicle_dbc: Path) -> None:
    db = cantools.database.load_file(str(vehicle_dbc))
    config = parse_config(builtin_example(), "demo.toml")
    quiet = replay(_write(tmp_path / "quiet.log", _frames(db, 20.0, collision_from=None)), vehicle_dbc, config)
    assert quiet["wakes"] == 0, quiet
    # Collision risk from t=5 s to the end, then 15 s more of quiet traffic: one wake, then the
    # release timer (4 s in the demo) sends it back to rest.
    risky = [m for m in _frames(db, 10.0, collision_from=5.0)]
    tail = [can.Message(timestamp=m.timestamp + 10.0, arbitration_id=m.arbitration_id, data=m.data,
                        is_extended_id=m.is_extended_id) for m in _frames(db, 15.0, collision_from=None)]
    result = replay(_write(tmp_path / "risk.asc", risky + tail), vehicle_dbc, config)
    assert result["wakes"] == 1, result
    assert result["wake_reasons"] == {"demand:collision": 1}
    assert result["sleeps"] == 1, result
    assert "collision_risk" in result["fed_signals"]


def test_cli_json_and_a_bad_log(tmp_path: Path, vehicle_dbc: Path) -> None:
    db = cantools.database.load_file(str(vehicle_dbc))
    log = _write(tmp_path / "drive.log", _frames(db, 1.0, collision_from=None))
    proc = subprocess.run([sys.executable, "-m", "cerebellumd", "replay", str(log), "--dbc", str(vehicle_dbc),
                           "--json"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["frames"], result["unknown_ids"], result["decode_errors"]) == (20 + 50 + 3 + 2, 3, 2)
    with pytest.raises(ReplayError):
        replay(tmp_path / "drive.unknownsuffix", vehicle_dbc)


def test_a_real_vehicle_dbc_the_project_has_never_seen(tmp_path: Path) -> None:
    opendbc = pytest.importorskip("opendbc", reason="opendbc (real-vehicle DBCs) is not installed")
    folder = Path(opendbc.__file__).parent / "dbc"
    names = ("toyota_prius_2010_pt.dbc", "toyota_adas.dbc", "toyota_tss2_adas.dbc")
    dbc = next((folder / n for n in names if (folder / n).exists()), None)
    if dbc is None:
        pytest.skip(f"none of {names} is in this opendbc version")
    db = cantools.database.load_file(str(dbc), strict=False)
    message = next(m for m in db.messages if m.length == 8 and not m.is_multiplexed() and m.signals)
    frames = []
    for k in range(50):
        data = message.encode({s.name: (s.minimum or 0) if s.choices is None else next(iter(s.choices))
                               for s in message.signals}, strict=False)
        frames.append(can.Message(timestamp=T0 + k * 0.01, arbitration_id=message.frame_id, data=data,
                                  is_extended_id=message.is_extended_frame))
    frames.append(can.Message(timestamp=T0 + 1, arbitration_id=message.frame_id, data=b"\x00\x00",
                              is_extended_id=message.is_extended_frame))
    unknown = next(i for i in range(0x100, 0x7FF) if db.messages and i not in {m.frame_id for m in db.messages})
    frames.append(can.Message(timestamp=T0 + 2, arbitration_id=unknown, data=b"\x00" * 8, is_extended_id=False))
    result = replay(_write(tmp_path / "toyota.blf", frames), dbc)
    assert (result["frames"], result["decoded"], result["decode_errors"], result["unknown_ids"]) == (52, 50, 1, 1)
    assert result["signals"] == sorted(s.name for s in message.signals)
    assert result["wakes"] == 0


def test_a_real_dbc_that_does_not_parse_is_reported_with_the_reason(tmp_path: Path) -> None:
    opendbc = pytest.importorskip("opendbc", reason="opendbc (real-vehicle DBCs) is not installed")
    dbc = Path(opendbc.__file__).parent / "dbc" / "toyota_2017_ref_pt.dbc"
    if not dbc.exists():
        pytest.skip(f"{dbc.name} is not in this opendbc version")
    log = _write(tmp_path / "empty.log", [])
    # cantools rejects a standard frame id wider than 11 bits even when not strict.
    with pytest.raises(ReplayError, match="more than 11 bits"):
        replay(log, dbc)


# -- CAN NM in the replay ([nm] enabled) ------------------------------------------------------

NM_TOML = """
[signals.ignition]
can = "BodyStatus.Ignition"
max_age_ms = 1000

[nm]
enabled = true
"""


def _nm_drive(db: cantools.database.can.Database, ignition_off_at: float) -> list[can.Message]:
    """ECU 0x12's NM PDU every 0.5 s and VehicleDynamics every 20 ms for 10 s, BodyStatus
    (KL15 on until `ignition_off_at`) every 100 ms, then silence."""
    dyn = db.get_message_by_name("VehicleDynamics")
    body = db.get_message_by_name("BodyStatus")
    out = [can.Message(timestamp=T0 + k * 0.5, arbitration_id=0x512, data=b"\x12\x00\xff\xff", is_extended_id=False)
           for k in range(21)]
    out += [can.Message(timestamp=T0 + k * 0.02 + 0.001, arbitration_id=dyn.frame_id, is_extended_id=False,
                        data=dyn.encode({"VehicleSpeed": 30, "LongAccel": 0, "Gear": 3, "DynCounter": k % 16}))
            for k in range(500)]
    out += [can.Message(timestamp=T0 + k * 0.1 + 0.05, arbitration_id=body.frame_id, is_extended_id=False,
                        data=body.encode({"BatteryVoltage": 12.6, "AmbientTemp": 20,
                                          "Ignition": int(k * 0.1 + 0.05 < ignition_off_at)}))
            for k in range(100)]
    out.sort(key=lambda m: m.timestamp)
    return out


def _modes(result: dict[str, Any]) -> list[tuple[float, str]]:
    return [(round(tr["t"], 3), tr["state"]) for tr in result["nm"]["transitions"]]


def test_nm_transitions_and_bus_sleep_after_the_log_falls_silent(tmp_path: Path, vehicle_dbc: Path) -> None:
    db = cantools.database.load_file(str(vehicle_dbc))
    log = _write(tmp_path / "nm.log", _nm_drive(db, ignition_off_at=0.0))  # KL15 off throughout
    config = parse_config(builtin_example() + NM_TOML.replace("[nm]", "[nm]\nignition_signal = \"ignition\""))
    result = replay(log, vehicle_dbc, config)
    assert _modes(result) == [
        (0.0, "bus_sleep"),  # log start
        (0.0, "repeat_message"),  # the first NM PDU validates the wake
        (1.5, "ready_sleep"),  # repeat-message time over; nothing requests the network
        (12.0, "prepare_bus_sleep"),  # last NM PDU at 10.0 + NM timeout 2.0 (traffic ended 9.981)
        (14.0, "bus_sleep"),  # + wait-bus-sleep 2.0: after the log's end, as the silence goes on
    ]
    nm = result["nm"]
    assert nm["bus_sleep_at"] == pytest.approx(14.0)
    assert nm["final_state"] == "bus_sleep"
    assert nm["pdus"] == 21 and nm["nodes"] == [0x12] and nm["malformed"] == 0
    assert nm["wake_validations"] == {"validated": 1, "expired": 0}
    assert result["nm"]["transitions"][1]["nodes"] == [0x12]
    json.dumps(result)

    # The same state machine as the daemon's log replay (daemon/nm_frames.py), event for event.
    from cerebellumd.daemon.nm_frames import replay_nm_log

    daemon_view = replay_nm_log(log, config.nm)
    assert [(round(e.time - T0, 3), e.mode.value) for e in daemon_view.events] == _modes(result)

    # Without [nm] there is no "nm" key.
    assert "nm" not in replay(log, vehicle_dbc, parse_config(builtin_example()))


def test_nm_ignition_from_the_log_holds_normal_operation(tmp_path: Path, vehicle_dbc: Path) -> None:
    db = cantools.database.load_file(str(vehicle_dbc))
    log = _write(tmp_path / "kl15.log", _nm_drive(db, ignition_off_at=6.0))
    config = parse_config(builtin_example() + NM_TOML.replace("[nm]", "[nm]\nignition_signal = \"ignition\""))
    modes = _modes(replay(log, vehicle_dbc, config))
    # KL15 requests the network until the first frame after the 6.05 s BodyStatus said off.
    assert modes[:3] == [(0.0, "bus_sleep"), (0.0, "repeat_message"), (1.5, "normal_operation")]
    assert modes[3][1] == "ready_sleep" and 6.05 < modes[3][0] <= 6.1
    assert modes[4:] == [(12.0, "prepare_bus_sleep"), (14.0, "bus_sleep")]
    # Without the ignition signal the same log never reaches normal operation.
    plain = _modes(replay(log, vehicle_dbc, parse_config(builtin_example() + NM_TOML)))
    assert "normal_operation" not in {m for _, m in plain}
