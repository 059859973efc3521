"""`cerebellumd sim`: the plant as its own process, talking to `cerebellumd run` over real
transports (docs/hil.md):

- CAN: the virtual vehicle's frames on python-can `udp_multicast` (loopback/LAN, default),
  `socketcan` (vcan or a real interface) or `virtual`; or as the *adapter* end of an slcan
  link (`slcan`: we open one side of a pty pair, e.g. made by socat, and speak the Lawicel
  ASCII protocol that python-can's slcan interface on the other side expects);
- SOME/IP: notifications over UDP carrying vehicle values to the daemon's endpoint;
- the companion MCU: `McuEmulator` on a pty whose path is a symlink named in the config, with
  the scenario's battery and accelerator temperature in its READINGS, its rail switched by the
  daemon's RAIL_COMMANDs (the simulated accelerator), and scheduled WAKE/SLEEP requests.

The sim config is its own small TOML (`examples/hil-sim.toml`), validated here. Plant time
runs `speedup` times faster than the wall clock from the moment everything is up; the process
prints one JSON line `{"ready": ...}` then, and a summary line when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import can
import cantools
from cantools.database.can import Database
from pydantic import BaseModel, ConfigDict, Field

from ..drivers.mcu_emulator import McuEmulator
from ..drivers.someip import build_notification, encode_payload
from ..drivers.someip_options import SomeIpFieldSpec
from .cycles import load_cycle
from .events import build_scenario
from .events_config import resolve_events
from .plant import async_drive
from .vehicle import VirtualVehicle, load_vehicle_dbc

log = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlantSection(_Section):
    cycle: str = Field("udds", description="Shipped drive cycle name or CSV path.")
    seed: int = Field(1, description="Scenario seed.")
    speedup: float = Field(1.0, gt=0, description="Plant time runs this many times faster than the wall clock.")
    duration_s: float | None = Field(None, gt=0, description="Plant seconds to run (default: the whole cycle).")
    events: str | None = Field(
        None, description="Event world: a shipped name or an event file (its [[key_off]] periods silence the "
                          "bus and drop the ignition, as in `evaluate`).")


class SimCanSection(_Section):
    interface: Literal["udp_multicast", "slcan", "socketcan", "virtual"] = Field(
        "udp_multicast", description="Transport of the vehicle's frames.")
    channel: str = Field(
        "239.74.163.2",
        description="udp_multicast group, socketcan interface, virtual channel, or for slcan the "
                    "adapter-side pty path (the daemon opens the other side).")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Extra can.Bus keyword arguments (udp_multicast: port).")
    dbc: str = Field("builtin:vehicle.dbc", description="DBC of the frames (builtin:vehicle.dbc or a path).")


class SimSomeIpField(SomeIpFieldSpec):
    value: str = Field(..., pattern=r"^\w+\.\w+$",
                       description="Vehicle value carried in this field: `Message.Signal` of the DBC.")


class SimSomeIpSection(_Section):
    host: str = Field("127.0.0.1", description="Daemon's SOME/IP address (unicast or multicast group).")
    port: int = Field(30490, ge=1, le=65535, description="Daemon's SOME/IP UDP port.")
    period_ms: int = Field(100, gt=0, description="Each notification is sent this often (wall clock).")
    fields: list[SimSomeIpField] = Field(default_factory=list, description="Payload fields and their values.")


class McuRequestAt(_Section):
    at_s: float = Field(..., ge=0, description="Plant time of the request.")
    kind: Literal["wake", "sleep"] = Field(..., description="WAKE_REQUEST or SLEEP_REQUEST.")
    reason: int = Field(0, ge=0, le=255, description="Reason code (docs/mcu-protocol.md).")


class SimMcuSection(_Section):
    link: Path = Field(..., description="Symlink to the emulator's pty: the daemon's [mcu] port.")
    heartbeat_interval_ms: int = Field(100, gt=0, description="HEARTBEAT period (wall clock).")
    readings_interval_ms: int = Field(200, gt=0, description="READINGS period (wall clock).")
    rail_on_mw: int = Field(6000, gt=0, description="Accelerator rail power while the rail is on.")
    requests: list[McuRequestAt] = Field(default_factory=list, description="Scheduled wake/sleep requests.")


class SimConfig(_Section):
    plant: PlantSection = Field(default_factory=PlantSection, description="Scenario and time.")
    can: SimCanSection | None = Field(default_factory=SimCanSection, description="CAN transport.")
    someip: SimSomeIpSection | None = Field(None, description="SOME/IP notifications to the daemon.")
    mcu: SimMcuSection | None = Field(None, description="Companion-MCU emulator on a pty.")


def load_sim_config(path: str | Path) -> SimConfig:
    with open(path, "rb") as f:
        return SimConfig.model_validate(tomllib.load(f))


def load_sim_dbc(spec: str) -> Database:
    if spec == "builtin:vehicle.dbc":
        return load_vehicle_dbc()
    db = cantools.database.load_file(spec)
    if not isinstance(db, Database):
        raise ValueError(f"{spec}: not a CAN database")
    return db


# -- slcan adapter side ------------------------------------------------------------------------


class SlcanAdapter(can.BusABC):
    """The USB-CAN adapter end of an slcan link, on a pty: answers the host's commands
    (O/C/L/S/s/V/N/F...) with CR and, once the channel is open, sends each frame as Lawicel
    ASCII (`tIIILDD..\\r`, `TIIIIIIIILDD..\\r`). Non-blocking: a full pty drops frames (as a
    real adapter's FIFO would) and counts them."""

    def __init__(self, channel: str, **kwargs: Any) -> None:
        self.fd = os.open(channel, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.is_open = False
        self.sent = 0
        self.dropped = 0
        self.commands: list[str] = []
        self._rx = bytearray()
        self._reading = False
        super().__init__(channel, **kwargs)

    def start_reading(self) -> None:
        asyncio.get_running_loop().add_reader(self.fd, self._on_readable)
        self._reading = True

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EIO: the host side is not open right now
        self._rx += data
        while b"\r" in self._rx:
            line, _, rest = self._rx.partition(b"\r")
            self._rx = bytearray(rest)
            self._on_command(line.decode("ascii", "replace").strip())

    def _on_command(self, command: str) -> None:
        self.commands.append(command)
        reply = b"\r"
        if command.startswith(("O", "L")):
            self.is_open = True
        elif command.startswith("C"):
            self.is_open = False
        elif command.startswith("V"):
            reply = b"V1013\r"
        elif command.startswith("N"):
            reply = b"NCBLM\r"
        elif command.startswith("F"):
            reply = b"F00\r"
        elif command[:1] in ("t", "T", "r", "R"):
            reply = b"z\r" if command[0] in "tr" else b"Z\r"  # host frames: acknowledged, not simulated
        self._write(reply)

    @staticmethod
    def encode(msg: can.Message) -> bytes:
        data = bytes(msg.data)
        if msg.is_extended_id:
            head = f"T{msg.arbitration_id:08X}{len(data)}"
        else:
            head = f"t{msg.arbitration_id:03X}{len(data)}"
        return (head + data.hex().upper() + "\r").encode("ascii")

    def _write(self, data: bytes) -> bool:
        try:
            return os.write(self.fd, data) == len(data)
        except (BlockingIOError, OSError):
            return False

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        if not self.is_open:
            return  # a closed adapter does not put the host's bus traffic on its serial line
        if self._write(self.encode(msg)):
            self.sent += 1
        else:
            self.dropped += 1

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        return None, False

    def shutdown(self) -> None:
        if self._reading:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(self.fd)
            self._reading = False
        with contextlib.suppress(OSError):
            os.close(self.fd)
        super().shutdown()


# -- the plant process -------------------------------------------------------------------------


class _SomeIpSender:
    def __init__(self, section: SimSomeIpSection, vehicle: VirtualVehicle, plant_time: Callable[[], float]) -> None:
        self.section = section
        self.vehicle = vehicle
        self.plant_time = plant_time
        self.sent = 0
        self._session = 0
        groups: dict[tuple[int, int], list[SimSomeIpField]] = {}
        for f in section.fields:
            groups.setdefault((f.service_id, f.event_id), []).append(f)
        self.groups = groups

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=(self.section.host, self.section.port))
        period = self.section.period_ms / 1000
        try:
            while not stop.is_set():
                values = self.vehicle.message_values(self.plant_time())
                for (service, event), fields in self.groups.items():
                    by_field = {}
                    for f in fields:
                        message, signal = f.value.split(".", 1)
                        by_field[f.field] = values.get(message, {}).get(signal, 0.0)
                    self._session = self._session % 0xFFFF + 1
                    payload = encode_payload(fields, by_field)
                    transport.sendto(build_notification(service, event, payload, session_id=self._session))
                    self.sent += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), period)
        finally:
            transport.close()


async def _run_mcu(section: SimMcuSection, emulator: McuEmulator, vehicle: VirtualVehicle,
                   plant_time: Callable[[], float], stop: asyncio.Event) -> None:
    """Scenario values into the emulator's READINGS and the scheduled requests, in plant time."""
    pending = sorted(section.requests, key=lambda r: r.at_s)
    while not stop.is_set():
        t = plant_time()
        values = vehicle.message_values(t)
        battery = values.get("BodyStatus", {}).get("BatteryVoltage")
        temp = values.get("AcceleratorThermal", {}).get("AcceleratorTemp")
        if battery is not None:
            emulator.rail.battery_mv = int(battery * 1000)
        if temp is not None:
            emulator.rail.accel_temp_dc = int(temp * 10)
        while pending and pending[0].at_s <= t:
            request = pending.pop(0)
            if request.kind == "wake":
                emulator.send_wake_request(request.reason)
            else:
                emulator.send_sleep_request(request.reason)
            log.info("sim: MCU %s request at plant %.1f s", request.kind, t)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)


async def async_run_sim(config: SimConfig, stop: asyncio.Event, out: Callable[[str], None] = print) -> dict[str, Any]:
    plant = config.plant
    cycle = await asyncio.to_thread(load_cycle, plant.cycle)
    if plant.events is not None:
        events_name, world = await asyncio.to_thread(resolve_events, plant.events)
        scenario = build_scenario(cycle, plant.seed, world, name=events_name)
    else:
        scenario = build_scenario(cycle, plant.seed)
    db = await asyncio.to_thread(load_sim_dbc, config.can.dbc if config.can else "builtin:vehicle.dbc")
    vehicle = VirtualVehicle(scenario, db)
    duration = plant.duration_s if plant.duration_s is not None else cycle.duration_s
    t0 = time.monotonic()

    def now() -> float:
        return (time.monotonic() - t0) * plant.speedup

    bus: can.BusABC | None = None
    if config.can is not None:
        c = config.can
        if c.interface == "slcan":
            bus = SlcanAdapter(c.channel)
            bus.start_reading()
        else:
            bus = await asyncio.to_thread(lambda: can.Bus(interface=c.interface, channel=c.channel, **c.options))
    emulator: McuEmulator | None = None
    if config.mcu is not None:
        m = config.mcu
        emulator = McuEmulator(heartbeat_interval_s=m.heartbeat_interval_ms / 1000,
                               readings_interval_s=m.readings_interval_ms / 1000, link_path=m.link)
        # on_mv x on_ma / 1000 = rail_mw: a 5 V rail drawing the configured power.
        emulator.rail.on_ma = max(1, m.rail_on_mw * 1000 // emulator.rail.on_mv)
        await asyncio.to_thread(m.link.parent.mkdir, parents=True, exist_ok=True)
        await emulator.async_open()
        emulator.start()
    someip = _SomeIpSender(config.someip, vehicle, now) if config.someip is not None else None
    t0 = time.monotonic()
    tasks: list[asyncio.Task[Any]] = []
    if bus is not None:
        tasks.append(asyncio.create_task(async_drive(vehicle, bus, now, stop, start=0.0, until=duration)))
    if someip is not None:
        tasks.append(asyncio.create_task(someip.run(stop)))
    if emulator is not None and config.mcu is not None:
        tasks.append(asyncio.create_task(_run_mcu(config.mcu, emulator, vehicle, now, stop)))
    out(json.dumps({"ready": True, "cycle": cycle.name, "seed": plant.seed, "speedup": plant.speedup,
                    "duration_s": duration, "mcu": emulator.path if emulator else None,
                    "events": [[e.kind.value, e.start_s, e.end_s] for e in scenario.events]}))
    try:
        while not stop.is_set() and now() <= duration:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
            if any(t.done() and t.exception() for t in tasks):
                break
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.error("sim task failed: %r", r)
        if emulator is not None:
            await emulator.stop()
        if bus is not None:
            await asyncio.to_thread(bus.shutdown)
    summary: dict[str, Any] = {"plant_seconds": round(now(), 2)}
    if config.can is not None:
        summary["can_frames"] = next((r for r in results[:1] if isinstance(r, int)), 0)
        if isinstance(bus, SlcanAdapter):
            summary["slcan_dropped"] = bus.dropped
    if someip is not None:
        summary["someip_sent"] = someip.sent
    if emulator is not None:
        summary["mcu_frames_tx"] = emulator.stats.frames_tx
        summary["mcu_received"] = len(emulator.stats.received)
    out(json.dumps(summary))
    return summary
