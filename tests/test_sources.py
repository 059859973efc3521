"""daemon/sources: SOME/IP over real UDP, the companion MCU over a real pty (McuEmulator), hwmon
power from a sysfs-like tree, two CAN buses at once; and the config checks that go with them."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import shutil
import socket
import tempfile
from pathlib import Path

import can
import cantools
import pytest

from cerebellumd.config import ConfigError, parse_config
from cerebellumd.daemon.assembly import StartError
from cerebellumd.daemon.runtime import Daemon
from cerebellumd.daemon.sources import McuSource, SomeIpSource
from cerebellumd.drivers.accel_mcu import McuAccelerator
from cerebellumd.drivers.mcu_emulator import McuEmulator
from cerebellumd.drivers.mcu_protocol import PowerDownAllowed, Reason, WakeRequest
from cerebellumd.drivers.someip import build_notification

from .helpers import until

BASE = """
[daemon]
initial_state = "idle"
[prometheus]
enabled = false
[policy]
release_ms = 300
min_dwell_ms = 0
"""




def metric(daemon: Daemon, name: str, **labels: str) -> float:
    value = daemon.metrics.registry.get_sample_value(name, labels)
    return -1.0 if value is None else value


SOMEIP = """
[[someip]]
name = "adas"
host = "127.0.0.1"
port = 0
[[someip.fields]]
notification = "adas"
service_id = 0x1234
event_id = 0x8001
field = "obstacle_m"
offset = 0
type = "u16"
scale = 0.01

[signals.obstacle]
someip = "adas.obstacle_m"
max_age_ms = 300

[[demands]]
name = "obstacle"
when = "obstacle < 10"
class = "normal"
"""


async def test_someip_fields_become_signals_and_bad_datagrams_are_counted() -> None:
    daemon = await Daemon.async_create(await asyncio.to_thread(parse_config, BASE + SOMEIP))
    await daemon.async_start()
    try:
        source = next(s for s in daemon.parts if isinstance(s, SomeIpSource))
        address = source.receiver.local_address
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(build_notification(0x1234, 0x8001, (550).to_bytes(2, "big")), address)
            await until(lambda: "obstacle" in daemon.samples, what="the SOME/IP sample")
            assert daemon.samples["obstacle"].value == pytest.approx(5.5)
            await until(lambda: daemon.wakes == 1, what="a wake for the obstacle demand")
            sock.sendto(b"\x00\x01", address)  # shorter than a header
            sock.sendto(build_notification(0x9999, 0x8001, b"\x00\x00"), address)  # not configured
            await until(lambda: metric(daemon, "cerebellumd_someip_errors_total", endpoint="adas", kind="short") == 1)
            await until(lambda: metric(daemon, "cerebellumd_someip_errors_total", endpoint="adas",
                                       kind="unknown_message") == 1)
            assert metric(daemon, "cerebellumd_someip_messages_total", endpoint="adas") == 1
        # No more notifications: the signal goes stale by its own max_age.
        await until(lambda: metric(daemon, "cerebellumd_signal_stale", signal="obstacle") == 1, what="staleness")
    finally:
        await daemon.async_stop()


async def test_a_someip_address_not_there_yet_is_bound_later_and_a_taken_port_fails_the_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint's address or interface comes up after the daemon (a vehicle-network VLAN
    configured late): the start goes on, the failed binds are counted, and the endpoint binds
    and feeds its signal once the address is there. The kernel's answer is replaced only for the
    first two binds (EADDRNOTAVAIL, as for an address no interface has yet). A port another
    socket holds still fails the start."""
    from cerebellumd.drivers.someip import SomeIpReceiver

    real = SomeIpReceiver._make_socket
    binds: list[int] = []

    def make_socket(self: SomeIpReceiver) -> socket.socket:
        binds.append(1)
        if len(binds) <= 2:
            raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
        return real(self)

    monkeypatch.setattr(SomeIpReceiver, "_make_socket", make_socket)
    daemon = await Daemon.async_create(await asyncio.to_thread(parse_config, BASE + SOMEIP))
    await daemon.async_start()
    try:
        source = next(s for s in daemon.parts if isinstance(s, SomeIpSource))
        assert not source.bound and metric(daemon, "cerebellumd_someip_errors_total", endpoint="adas",
                                           kind="bind_failures") == 1
        decisions = daemon.decisions
        await until(lambda: source.bound, what="the endpoint bound once its address is there")
        assert daemon.decisions > decisions  # the daemon decided while the endpoint waited
        assert metric(daemon, "cerebellumd_someip_errors_total", endpoint="adas", kind="bind_failures") == 2
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(build_notification(0x1234, 0x8001, (550).to_bytes(2, "big")), source.receiver.local_address)
            await until(lambda: "obstacle" in daemon.samples, what="the SOME/IP sample")
    finally:
        await daemon.async_stop()
    monkeypatch.setattr(SomeIpReceiver, "_make_socket", real)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = BASE + SOMEIP.replace("port = 0", f"port = {taken.getsockname()[1]}")
        daemon = await Daemon.async_create(await asyncio.to_thread(parse_config, busy))
        with pytest.raises(StartError, match=r"SOME/IP endpoints: .*Address already in use"):
            await daemon.async_start()


MCU = """
[accelerator]
driver = "{driver}"
[mcu]
port = "{port}"
heartbeat_timeout_ms = 500
reconnect_max_ms = 200
[signals.battery_v]
mcu = "battery_v"
max_age_ms = 600
[signals.mcu_wake_request]
mcu = "wake_request"
max_age_ms = 600
[[demands]]
name = "mcu_wake"
when = "mcu_wake_request == 1"
class = "normal"
[[power.domains]]
name = "accelerator"
source = "mcu"
interval_ms = 100
"""


@pytest.mark.parametrize("driver", ["simulated", "mcu"])
async def test_mcu_readings_and_requests_feed_signals_and_silence_makes_them_stale(
        tmp_path: Path, driver: str) -> None:
    emulator = McuEmulator(heartbeat_interval_s=0.05, readings_interval_s=0.1, link_path=tmp_path / "mcu")
    await emulator.async_open()
    emulator.start()
    text = BASE + MCU.format(driver=driver, port=tmp_path / "mcu")
    daemon = await Daemon.async_create(await asyncio.to_thread(parse_config, text))
    await daemon.async_start()
    try:
        source = next(s for s in daemon.parts if isinstance(s, McuSource))
        if driver == "mcu":
            # One port, one link: the driver's link is the one the signals come from.
            assert isinstance(daemon.driver, McuAccelerator)
            assert daemon.driver.link is source.link
        await until(lambda: "battery_v" in daemon.samples and "mcu_wake_request" in daemon.samples,
                    what="MCU readings and heartbeats")
        assert daemon.samples["battery_v"].value == pytest.approx(12.6)
        assert daemon.samples["mcu_wake_request"].value == 0.0  # from the heartbeat
        seq = emulator.send_wake_request(5)
        await until(lambda: daemon.wakes == 1, what="a wake for the MCU's request")
        frames = metric(daemon, "cerebellumd_mcu_frames_total", direction="rx")
        emulator.resend(WakeRequest(5), seq)  # a retry (same seq): the same request, counted once
        await until(lambda: metric(daemon, "cerebellumd_mcu_frames_total", direction="rx") > frames,
                    what="the repeated frame received")
        assert metric(daemon, "cerebellumd_wakes_total", reason="demand:mcu_wake") == 1
        emulator.send_sleep_request(0)
        await until(lambda: daemon.sleeps == 1, what="a step-down after the MCU's sleep request")
        assert metric(daemon, "cerebellumd_mcu_requests_total", kind="wake") == 1
        assert metric(daemon, "cerebellumd_mcu_requests_total", kind="sleep") == 1
        assert metric(daemon, "cerebellumd_mcu_frames_total", direction="rx") > 5
        assert metric(daemon, "cerebellumd_mcu_connects_total") == 1
        if driver == "mcu":
            # The rail followed the policy through the same link, and its power was measured.
            await until(lambda: daemon.ledger.reading("accelerator") == 0.0, what="rail off measured")
            assert metric(daemon, "cerebellumd_mcu_frames_total", direction="tx") >= 2
        assert metric(daemon, "cerebellumd_signal_stale", signal="battery_v") == 0
        emulator.misbehave.silent = True
        await until(lambda: metric(daemon, "cerebellumd_signal_stale", signal="battery_v") == 1, what="staleness")
        await until(lambda: metric(daemon, "cerebellumd_mcu_link_up") == 0, what="link down")
        assert metric(daemon, "cerebellumd_mcu_errors_total", kind="stale") == 1
    finally:
        await daemon.async_stop()
        await emulator.stop()


@pytest.fixture
def fake_hwmon(tmp_path: Path) -> Path:
    device = tmp_path / "hwmon" / "hwmon3"
    device.mkdir(parents=True)
    (device / "name").write_text("ina219\n")
    (device / "power1_input").write_text("2500000\n")  # µW
    return tmp_path / "hwmon"


async def test_hwmon_domain_is_read_into_its_power_source(fake_hwmon: Path) -> None:
    text = BASE + f"""
[[power.domains]]
name = "npu"
source = "hwmon"
interval_ms = 50
options = {{ name = "ina219", root = "{fake_hwmon}" }}
"""
    daemon = await Daemon.async_create(await asyncio.to_thread(parse_config, text))
    await daemon.async_start()
    try:
        await until(lambda: daemon.ledger.reading("npu") == pytest.approx(2.5), what="a hwmon reading")
        await until(lambda: daemon.watts["npu"] == pytest.approx(2.5), what="the daemon's integration")
        assert metric(daemon, "cerebellumd_sensor_reads_total", domain="npu") >= 1
        await asyncio.to_thread((fake_hwmon / "hwmon3" / "power1_input").write_text, "garbage\n")
        await until(lambda: metric(daemon, "cerebellumd_sensor_errors_total", domain="npu", kind="garbage") >= 1)
    finally:
        await daemon.async_stop()


async def test_two_buses_at_once_virtual_and_udp_multicast() -> None:
    port = random.randint(20000, 60000)
    channel = f"two-buses-{port}"
    text = BASE + f"""
[[can]]
name = "chassis"
interface = "virtual"
channel = "{channel}"
[[can]]
name = "adas"
interface = "udp_multicast"
channel = "239.74.163.2"
options = {{ port = {port} }}
[signals.speed]
can = "VehicleDynamics.VehicleSpeed"
bus = "chassis"
[signals.risk]
can = "AdasStatus.CollisionRisk"
bus = "adas"
"""
    from importlib import resources

    db = cantools.database.load_string(
        resources.files("cerebellumd").joinpath("data", "vehicle.dbc").read_text("utf-8"), database_format="dbc")
    dyn, adas = db.get_message_by_name("VehicleDynamics"), db.get_message_by_name("AdasStatus")
    daemon = await Daemon.async_create(await asyncio.to_thread(parse_config, text))
    await daemon.async_start()
    chassis = await asyncio.to_thread(can.Bus, interface="virtual", channel=channel)
    udp = await asyncio.to_thread(can.Bus, interface="udp_multicast", channel="239.74.163.2", port=port)
    try:
        for _ in range(5):
            chassis.send(can.Message(arbitration_id=dyn.frame_id, is_extended_id=False,
                                     data=dyn.encode({"VehicleSpeed": 42, "LongAccel": 0, "Gear": 3, "DynCounter": 0})))
            udp.send(can.Message(arbitration_id=adas.frame_id, is_extended_id=False,
                                 data=adas.encode({s.name: 0 for s in adas.signals} | {"CollisionRisk": 1})))
        await until(lambda: "speed" in daemon.samples and "risk" in daemon.samples, what="both buses")
        assert daemon.samples["speed"].value == pytest.approx(42)
        assert daemon.samples["risk"].value == 1
        await until(lambda: metric(daemon, "cerebellumd_can_frames_total", bus="chassis") == 5
                    and metric(daemon, "cerebellumd_can_frames_total", bus="adas") == 5, what="5 frames per bus")
    finally:
        await asyncio.to_thread(chassis.shutdown)
        await asyncio.to_thread(udp.shutdown)
        await daemon.async_stop()


@pytest.mark.parametrize(("extra", "key", "message"), [
    ('[signals.x]\nsomeip = "adas.nope"\n', "signals.x.someip", "no [[someip]] field 'adas.nope'"),
    ('[signals.x]\nmcu = "battery_v"\n', "signals.x.mcu", "no [mcu] section"),
    ('[mcu]\nport = "/dev/null"\n[signals.x]\nmcu = "volts"\n', "signals.x.mcu", "unknown MCU reading 'volts'"),
    ('[[power.domains]]\nname = "a"\nsource = "mcu"\n', "power.domains[0].source", "needs an [mcu] section"),
    ('[[power.domains]]\nname = "a"\nsource = "hwmon"\n', "power.domains[0].options", "name"),
    ('[accelerator]\ndriver = "mcu"\noptions = { link = { port = "/dev/ttyA" } }\n[mcu]\nport = "/dev/ttyB"\n',
     "accelerator.options.link.port", "one serial port has one link"),
])
def test_config_checks_that_sources_name_what_is_configured(extra: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + extra)
    assert any(i.key == key and message in i.message for i in info.value.issues), info.value.issues


def test_mcu_driver_takes_its_link_from_the_mcu_section() -> None:
    config = parse_config(BASE + '[accelerator]\ndriver = "mcu"\n[mcu]\nport = "/dev/ttyX"\nbaudrate = 9600\n')
    link = config.accelerator.options["link"]
    assert link == {"port": "/dev/ttyX", "baudrate": 9600}


async def test_the_mcu_source_is_the_power_down_link_and_carries_lease_wake_requests(tmp_path: Path) -> None:
    emulator = McuEmulator(heartbeat_interval_s=0.05, readings_interval_s=0.1, link_path=tmp_path / "mcu")
    await emulator.async_open()
    emulator.start()
    sock_dir = Path(tempfile.mkdtemp(prefix="cbl-", dir="/tmp"))  # Unix socket paths are short
    mcu = MCU.format(driver="simulated", port=tmp_path / "mcu").replace(
        "reconnect_max_ms = 200\n", "reconnect_max_ms = 200\nack_timeout_ms = 150\npower_down_after_s = 20\n", 1)
    text = BASE + mcu + f'[leases]\nenabled = true\npath = "{sock_dir / "l.sock"}"\n'
    daemon = await Daemon.async_create(await asyncio.to_thread(parse_config, text))
    await daemon.async_start()
    try:
        link = daemon.assembly.power_down_link
        assert link is not None
        await until(lambda: metric(daemon, "cerebellumd_mcu_link_up") == 1, what="the link up")
        # The budget part's call (not on this branch): acknowledged, with the configured delay.
        result = await link.async_allow_power_down(Reason.ENERGY_BUDGET)
        assert result.acked and result.frames == 1
        assert emulator.power_down == PowerDownAllowed(True, 20, Reason.ENERGY_BUDGET)
        assert (await link.async_revoke_power_down()).acked and emulator.power_down.allow is False
        # Garage work asks for a wake over the lease socket; the MCU gets it in seconds.
        reader, writer = await asyncio.open_unix_connection(str(sock_dir / "l.sock"))
        writer.write(json.dumps({"op": "wake_at", "app": "model_update", "in_s": 3600}).encode() + b"\n")
        reply = json.loads(await reader.readline())
        assert reply["ok"] and reply["earliest_in_s"] == 3600
        assert emulator.next_wake is not None and emulator.next_wake.reason == Reason.TIMER
        assert 3599 <= emulator.next_wake.wake_in_s <= 3601
        # An MCU that never answers: the caller is told (acked False) and it is counted.
        emulator.misbehave.legacy_firmware = True
        result = await link.async_allow_power_down(Reason.PARKED_TIME, after_s=5)
        assert not result.acked and "did not acknowledge" in result.detail
        writer.write(json.dumps({"op": "wake_at", "app": "log_upload", "in_s": 60}).encode() + b"\n")
        reply = json.loads(await reader.readline())
        assert reply["error"] == "wake_failed"
        writer.close()
        await writer.wait_closed()
        for command, result_label, n in (("power_down", "acked", 1), ("revoke", "acked", 1),
                                         ("next_wake", "acked", 1), ("power_down", "failed", 1),
                                         ("next_wake", "failed", 1)):
            assert metric(daemon, "cerebellumd_mcu_commands_total", command=command, result=result_label) == n
        assert metric(daemon, "cerebellumd_mcu_errors_total", kind="command_repeats") == 4  # 2 x (3 frames - 1)
    finally:
        await daemon.async_stop()
        await emulator.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
