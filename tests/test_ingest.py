"""CAN ingest over real python-can virtual buses: decoding, bad frames counted, bounded queue,
silence, reconnect, and the fast path that wakes before the next tick."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import can
import pytest

from cerebellumd.accel import AccelState
from cerebellumd.config import CanBusConfig, builtin_example, parse_config
from cerebellumd.daemon.clock import Clock
from cerebellumd.daemon.ingest import CanIngest
from cerebellumd.daemon.metrics import Metrics
from cerebellumd.daemon.runtime import Daemon
from cerebellumd.drivers.accel_simulated import SimulatedAccelerator
from cerebellumd.drivers.dbc import load_dbc
from cerebellumd.profiles import load_profile

from .helpers import FailingBus, free_port, until

_channels = itertools.count()
DB = load_dbc("builtin:vehicle.dbc")
DEMO_TEXT = builtin_example()


def channel() -> str:
    return f"test-ingest-{next(_channels)}"




def make_ingest(ch: str, sink, **cfg: object) -> tuple[CanIngest, Metrics]:
    metrics = Metrics(buses=["vehicle"])
    config = CanBusConfig(name="vehicle", interface="virtual", channel=ch, **cfg)  # type: ignore[arg-type]
    db = DB
    wanted = {("VehicleDynamics", "VehicleSpeed"): "speed_kmh", ("AdasStatus", "CollisionRisk"): "collision_risk"}
    return CanIngest(config, db, wanted, sink, metrics), metrics


def frame(name: str, **values: float) -> can.Message:
    msg = DB.get_message_by_name(name)
    full = {s.name: 0 for s in msg.signals}
    full.update(values)
    return can.Message(arbitration_id=msg.frame_id, data=msg.encode(full), is_extended_id=False)


async def test_decodes_and_counts_bad_frames() -> None:
    ch = channel()
    got: list[tuple[str, float]] = []
    ingest, metrics = make_ingest(ch, lambda samples, t: got.extend(samples))
    await ingest.async_start()
    sender = can.Bus(interface="virtual", channel=ch)
    try:
        sender.send(frame("VehicleDynamics", VehicleSpeed=42.5))
        sender.send(can.Message(arbitration_id=0x7AB, data=b"\x01\x02", is_extended_id=False))  # unknown id
        sender.send(can.Message(arbitration_id=0x101, data=b"\x01", is_extended_id=False))  # known id, too short
        sender.send(can.Message(is_error_frame=True, arbitration_id=0x20000080, is_extended_id=True))
        await until(lambda: ingest.frames >= 4)
    finally:
        sender.shutdown()
        await ingest.async_stop()
    assert got == [("speed_kmh", pytest.approx(42.5))]
    assert ingest.errors == {"unknown_id": 1, "decode": 1, "error_frame": 1}
    value = metrics.registry.get_sample_value(
        "cerebellumd_can_errors_total", {"bus": "vehicle", "kind": "decode"})
    assert value == 1.0
    assert metrics.registry.get_sample_value("cerebellumd_can_frames_total", {"bus": "vehicle"}) == 4.0


def test_bounded_queue_counts_drops() -> None:
    """The reader thread never holds more than queue_size frames; the rest are counted."""
    ch = channel()
    ingest, _ = make_ingest(ch, lambda samples, t: None, queue_size=5)
    # A loop that never runs: nothing drains, so the bound alone must hold the queue.
    idle_loop = asyncio.new_event_loop()
    ingest._loop = idle_loop
    bus = can.Bus(interface="virtual", channel=ch)
    sender = can.Bus(interface="virtual", channel=ch)
    for _ in range(20):
        sender.send(frame("VehicleDynamics", VehicleSpeed=1))
    sender.shutdown()

    class DrainOnce:
        def recv(self, timeout: float) -> can.Message | None:
            msg = bus.recv(0)
            if msg is None:
                ingest._stop.set()
            return msg

    try:
        ingest._read_forever(DrainOnce())  # type: ignore[arg-type]
    finally:
        bus.shutdown()
        idle_loop.close()
    assert len(ingest._queue) == 5
    assert ingest.dropped == 15


async def test_silent_bus_is_flagged_and_counted_once() -> None:
    ch = channel()
    ingest, _metrics = make_ingest(ch, lambda s, t: None, silence_timeout_ms=50)
    await ingest.async_start()
    try:
        await until(lambda: ingest.silent)
        assert ingest.errors["silent"] == 1
        sender = can.Bus(interface="virtual", channel=ch)
        sender.send(frame("VehicleDynamics", VehicleSpeed=3))
        await until(lambda: not ingest.silent)
        sender.shutdown()
    finally:
        await ingest.async_stop()


def virtual_speed_ingest(ch: str, factory: Callable[..., can.BusABC], **bus: Any
                         ) -> tuple[CanIngest, Metrics, list[tuple[str, float]]]:
    """A virtual-bus ingest of the vehicle speed whose bus `factory` opens, reopened after 10 ms
    (`bus`: other `CanBusConfig` fields, or these overridden); the samples it hands on go to the
    returned list."""
    config = CanBusConfig(**{"name": "vehicle", "interface": "virtual", "channel": ch, "reconnect_backoff_ms": 10,
                             **bus})
    metrics = Metrics(buses=["vehicle"])
    got: list[tuple[str, float]] = []
    ingest = CanIngest(config, DB, {("VehicleDynamics", "VehicleSpeed"): "speed_kmh"},
                       lambda s, t: got.extend(s), metrics, bus_factory=factory)
    return ingest, metrics, got


async def speed_arrives(ch: str, got: list[tuple[str, float]], kmh: float) -> None:
    """Send one VehicleSpeed frame on the virtual channel and wait until the ingest handed it on."""
    sender = can.Bus(interface="virtual", channel=ch)
    try:
        sender.send(frame("VehicleDynamics", VehicleSpeed=kmh))
        await until(lambda: bool(got), what="the speed handed on")
    finally:
        sender.shutdown()


async def test_failed_bus_is_recreated_with_backoff() -> None:
    ch = channel()
    created: list[can.BusABC] = []
    failures = {"left": 1}

    def failing() -> bool:
        failures["left"] -= 1
        return failures["left"] >= 0

    def factory(**kwargs: object) -> can.BusABC:
        bus = FailingBus(ch, failing)
        created.append(bus)
        return bus

    ingest, _metrics, got = virtual_speed_ingest(ch, factory)
    await ingest.async_start()
    try:
        await until(lambda: ingest.errors["reconnect"] >= 1 and ingest.connected and len(created) == 2)
        await speed_arrives(ch, got, 7)
    finally:
        await ingest.async_stop()
    assert ingest.errors["bus_error"] == 1
    assert got[0][1] == pytest.approx(7)


async def test_a_bus_that_cannot_be_opened_at_start_is_opened_later_and_the_start_goes_on() -> None:
    """An adapter that enumerates after the daemon started: the start does not fail, the failed
    open is counted once, the supervisor retries with the counted backoff and decodes once the
    bus opens. A backend python-can cannot load is still an error at start."""
    ch = channel()
    attempts: list[str] = []

    def factory(**kwargs: object) -> can.BusABC:
        attempts.append(str(kwargs["channel"]))
        if len(attempts) <= 3:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        return can.Bus(**kwargs)  # type: ignore[arg-type]

    ingest, metrics, got = virtual_speed_ingest(ch, factory)
    await ingest.async_start()
    try:
        assert not ingest.connected and ingest.errors == {"bus_error": 1}
        assert metrics.registry.get_sample_value("cerebellumd_can_connected", {"bus": "vehicle"}) == 0.0
        await until(lambda: ingest.connected, what="the bus opened by the supervisor")
        assert metrics.registry.get_sample_value("cerebellumd_can_connected", {"bus": "vehicle"}) == 1.0
        await speed_arrives(ch, got, 9)
    finally:
        await ingest.async_stop()
    assert attempts == [ch] * 4
    assert ingest.errors["bus_error"] == 1 and ingest.errors["reconnect"] == 3
    labels = {"bus": "vehicle", "kind": "reconnect"}
    assert metrics.registry.get_sample_value("cerebellumd_can_errors_total", labels) == 3.0
    assert got == [("speed_kmh", 9.0)]

    def unloadable(**kwargs: object) -> can.BusABC:
        raise can.CanInterfaceNotImplementedError("no backend")

    broken, _, _ = virtual_speed_ingest(ch, unloadable)
    with pytest.raises(can.CanInterfaceNotImplementedError):
        await broken.async_start()


async def test_a_bus_that_stays_unopenable_goes_silent_while_it_is_retried() -> None:
    """The silence watch does not stop while the supervisor retries an open: an adapter missing
    for longer than the silence timeout is flagged silent (counted once) between its attempts,
    and the first frame after it opens clears the flag."""
    ch = channel()
    plugged = {"in": False}
    attempts: list[float] = []

    def factory(**kwargs: object) -> can.BusABC:
        attempts.append(time.monotonic())
        if not plugged["in"]:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        return can.Bus(**kwargs)  # type: ignore[arg-type]

    ingest, _metrics, got = virtual_speed_ingest(ch, factory, reconnect_backoff_ms=50, silence_timeout_ms=200)
    await ingest.async_start()
    try:
        await until(lambda: ingest.silent, what="the unopenable bus flagged silent")
        retries_when_silent = ingest.errors["reconnect"]
        await until(lambda: ingest.errors["reconnect"] > retries_when_silent + 1, what="retries after the flag")
        assert ingest.errors["silent"] == 1 and not ingest.connected
        plugged["in"] = True
        await until(lambda: ingest.connected, what="the bus opened")
        await speed_arrives(ch, got, 4)
        await until(lambda: not ingest.silent, what="the flag cleared by a frame")
    finally:
        await ingest.async_stop()
    assert ingest.errors["silent"] == 1
    assert len(attempts) == ingest.errors["reconnect"] + 1  # the start's open, then one per counted retry


def test_kernel_filters_cover_exactly_the_wanted_ids() -> None:
    ingest, _ = make_ingest(channel(), lambda s, t: None)
    ids = sorted(f["can_id"] for f in ingest.can_filters)
    assert ids == [0x101, 0x120]
    assert all(f["can_mask"] == 0x7FF for f in ingest.can_filters)


async def test_fast_path_wakes_before_the_next_tick() -> None:
    """With a 60 s decision period, only the fast path can wake the accelerator in time."""
    text = DEMO_TEXT.replace("tick_ms = 10", "tick_ms = 60000")
    ch = channel()
    text = text.replace('channel = "cerebellumd-demo"', f'channel = "{ch}"').replace("port = 9108", "port = 0")
    config = await asyncio.to_thread(parse_config, text)
    config = config.model_copy(update={"prometheus": config.prometheus.model_copy(update={"enabled": False})})
    model = await asyncio.to_thread(load_profile, "orin_nano")
    driver = SimulatedAccelerator(model, initial=AccelState.SLEEP, time_scale=100.0)
    daemon = await Daemon.async_create(config, clock=Clock(), driver=driver, model=model)
    await daemon.async_start()
    sender = can.Bus(interface="virtual", channel=ch)
    try:
        ticks_before = daemon._tickers[0]._index if hasattr(daemon._tickers[0], "_index") else None
        decisions_before = daemon.decisions
        sender.send(frame("AdasStatus", CollisionRisk=1))
        await until(lambda: AccelState.ACTIVE in driver.commands)
        assert daemon.wakes == 1
        assert daemon.decisions == decisions_before + 1  # one fast-path decision, no tick
        if ticks_before is not None:
            assert daemon._tickers[0]._index == ticks_before
        await until(lambda: driver._state is AccelState.ACTIVE)
    finally:
        sender.shutdown()
        await daemon.async_stop()


# -- buses with a file descriptor: read on the loop ------------------------------------------

GROUP = "239.74.163.9"  # not python-can's default group: a demo running next to the tests stays out


def udp_ingest(port: int, db, wanted, sink, **cfg: object) -> tuple[CanIngest, Metrics]:
    metrics = Metrics(buses=["vehicle"])
    fd = bool(cfg.pop("fd", False))
    config = CanBusConfig(name="vehicle", interface="udp_multicast", channel=GROUP,  # type: ignore[arg-type]
                          options={"port": port, "fd": fd}, filters=False, **cfg)
    return CanIngest(config, db, wanted, sink, metrics), metrics


def udp_sender(port: int, fd: bool = False) -> can.BusABC:
    return can.Bus(interface="udp_multicast", channel=GROUP, port=port, fd=fd)


def as_today(message, wanted: dict[tuple[str, str], str], data: bytes) -> list[tuple[str, float]] | None:
    """What the ingest handed on before compiled extractors: cantools decode (choices off), the
    wanted signals present, DBC range checked. None = a decode error."""
    try:
        values = message.decode(data, decode_choices=False)
    except Exception:
        return None
    out = []
    for (msg_name, signal), ours in wanted.items():
        if msg_name != message.name or signal not in values:
            continue
        sig = message.get_signal_by_name(signal)
        lo = -float("inf") if sig.minimum is None else sig.minimum
        hi = float("inf") if sig.maximum is None else sig.maximum
        if lo <= values[signal] <= hi:
            out.append((ours, float(values[signal])))
    return sorted(out)


async def test_udp_multicast_is_read_on_the_loop_and_decodes() -> None:
    port = free_port(socket.SOCK_DGRAM)
    got: list[tuple[str, float]] = []
    ingest, _ = udp_ingest(port, DB, {("VehicleDynamics", "VehicleSpeed"): "speed_kmh"},
                           lambda samples, t: got.extend(samples))
    await ingest.async_start()
    sender = udp_sender(port)
    try:
        assert ingest.reads_on_loop and ingest._thread is None
        for speed in (10.0, 20.5, 30.25):
            sender.send(frame("VehicleDynamics", VehicleSpeed=speed))
        sender.send(can.Message(arbitration_id=0x7AB, data=b"\x01", is_extended_id=False))
        await until(lambda: ingest.frames >= 4)
    finally:
        sender.shutdown()
        await ingest.async_stop()
    assert got == [("speed_kmh", 10.0), ("speed_kmh", 20.5), ("speed_kmh", 30.25)]
    assert ingest.errors == {"unknown_id": 1}


def opendbc_db(name: str, strict: bool = True):
    opendbc = pytest.importorskip("opendbc", reason="opendbc (real-vehicle DBCs) is not installed")
    path = Path(opendbc.__file__).parent / "dbc" / name
    if not path.exists():
        pytest.skip(f"{name} is not in this opendbc version")
    return load_dbc(str(path), strict)


async def test_can_fd_64_byte_frames_over_udp_multicast_decode_as_cantools_does() -> None:
    """GWM's 64-byte messages over udp_multicast with CAN FD on: SPEED through its compiled
    extractor, CAR_OVERALL_SIGNALS (overlapping signals) left to cantools; both judged as before."""
    db = await asyncio.to_thread(opendbc_db, "gwm_haval_h6_phev_2024.dbc", False)
    messages = [db.get_message_by_name("SPEED"), db.get_message_by_name("CAR_OVERALL_SIGNALS")]
    wanted = {(m.name, s.name): f"{m.name}.{s.name}" for m in messages for s in m.signals}
    port = free_port(socket.SOCK_DGRAM)
    got: list[list[tuple[str, float]]] = []
    ingest, _ = udp_ingest(port, db, wanted, lambda samples, t: got.append(sorted(samples)), fd=True)
    routes = {m.name: ingest._routes[(m.frame_id, False)] for m in messages}
    assert routes["SPEED"].extract is not None and routes["CAR_OVERALL_SIGNALS"].extract is None
    rng = random.Random(13)
    sent = [(m, rng.randbytes(64)) for _ in range(25) for m in messages]
    await ingest.async_start()
    sender = udp_sender(port, fd=True)
    try:
        for m, data in sent:
            sender.send(can.Message(arbitration_id=m.frame_id, data=data, is_extended_id=False, is_fd=True))
        await until(lambda: ingest.frames >= len(sent))
    finally:
        sender.shutdown()
        await ingest.async_stop()
    expected = [as_today(m, wanted, data) for m, data in sent]
    assert sorted(got) == sorted(e for e in expected if e is not None)
    assert len(got) == 25  # every SPEED frame
    # cantools cannot unpack CAR_OVERALL_SIGNALS (its signals overlap): a decode error, as before.
    assert ingest.errors["decode"] == sum(e is None for e in expected) == 25
    assert set(ingest.errors) <= {"decode", "range"}


async def test_tesla_multiplexed_power_state_decodes_through_cantools_as_before() -> None:
    db = await asyncio.to_thread(opendbc_db, "tesla_model3_party.dbc")
    message = db.get_message_by_name("VCFRONT_LVPowerState")
    wanted = {(message.name, "VCFRONT_vehiclePowerState"): "power_state",
              (message.name, "VCFRONT_parkLVState"): "park_lv",  # multiplexed: index 0
              (message.name, "VCFRONT_cpLVRequest"): "cp_lv"}  # multiplexed: index 1
    ch = channel()
    got: list[list[tuple[str, float]]] = []
    ingest = CanIngest(CanBusConfig(name="vehicle", interface="virtual", channel=ch), db, wanted,
                       lambda samples, t: got.append(sorted(samples)), Metrics(buses=["vehicle"]))
    assert ingest._routes[(message.frame_id, False)].extract is None
    rng = random.Random(7)
    payloads = [message.encode({**{s.name: 0 for s in message.signals}, "VCFRONT_LVPowerStateIndex": index,
                                "VCFRONT_vehiclePowerState": rng.randint(0, 3)}, strict=False)
                for index in (0, 1, 0, 1)]
    payloads += [bytes([0x05]) + rng.randbytes(7)]  # index 5: no such multiplexer value
    await ingest.async_start()
    sender = can.Bus(interface="virtual", channel=ch)
    try:
        for data in payloads:
            sender.send(can.Message(arbitration_id=message.frame_id, data=data, is_extended_id=False))
        await until(lambda: ingest.frames >= len(payloads))
    finally:
        sender.shutdown()
        await ingest.async_stop()
    expected = [as_today(message, wanted, data) for data in payloads]
    assert expected[-1] is None  # cantools refuses it: counted as a decode error, as before
    assert got == [e for e in expected if e is not None]
    assert {name for samples in got for name, _ in samples} == {"power_state", "park_lv", "cp_lv"}
    assert ingest.errors == {"decode": 1}


async def test_malformed_datagram_is_counted_and_the_bus_reads_on() -> None:
    """One bad datagram on udp_multicast costs itself, counted; frames queued behind it are read."""
    port = free_port(socket.SOCK_DGRAM)
    got: list[tuple[str, float]] = []
    ingest, metrics = udp_ingest(port, DB, {("VehicleDynamics", "VehicleSpeed"): "speed_kmh"},
                                 lambda samples, t: got.extend(samples))
    await ingest.async_start()
    sender = udp_sender(port)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sender.send(frame("VehicleDynamics", VehicleSpeed=1))
        raw.sendto(b"\xc1 not msgpack", (GROUP, port))
        sender.send(frame("VehicleDynamics", VehicleSpeed=2))
        await until(lambda: len(got) >= 2)
    finally:
        raw.close()
        sender.shutdown()
        await ingest.async_stop()
    assert got == [("speed_kmh", 1.0), ("speed_kmh", 2.0)]
    assert ingest.errors == {"bus_error": 1}
    assert metrics.registry.get_sample_value(
        "cerebellumd_can_errors_total", {"bus": "vehicle", "kind": "bus_error"}) == 1.0


async def test_fd_bus_that_keeps_failing_is_recreated_with_backoff() -> None:
    port = free_port(socket.SOCK_DGRAM)
    broken = {"on": False}
    created: list[can.BusABC] = []

    class Unplugged(can.BusABC):
        """A real udp_multicast bus whose reads fail while `broken` (an adapter pulled out)."""

        def __init__(self, **kwargs: object) -> None:
            self._inner = can.Bus(interface="udp_multicast", channel=GROUP, port=port, fd=False)
            self._multicast = self._inner._multicast  # where the ingest finds the socket to make non-blocking
            super().__init__(channel=GROUP)

        def _recv_internal(self, timeout: float | None):
            if broken["on"]:
                raise can.CanOperationError("adapter unplugged")
            return self._inner._recv_internal(timeout)

        def send(self, msg: can.Message, timeout: float | None = None) -> None:
            self._inner.send(msg, timeout)

        def fileno(self) -> int:
            return self._inner.fileno()

        def shutdown(self) -> None:
            self._inner.shutdown()
            super().shutdown()

    def factory(**kwargs: object) -> can.BusABC:
        created.append(Unplugged(**kwargs))
        if len(created) == 1:
            broken["on"] = True  # the first bus fails from its first read; the next ones work
        else:
            broken["on"] = False
        return created[-1]

    got: list[tuple[str, float]] = []
    config = CanBusConfig(name="vehicle", interface="udp_multicast", channel=GROUP, filters=False,
                          reconnect_backoff_ms=10, options={"port": port})
    ingest = CanIngest(config, DB, {("VehicleDynamics", "VehicleSpeed"): "speed_kmh"},
                       lambda s, t: got.extend(s), Metrics(buses=["vehicle"]), bus_factory=factory)
    await ingest.async_start()
    sender = udp_sender(port)
    try:
        assert ingest.reads_on_loop
        sender.send(frame("VehicleDynamics", VehicleSpeed=5))  # makes the fd readable: the read fails
        await until(lambda: ingest.errors["reconnect"] >= 1 and ingest.connected and len(created) == 2)
        assert ingest.reads_on_loop and ingest._fd == created[1].fileno()
        sender.send(frame("VehicleDynamics", VehicleSpeed=7))
        await until(lambda: bool(got))
    finally:
        sender.shutdown()
        await ingest.async_stop()
    assert ingest.errors["bus_error"] == 1
    assert got == [("speed_kmh", 7.0)]


def burn(seconds: float) -> None:
    """Decoding that costs CPU (a busy wait, not a sleep: the drain budget is CPU time on the loop)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_drain_is_bounded_in_time_not_frames() -> None:
    """Queued frames (reader thread path) that cost 0.4 ms each: one callback decodes at most
    what fits in the 1 ms budget, the rest follows in later loop iterations, none is lost."""
    ingest, _ = make_ingest(channel(), lambda samples, t: burn(0.0004))
    ingest._loop = asyncio.get_running_loop()
    ingest._queue.extend(frame("VehicleDynamics", VehicleSpeed=i) for i in range(100))
    ingest.drain()
    assert 1 <= ingest.frames <= 3  # 3 x 0.4 ms passes the 1 ms budget
    await until(lambda: ingest.frames == 100)
    assert not ingest._queue and ingest.dropped == 0


async def test_fd_read_is_bounded_in_time_and_yields_to_the_loop() -> None:
    port = free_port(socket.SOCK_DGRAM)
    ingest, _ = udp_ingest(port, DB, {("VehicleDynamics", "VehicleSpeed"): "speed_kmh"},
                           lambda samples, t: burn(0.0004))
    per_callback: list[int] = []
    read_fd = ingest._read_fd

    def counted(budget_s: float) -> None:
        before = ingest.frames
        read_fd(budget_s)
        per_callback.append(ingest.frames - before)

    ingest._read_fd = counted  # type: ignore[method-assign]
    await ingest.async_start()
    sender = udp_sender(port)
    try:
        for i in range(40):
            sender.send(frame("VehicleDynamics", VehicleSpeed=i))
        await until(lambda: ingest.frames >= 40)
    finally:
        sender.shutdown()
        await ingest.async_stop()
    assert ingest.frames == 40
    assert max(per_callback) <= 3, per_callback


async def test_slcan_serial_fd_is_read_on_the_loop(tmp_path: Path) -> None:
    """slcan parses one frame per recv: a burst written at once is drained whole, on the loop."""
    if shutil.which("socat") is None:
        pytest.skip("needs socat")
    adapter, host = tmp_path / "adapter", tmp_path / "host"
    socat = await asyncio.create_subprocess_exec(
        "socat", f"pty,raw,echo=0,link={adapter}", f"pty,raw,echo=0,link={host}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await until(lambda: adapter.exists() and host.exists(), what="socat's pty pair")
        got: list[tuple[str, float]] = []
        config = CanBusConfig(name="vehicle", interface="slcan", channel=str(adapter),
                              options={"sleep_after_open": 0})
        ingest = CanIngest(config, DB, {("VehicleDynamics", "VehicleSpeed"): "speed_kmh"},
                           lambda s, t: got.extend(s), Metrics(buses=["vehicle"]))
        await ingest.async_start()
        fd = os.open(host, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            assert ingest.reads_on_loop
            burst = b"".join(b"t1018" + frame("VehicleDynamics", VehicleSpeed=i).data.hex().upper().encode() + b"\r"
                             for i in range(30))
            os.write(fd, burst)
            await until(lambda: ingest.frames >= 30)
        finally:
            os.close(fd)
            await ingest.async_stop()
        assert [v for _, v in got] == [float(i) for i in range(30)]
        assert not ingest.errors
    finally:
        socat.terminate()
        await socat.wait()


@pytest.fixture
def vcan_fd() -> Iterator[str]:
    """A CAN FD capable vcan interface (MTU 72), or a skip where the kernel or our rights lack it."""
    name = f"vcan{random.randint(100, 999)}"
    try:
        proc = subprocess.run(["ip", "link", "add", "dev", name, "type", "vcan"], capture_output=True, text=True,
                              timeout=10, check=False)
    except FileNotFoundError:
        pytest.skip("no `ip` command on this machine")
    if proc.returncode != 0:
        pytest.skip(f"cannot create a vcan interface ({proc.stderr.strip() or proc.returncode}): "
                    "no vcan module in this kernel, or no CAP_NET_ADMIN")
    try:
        subprocess.run(["ip", "link", "set", name, "mtu", "72"], check=True, timeout=10)
        subprocess.run(["ip", "link", "set", "up", name], check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "link", "delete", name], check=False, timeout=10)


async def test_can_fd_64_byte_frames_over_socketcan_decode_as_cantools_does(vcan_fd: str) -> None:
    db = await asyncio.to_thread(opendbc_db, "gwm_haval_h6_phev_2024.dbc", False)
    speed = db.get_message_by_name("SPEED")
    wanted = {(speed.name, s.name): s.name for s in speed.signals}
    got: list[list[tuple[str, float]]] = []
    config = CanBusConfig(name="vehicle", interface="socketcan", channel=vcan_fd, fd=True)
    ingest = CanIngest(config, db, wanted, lambda samples, t: got.append(sorted(samples)), Metrics(buses=["vehicle"]))
    rng = random.Random(21)
    sent = [rng.randbytes(64) for _ in range(20)]
    await ingest.async_start()
    sender = can.Bus(interface="socketcan", channel=vcan_fd, fd=True)
    try:
        assert ingest.reads_on_loop
        for data in sent:
            sender.send(can.Message(arbitration_id=speed.frame_id, data=data, is_extended_id=False, is_fd=True))
        await until(lambda: ingest.frames >= len(sent))
    finally:
        sender.shutdown()
        await ingest.async_stop()
    assert got == [as_today(speed, wanted, data) for data in sent]


class UnpluggableSocket(socket.socket):
    """A socket that, once `gone` is set, fails its next read with ENODEV and then finds
    nothing (EAGAIN), as Linux's CAN_RAW does for a socket whose netdev was unregistered: the
    kernel reports the error once and unbinds the socket (net/can/raw.c `raw_notify`)."""

    gone = False
    reported = False

    def recvmsg(self, *args: int) -> tuple[bytes, list[tuple[int, int, bytes]], int, Any]:
        if not self.gone:
            return super().recvmsg(*args)
        with contextlib.suppress(BlockingIOError):
            super().recvmsg(*args)  # what made the fd readable (the kernel's error report)
        if not self.reported:
            self.reported = True
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))


@pytest.fixture
def socketcan_over_unix(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[socket.socket]]:
    """python-can's SocketcanBus on a real kernel socket where this kernel has no AF_CAN (no vcan):
    each bus gets one end of an AF_UNIX datagram socket pair, the test the other end, on which
    it writes the `can_frame` / `canfd_frame` bytes python-can builds. python-can sets
    SO_TIMESTAMPNS on it as on a CAN socket, and the kernel stamps each datagram, so python-can's
    `capture_message` and our loop reader (drivers/can_read.py) run unchanged. Only the socket
    family is replaced (`create_socket`, and `bind_socket`, which would bind to an interface);
    the CAN_RAW options python-can sets fail on it and are logged, as on a kernel without them.
    The first list entry is the peer of the first bus, and so on; the bus's own end is an
    `UnpluggableSocket`."""
    from can.interfaces.socketcan import socketcan

    peers: list[socket.socket] = []

    def create_socket() -> socket.socket:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        peers.append(peer)
        return UnpluggableSocket(fileno=ours.detach())

    monkeypatch.setattr(socketcan, "create_socket", create_socket)
    monkeypatch.setattr(socketcan, "bind_socket", lambda sock, channel="can0": None)
    yield peers
    for peer in peers:
        peer.close()


def socketcan_bytes(msg: can.Message) -> bytes:
    from can.interfaces.socketcan.socketcan import build_can_frame

    return build_can_frame(msg)


def socketcan_ingest(sink, **cfg: object) -> tuple[CanIngest, Metrics]:
    metrics = Metrics(buses=["vehicle"])
    config = CanBusConfig(name="vehicle", interface="socketcan", channel="can0", **cfg)  # type: ignore[arg-type]
    wanted = {("VehicleDynamics", "VehicleSpeed"): "speed_kmh", ("AdasStatus", "CollisionRisk"): "collision_risk"}
    return CanIngest(config, DB, wanted, sink, metrics), metrics


async def test_socketcan_is_read_on_the_loop_at_the_kernel_receive_time_and_bad_frames_are_counted(
        socketcan_over_unix: list[socket.socket]) -> None:
    got: list[tuple[list[tuple[str, float]], float]] = []
    ingest, metrics = socketcan_ingest(lambda samples, t: got.append((list(samples), t)))
    await ingest.async_start()
    try:
        assert ingest.reads_on_loop
        peer = socketcan_over_unix[0]
        sent_at = time.monotonic()
        peer.send(socketcan_bytes(frame("VehicleDynamics", VehicleSpeed=42.5)))
        peer.send(socketcan_bytes(can.Message(arbitration_id=0x7AB, data=b"\x01\x02", is_extended_id=False)))
        peer.send(socketcan_bytes(can.Message(arbitration_id=0x101, data=b"\x01", is_extended_id=False)))  # short
        peer.send(socketcan_bytes(can.Message(is_error_frame=True, arbitration_id=0x80, is_extended_id=True)))
        all_sent_at = time.monotonic()
        burn(0.05)  # the loop is held up: the frames are read 50 ms or more after the kernel received them
        await until(lambda: ingest.frames >= 4)
    finally:
        await ingest.async_stop()
    assert [samples for samples, _ in got] == [[("speed_kmh", pytest.approx(42.5))]]
    # The sample carries the kernel's receive time (SO_TIMESTAMPNS), not the read 50 ms later.
    assert sent_at - 0.005 <= got[0][1] <= all_sent_at + 0.005
    assert ingest.errors == {"unknown_id": 1, "decode": 1, "error_frame": 1}
    assert metrics.registry.get_sample_value("cerebellumd_can_frames_total", {"bus": "vehicle"}) == 4.0


async def test_can_fd_64_byte_frames_over_a_socketcan_socket_decode_as_cantools_does(
        socketcan_over_unix: list[socket.socket]) -> None:
    """The CAN FD twin of the vcan test above, on the socket pair: python-can's 72-byte
    canfd_frame, parsed by its capture_message and decoded by our compiled extractor."""
    db = await asyncio.to_thread(opendbc_db, "gwm_haval_h6_phev_2024.dbc", False)
    speed = db.get_message_by_name("SPEED")
    wanted = {(speed.name, s.name): s.name for s in speed.signals}
    got: list[list[tuple[str, float]]] = []
    config = CanBusConfig(name="vehicle", interface="socketcan", channel="can0", fd=True)
    ingest = CanIngest(config, db, wanted, lambda samples, t: got.append(sorted(samples)), Metrics(buses=["vehicle"]))
    rng = random.Random(22)
    sent = [rng.randbytes(64) for _ in range(20)]
    await ingest.async_start()
    try:
        assert ingest.reads_on_loop
        for data in sent:
            socketcan_over_unix[0].send(socketcan_bytes(
                can.Message(arbitration_id=speed.frame_id, data=data, is_extended_id=False, is_fd=True)))
        await until(lambda: ingest.frames >= len(sent))
    finally:
        await ingest.async_stop()
    assert got == [as_today(speed, wanted, data) for data in sent]
    assert not ingest.errors


async def test_an_unplugged_socketcan_adapter_is_reopened_at_its_first_error_and_sends_reach_the_bus(
        socketcan_over_unix: list[socket.socket]) -> None:
    """The kernel reports an unplugged adapter once (ENODEV) and unbinds the socket, whose later
    reads find nothing: waiting for a second failing read would leave the bus deaf for good. The
    error is counted once, the reader leaves the loop at once, and the supervisor opens a new bus
    (here at once; with a real adapter, once it is back), which reads and sends."""
    got: list[tuple[str, float]] = []
    ingest, metrics = socketcan_ingest(lambda samples, t: got.extend(samples), reconnect_backoff_ms=10,
                                       listen_only=False)
    await ingest.async_start()
    try:
        first = ingest._bus
        assert first is not None and ingest.reads_on_loop
        first_socket = first.socket  # type: ignore[attr-defined]
        assert isinstance(first_socket, UnpluggableSocket)
        first_socket.gone = True
        socketcan_over_unix[0].send(b"\0")  # the fd becomes readable, as by the kernel's error report
        await until(lambda: ingest.errors["reconnect"] >= 1 and ingest.connected and len(socketcan_over_unix) == 2,
                    what="the bus recreated")
        assert first_socket.reported and ingest.reads_on_loop and ingest._bus is not first
        peer = socketcan_over_unix[1]
        peer.send(socketcan_bytes(frame("VehicleDynamics", VehicleSpeed=7)))
        await until(lambda: bool(got))
        out = can.Message(arbitration_id=0x51B, data=b"\x10\x00", is_extended_id=False)
        await asyncio.to_thread(ingest.send, out)
        from can.interfaces.socketcan.socketcan import dissect_can_frame

        can_id, dlc, _flags, data = dissect_can_frame(await asyncio.to_thread(peer.recv, 72))
    finally:
        await ingest.async_stop()
    assert got == [("speed_kmh", 7.0)]
    assert ingest.errors["bus_error"] == 1
    assert (can_id, dlc, data) == (0x51B, 2, b"\x10\x00")
    sent = metrics.registry.get_sample_value("cerebellumd_can_tx_frames_total", {"bus": "vehicle", "result": "ok"})
    assert sent == 1.0


async def test_frames_the_kernel_drops_on_a_loop_read_bus_are_counted() -> None:
    """While the loop is held up, a flood overflows the socket's receive buffer and the kernel
    drops frames: every frame sent is either read or counted as dropped, none lost silently."""
    import threading

    port = free_port(socket.SOCK_DGRAM)
    ingest, metrics = udp_ingest(port, DB, {("VehicleDynamics", "VehicleSpeed"): "speed_kmh"},
                                 lambda samples, t: None, silence_timeout_ms=400)
    await ingest.async_start()
    sender = udp_sender(port)
    sent = 5000
    try:
        assert ingest.reads_on_loop

        def flood() -> None:
            for i in range(sent):
                sender.send(frame("VehicleDynamics", VehicleSpeed=i % 200))

        thread = threading.Thread(target=flood)
        thread.start()
        while thread.is_alive():  # the loop held up (busy, as by a long decode): nothing is read
            burn(0.01)
        await until(lambda: ingest.frames + ingest.dropped >= sent, what="every frame read or counted dropped")
    finally:
        sender.shutdown()
        await ingest.async_stop()
    assert ingest.dropped > 0, "the flood should overflow the socket buffer while the loop is held up"
    assert ingest.frames + ingest.dropped == sent
    assert metrics.registry.get_sample_value("cerebellumd_ingest_dropped_total", {"bus": "vehicle"}) == ingest.dropped
