"""`cerebellumd discover` on the corpus of real recordings (tests/data/corpus), the suggested
config through `check` and `replay`, `check` against the DBC, and the bad inputs."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import can
import cantools
import pytest

from cerebellumd.discover import DiscoverError, discover, suggest_config

CORPUS = Path(__file__).parent / "data" / "corpus"
RECORDINGS = sorted(p for p in CORPUS.iterdir() if (p / "drive.log").is_file())


def _dbc(rec: Path) -> Path:
    (dbc,) = rec.glob("*.dbc")
    return dbc


def _decoded(rec: Path, ref: str) -> list[tuple[float, float]]:
    """(time, value) of `Message.Signal` in the recording, decoded by cantools alone."""
    db = cantools.database.load_file(str(_dbc(rec)), strict=False)
    message_name, signal = ref.split(".")
    message = db.get_message_by_name(message_name)
    out = []
    for msg in can.LogReader(str(rec / "drive.log")):
        if msg.arbitration_id == message.frame_id and not msg.is_error_frame:
            try:
                values = message.decode(bytes(msg.data), decode_choices=False)
            except Exception:
                continue
            out.append((msg.timestamp, float(values[signal])))
    return out


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cerebellumd", *args], capture_output=True, text=True, timeout=90,
                          cwd=cwd)


def test_the_corpus_has_recordings_with_licence_and_provenance() -> None:
    assert len(RECORDINGS) >= 2
    for rec in RECORDINGS:
        assert (rec / "PROVENANCE.md").is_file() and list(rec.glob("LICENSE*")), rec
        assert (rec / "drive.log").stat().st_size < 5_000_000


@pytest.mark.parametrize("rec", RECORDINGS, ids=lambda p: p.name)
def test_discover_finds_the_speed_and_its_statistics_are_the_decoded_values(rec: Path) -> None:
    result = discover(rec / "drive.log", _dbc(rec))
    d = result.discovery
    best = d.best()
    speed = best["speed"].signal
    decoded = _decoded(rec, speed)
    values = [v for _, v in decoded]
    stats = d.signals[speed]
    assert (stats.count, stats.minimum, stats.maximum) == (len(values), min(values), max(values))
    assert stats.changes == sum(1 for a, b in itertools.pairwise(values) if a != b)
    # It behaves like the vehicle speed: the car moved, and the mean of the four wheel speeds
    # (decoded here, independently of discover) is within 10 % or 2 km/h of it.
    assert max(values) > 20
    wheels = [_decoded(rec, w.signal) for w in d.roles()["wheel_speed"][:4]]
    close = total = 0
    for t, v in decoded[:: max(1, len(decoded) // 200)]:
        near = [min(w, key=lambda tv: abs(tv[0] - t))[1] for w in wheels]
        mean = sum(near) / len(near)
        total += 1
        close += abs(v - mean) <= max(2.0, 0.1 * mean)
    assert close / total > 0.9
    # The rate and period come from the frames' timestamps.
    times = [t for t, _ in decoded]
    assert d.messages[speed.split(".")[0]].rate_hz == pytest.approx((len(times) - 1) / (times[-1] - times[0]))


@pytest.mark.parametrize("rec", RECORDINGS, ids=lambda p: p.name)
def test_discover_finds_the_gear_with_its_dbc_choices(rec: Path) -> None:
    d = discover(rec / "drive.log", _dbc(rec)).discovery
    gear = d.best()["gear"].signal
    stats = d.signals[gear]
    decoded = {v for _, v in _decoded(rec, gear)}
    assert stats.distinct == decoded
    labels = {v.upper() for v in stats.choices.values()}
    assert {"P", "R", "N", "D"} <= labels
    assert all(int(v) in stats.choices for v in decoded)  # every value the car sent is a named gear


@pytest.mark.parametrize("rec", RECORDINGS, ids=lambda p: p.name)
def test_no_ignition_is_invented_where_the_car_sends_none(rec: Path) -> None:
    """These Toyota powertrain buses carry no ignition/power-mode signal in their DBC."""
    d = discover(rec / "drive.log", _dbc(rec)).discovery
    db = cantools.database.load_file(str(_dbc(rec)), strict=False)
    names = [f"{m.name}.{s.name}" for m in db.messages for s in m.signals]
    assert not [n for n in names if re.search(r"IGNITION|KL15|POWER_MODE", n)]
    assert "ignition" not in d.roles()


def test_discover_finds_ignition_where_the_bus_sends_it(tmp_path: Path) -> None:
    dbc = tmp_path / "car.dbc"
    dbc.write_text(
        'VERSION ""\n\nBU_: ECU\n\n'
        'BO_ 256 BODY: 8 ECU\n SG_ IGNITION_STATE : 0|2@1+ (1,0) [0|3] "" ECU\n'
        ' SG_ DOOR_OPEN : 2|1@1+ (1,0) [0|1] "" ECU\n\n'
        'BO_ 257 DYN: 8 ECU\n SG_ VEHICLE_SPEED : 0|16@1+ (0.01,0) [0|300] "km/h" ECU\n\n'
        'VAL_ 256 IGNITION_STATE 0 "OFF" 1 "ACC" 2 "ON" 3 "START";\n')
    db = cantools.database.load_file(str(dbc))
    body, dyn = db.get_message_by_name("BODY"), db.get_message_by_name("DYN")
    log = tmp_path / "drive.log"
    with can.Logger(str(log)) as out:
        for k in range(300):
            ign = 0 if k < 50 else 2
            out.on_message_received(can.Message(timestamp=k * 0.1, arbitration_id=256, is_extended_id=False,
                                                data=body.encode({"IGNITION_STATE": ign, "DOOR_OPEN": 0})))
            out.on_message_received(can.Message(timestamp=k * 0.1 + 0.01, arbitration_id=257, is_extended_id=False,
                                                data=dyn.encode({"VEHICLE_SPEED": min(k, 120)})))
    d = discover(log, dbc).discovery
    assert d.best()["ignition"].signal == "BODY.IGNITION_STATE"
    assert d.best()["speed"].signal == "DYN.VEHICLE_SPEED"
    assert d.signals["BODY.IGNITION_STATE"].distinct == {0.0, 2.0}


def test_suggested_config_passes_check_and_replays(tmp_path: Path) -> None:
    rec = CORPUS / "toyota_rav4_2019_verifiedcan"
    dbc = _dbc(rec).resolve()
    toml = tmp_path / "car.toml"
    out = _cli("discover", str(rec / "drive.log"), "--dbc", str(dbc), "--suggest", str(toml), "--json")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["roles"]["speed"][0]["vss"] == "Vehicle.Speed"
    text = toml.read_text()
    assert 'can = "SPEED.SPEED"' in text and "dbc_strict = false" in text
    # max_age_ms is four periods of the message, measured
    period_ms = 1000 / next(m["rate_hz"] for m in body["messages"] if m["name"] == "SPEED")
    age = int(re.search(r'\[signals\.speed\]\ncan = "SPEED.SPEED"\nmax_age_ms = (\d+)', text).group(1))
    assert 4 * period_ms <= age < 4 * period_ms + 10
    check = _cli("check", str(toml))
    assert check.returncode == 0 and check.stdout.strip() == "OK", check.stderr
    # Uncomment the suggested demands, as a user would, and replay them.
    enabled = re.sub(r"^# ((\[\[demands\]\])|(name|when|class|confirm_ms|deadline_ms) = .*)$", r"\1", text,
                     flags=re.MULTILINE)
    (tmp_path / "edited.toml").write_text(enabled)
    assert _cli("check", str(tmp_path / "edited.toml")).returncode == 0
    png = tmp_path / "replay.png"
    rp = _cli("replay", str(rec / "drive.log"), "--dbc", str(dbc), "--config", str(tmp_path / "edited.toml"),
              "--plot", str(png))
    assert rp.returncode == 0, rp.stderr
    assert "configured signals (fed, min..max):" in rp.stdout and "wakes" in rp.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    js = json.loads(_cli("replay", str(rec / "drive.log"), "--dbc", str(dbc), "--config",
                         str(tmp_path / "edited.toml"), "--json").stdout)
    speed = [v for _, v in _decoded(rec, "SPEED.SPEED")]
    assert js["signal_feeds"]["speed"] == {"count": len(speed), "min": min(speed), "max": max(speed)}
    assert js["wakes"] == len(js["wake_times"]) >= 1


def test_suggest_for_the_other_recording_has_the_bus_signals_and_commented_demands(tmp_path: Path) -> None:
    rec = CORPUS / "toyota_rav4_2018_comma2k19"
    result = discover(rec / "drive.log", _dbc(rec))
    text = suggest_config(result, str(_dbc(rec)))
    assert "[[can]]" in text and "[signals.speed]" in text and "# [[demands]]" in text


@pytest.fixture
def car_config(tmp_path: Path) -> Path:
    rec = CORPUS / "toyota_rav4_2019_verifiedcan"
    path = tmp_path / "car.toml"
    path.write_text(f"""[[can]]
name = "vehicle"
interface = "virtual"
channel = "cerebellumd-test-dbc-check"
dbc = "{_dbc(rec).resolve()}"
dbc_strict = false

[signals.speed]
can = "SPEED.SPEED"
max_age_ms = 200

[signals.gear]
can = "GEAR_PACKET.GEAR"
max_age_ms = 5000

[[demands]]
name = "reversing"
when = "gear == 16"
class = "normal"
deadline_ms = 1500
""")
    return path


def test_check_fails_on_a_typo_in_a_signal_name_with_did_you_mean(car_config: Path) -> None:
    car_config.write_text(car_config.read_text().replace('"SPEED.SPEED"', '"SPEED.SPED"'))
    out = _cli("check", str(car_config))
    assert out.returncode == 1
    assert f"{car_config}:9: signals.speed.can: message 'SPEED' has no signal 'SPED'; did you mean 'SPEED'?" \
        in out.stderr
    assert "Traceback" not in out.stderr


def test_check_fails_on_a_typo_in_a_message_name_with_did_you_mean(car_config: Path) -> None:
    car_config.write_text(car_config.read_text().replace('"GEAR_PACKET.GEAR"', '"GEAR_PACKT.GEAR"'))
    out = _cli("check", str(car_config))
    assert out.returncode == 1
    assert f"{car_config}:13: signals.gear.can: no message 'GEAR_PACKT' in the DBC of bus 'vehicle'; " \
           "did you mean 'GEAR_PACKET'" in out.stderr


def test_check_warns_on_a_value_that_is_none_of_the_choices_or_out_of_range(car_config: Path) -> None:
    text = car_config.read_text().replace('when = "gear == 16"', 'when = "gear == 3 or speed > 400"')
    car_config.write_text(text)
    out = _cli("check", str(car_config))
    assert out.returncode == 0 and out.stdout.strip() == "OK"
    assert f"{car_config}:18: demands[0].when: gear is compared with 3, none of GEAR_PACKET.GEAR's DBC choices" \
        in out.stderr and "(warning)" in out.stderr
    assert "speed is compared with 400, outside SPEED.SPEED's DBC range" in out.stderr


def test_check_passes_a_config_that_resolves(car_config: Path) -> None:
    out = _cli("check", str(car_config))
    assert (out.returncode, out.stdout.strip(), out.stderr) == (0, "OK", "")


def test_run_refuses_an_unresolvable_signal(car_config: Path) -> None:
    car_config.write_text(car_config.read_text().replace('"SPEED.SPEED"', '"SPEED.SPED"'))
    out = _cli("run", "--config", str(car_config))
    assert out.returncode == 1
    assert "did you mean 'SPEED'?" in out.stderr and "refusing to start" in out.stderr


def test_replay_refuses_an_unresolvable_signal_and_names_the_never_fed(car_config: Path, tmp_path: Path) -> None:
    rec = CORPUS / "toyota_rav4_2019_verifiedcan"
    bad = tmp_path / "bad.toml"
    bad.write_text(car_config.read_text().replace('"SPEED.SPEED"', '"SPEED.SPED"'))
    out = _cli("replay", str(rec / "drive.log"), "--dbc", str(_dbc(rec)), "--config", str(bad))
    assert out.returncode == 1 and "did you mean 'SPEED'?" in out.stderr
    # DSU_SPEED is in the DBC but this TSS2 car (no DSU) never sends it.
    assert not _decoded(rec, "DSU_SPEED.FORWARD_SPEED")
    unfed = tmp_path / "unfed.toml"
    unfed.write_text(car_config.read_text() + '\n[signals.dsu_speed]\ncan = "DSU_SPEED.FORWARD_SPEED"\n')
    out = _cli("replay", str(rec / "drive.log"), "--dbc", str(_dbc(rec)), "--config", str(unfed))
    assert out.returncode == 0, out.stderr
    assert "warning: never fed during this log: dsu_speed" in out.stdout
    js = json.loads(_cli("replay", str(rec / "drive.log"), "--dbc", str(_dbc(rec)), "--config", str(unfed),
                         "--json").stdout)
    assert js["never_fed"] == ["dsu_speed"] and "fed_signals" in js


# -- bad input -------------------------------------------------------------------------------------


def test_a_recording_with_no_frame_of_the_dbc_gets_a_clear_message(tmp_path: Path) -> None:
    log = tmp_path / "other.log"
    log.write_text("".join(f"({i * 0.01:.6f}) can0 7E8#0102030405060708\n" for i in range(50)))
    rec = CORPUS / "toyota_rav4_2019_verifiedcan"
    out = _cli("discover", str(log), "--dbc", str(_dbc(rec)))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "none of its 50 frames is a message of" in out.stderr and "0x7E8" in out.stderr


def test_a_dbc_that_loads_only_non_strict_is_named_with_the_reason() -> None:
    rec = CORPUS / "toyota_rav4_2019_verifiedcan"
    out = _cli("discover", str(rec / "drive.log"), "--dbc", str(_dbc(rec)), "--top", "3")
    assert out.returncode == 0, out.stderr
    assert "loads only non-strict" in out.stdout
    assert "overlapping in message PCS_HUD" in re.sub(r"\s+", " ", out.stdout)
    js = json.loads(_cli("discover", str(rec / "drive.log"), "--dbc", str(_dbc(rec)), "--json").stdout)
    assert js["dbc_strict"] is False and "PCS_HUD" in js["dbc_strict_error"]


@pytest.mark.parametrize("content,name", [(b"whatever", "drive.xyz"), (b"garbage\n(1.0) can0 12#zz\n", "bad.log")])
def test_an_unreadable_log_names_the_formats_python_can_reads(tmp_path: Path, content: bytes, name: str) -> None:
    log = tmp_path / name
    log.write_bytes(content)
    rec = CORPUS / "toyota_rav4_2019_verifiedcan"
    out = _cli("discover", str(log), "--dbc", str(_dbc(rec)))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    if name.endswith(".xyz"):
        assert all(s in out.stderr for s in (".asc", ".blf", ".log", ".trc")), out.stderr
    else:
        assert "not a readable .log recording" in out.stderr


def test_discover_errors_are_values_not_crashes(tmp_path: Path) -> None:
    with pytest.raises(DiscoverError, match="no such file"):
        discover(tmp_path / "missing.log", _dbc(CORPUS / "toyota_rav4_2019_verifiedcan"))
    with pytest.raises(DiscoverError, match="cannot read the DBC"):
        discover(CORPUS / "toyota_rav4_2019_verifiedcan" / "drive.log", tmp_path / "missing.dbc")
