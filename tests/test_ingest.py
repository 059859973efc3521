"""CAN ingest over real python-can virtual buses: decoding, bad frames counted, bounded queue,
silence, reconnect, and the fast path that wakes before the next tick."""

from __future__ import annotations

import asyncio
import itertools

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

from .helpers import until

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


async def test_failed_bus_is_recreated_with_backoff() -> None:
    ch = channel()
    created: list[can.BusABC] = []
    failures = {"left": 1}

    class FlakyBus(can.BusABC):
        def __init__(self, **kwargs: object) -> None:
            self._inner = can.Bus(interface="virtual", channel=ch)
            super().__init__(channel=ch)

        def _recv_internal(self, timeout: float | None):
            if failures["left"] > 0:
                failures["left"] -= 1
                raise can.CanOperationError("adapter unplugged")
            return self._inner._recv_internal(timeout)

        def send(self, msg: can.Message, timeout: float | None = None) -> None:
            self._inner.send(msg, timeout)

        def shutdown(self) -> None:
            self._inner.shutdown()
            super().shutdown()

    def factory(**kwargs: object) -> can.BusABC:
        bus = FlakyBus(**kwargs)
        created.append(bus)
        return bus

    metrics = Metrics(buses=["vehicle"])
    config = CanBusConfig(name="vehicle", interface="virtual", channel=ch, reconnect_backoff_ms=10)
    got: list[tuple[str, float]] = []
    ingest = CanIngest(config, DB, {("VehicleDynamics", "VehicleSpeed"): "speed_kmh"},
                       lambda s, t: got.extend(s), metrics, bus_factory=factory)
    await ingest.async_start()
    try:
        await until(lambda: ingest.errors["reconnect"] >= 1 and ingest.connected and len(created) == 2)
        sender = can.Bus(interface="virtual", channel=ch)
        sender.send(frame("VehicleDynamics", VehicleSpeed=7))
        await until(lambda: bool(got))
        sender.shutdown()
    finally:
        await ingest.async_stop()
    assert ingest.errors["bus_error"] == 1
    assert got[0][1] == pytest.approx(7)


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
