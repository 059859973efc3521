"""A companion-MCU emulator speaking docs/mcu-protocol.md on the master side of a pty.

The gateway side (McuLink) opens the slave path with pyserial exactly as it would open a real
UART. The emulator sends heartbeats and readings, switches its simulated accelerator rail on
RAIL_COMMAND and answers ACK/NACK, takes POWER_DOWN_ALLOWED and NEXT_WAKE (ACKed, remembered
for tests; a repeat with the same seq and payload is ACKed without being re-applied), and can
misbehave on purpose (garbage, bad CRC, silence,
hang-up) for tests and for `cerebellumd sim`.

All pty I/O is non-blocking on the event loop (add_reader + os.read/os.write on an O_NONBLOCK
fd); nothing here blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tty
from dataclasses import dataclass, field
from pathlib import Path

from .mcu_link import wait_event
from .mcu_protocol import (
    Ack,
    Body,
    FrameParser,
    Heartbeat,
    Message,
    MsgType,
    Nack,
    NackCode,
    NextWake,
    PowerDownAllowed,
    RailAction,
    RailCommand,
    Readings,
    SleepRequest,
    StatusFlags,
    WakeRequest,
    encode,
)

_LOG = logging.getLogger(__name__)


@dataclass
class RailModel:
    """What the emulated board measures on the accelerator rail."""

    on_mv: int = 5_000
    on_ma: int = 1_200
    battery_mv: int = 12_600
    mcu_temp_dc: int = 350
    accel_temp_dc: int = 450


@dataclass
class Misbehaviour:
    """Switches for tests: what the emulator does wrong."""

    silent: bool = False  # send nothing at all (heartbeats, readings, replies)
    ignore_rail_commands: bool = False  # no ACK, no change
    nack_rail_commands: NackCode | None = None  # refuse with this code
    rail_stuck: bool = False  # ACK but the rail does not change
    legacy_firmware: bool = False  # predates POWER_DOWN_ALLOWED/NEXT_WAKE: skips them, no answer
    drop_power_acks: int = 0  # the next N ACKs of those commands are lost on the line


@dataclass
class EmulatorStats:
    received: list[Message] = field(default_factory=list)
    frames_tx: int = 0
    tx_dropped: int = 0


class McuEmulator:
    """`async_open()` creates the pty and returns the path the link should open; `run()` serves
    until `stop()` (or use `start()` for a background task)."""

    def __init__(
        self,
        *,
        heartbeat_interval_s: float = 0.1,
        readings_interval_s: float = 0.2,
        link_path: str | Path | None = None,
        rail_on: bool = False,
        rail: RailModel | None = None,
    ) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.readings_interval_s = readings_interval_s
        self.link_path = Path(link_path) if link_path is not None else None
        self.rail_on = rail_on
        self.rail = rail or RailModel()
        self.misbehave = Misbehaviour()
        self.stats = EmulatorStats()
        self.parser = FrameParser()
        self._master: int | None = None
        self._slave: int | None = None
        self._slave_path: str | None = None
        self._seq = 0
        self._started = 0.0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reading = False
        #: The latest POWER_DOWN_ALLOWED / NEXT_WAKE taken (repeats not counted), for tests.
        self.power_down: PowerDownAllowed | None = None
        self.next_wake: NextWake | None = None
        self.power_commands_applied = 0
        self._last_command: dict[type, tuple[int, object]] = {}

    # -- pty -----------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """What the link should open: the symlink if one was asked for, else the pty slave."""
        if self._slave_path is None:
            raise RuntimeError("emulator not opened")
        return str(self.link_path) if self.link_path is not None else self._slave_path

    async def async_open(self) -> str:
        """Create the pty (and point `link_path` at it); returns the path for the link."""
        master, slave = os.openpty()
        # Raw slave: no echo of our own frames back to us and no newline translation before
        # the link has opened the port (pyserial sets raw mode too, but only once it opens).
        tty.setraw(slave)
        os.set_blocking(master, False)
        # We keep the slave fd open so the master never sees EIO while the link reconnects.
        self._master, self._slave = master, slave
        self._slave_path = os.ttyname(slave)
        if self.link_path is not None:
            await asyncio.to_thread(_point_symlink, self.link_path, self._slave_path)
        if self._reading:
            asyncio.get_running_loop().add_reader(master, self._on_readable)
        return self.path

    def hangup(self) -> None:
        """Close the pty (as unplugging a USB-serial adapter): the link sees the port fail."""
        if self._master is not None and self._reading:
            asyncio.get_running_loop().remove_reader(self._master)
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None
        self.parser.reset()

    async def async_reopen(self) -> str:
        """A fresh pty after `hangup()`; with `link_path` the symlink is moved to it."""
        self.hangup()
        return await self.async_open()

    # -- running -------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if self._master is None:
            await self.async_open()
        self._started = loop.time()
        self._reading = True
        assert self._master is not None
        loop.add_reader(self._master, self._on_readable)
        next_hb = next_rd = loop.time()
        try:
            while not self._stop.is_set():
                now = loop.time()
                if now >= next_hb:
                    self.send(self._heartbeat())
                    next_hb += self.heartbeat_interval_s
                if now >= next_rd:
                    self.send(self.readings())
                    next_rd += self.readings_interval_s
                # Periodic emission at absolute deadlines; wake early on stop().
                with contextlib.suppress(TimeoutError):
                    await wait_event(self._stop, max(0.0, min(next_hb, next_rd) - now))
        finally:
            self._reading = False
            if self._master is not None:
                loop.remove_reader(self._master)

    def start(self) -> asyncio.Task[None]:
        self._stop.clear()
        self._task = asyncio.create_task(self.run(), name="mcu-emulator")
        return self._task

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        self.hangup()
        if self.link_path is not None:
            await asyncio.to_thread(self.link_path.unlink, missing_ok=True)

    # -- messages ------------------------------------------------------------------------------

    def _heartbeat(self) -> Heartbeat:
        uptime_ms = int((asyncio.get_running_loop().time() - self._started) * 1000)
        status = StatusFlags.IGNITION_ON | (StatusFlags.RAIL_ON if self.rail_on else 0)
        return Heartbeat(uptime_ms=uptime_ms, status=int(status))

    def readings(self) -> Readings:
        r = self.rail
        mv, ma = (r.on_mv, r.on_ma) if self.rail_on else (0, 0)
        return Readings(
            battery_mv=r.battery_mv, mcu_temp_dc=r.mcu_temp_dc, accel_temp_dc=r.accel_temp_dc,
            rail_mv=mv, rail_ma=ma, rail_mw=mv * ma // 1000, rail_on=self.rail_on,
        )

    def send(self, body: Body) -> int:
        """Send with the next sequence number; returns it."""
        self._seq = (self._seq + 1) & 0xFF
        if not self.misbehave.silent:
            self.write_raw(encode(body, self._seq))
        return self._seq

    def resend(self, body: Body, seq: int) -> None:
        """A frame again with its seq: a request repeated because no ACK was seen."""
        if not self.misbehave.silent:
            self.write_raw(encode(body, seq))

    def send_wake_request(self, reason: int) -> int:
        return self.send(WakeRequest(reason))

    def send_sleep_request(self, reason: int) -> int:
        return self.send(SleepRequest(reason))

    def inject_garbage(self, data: bytes) -> None:
        self.write_raw(data)

    def inject_bad_crc(self) -> None:
        frame = bytearray(encode(self.readings(), 0))
        frame[-1] ^= 0x5A
        self.write_raw(bytes(frame))

    def write_raw(self, data: bytes) -> None:
        if self._master is None:
            self.stats.tx_dropped += 1
            return
        try:
            written = os.write(self._master, data)
        except (BlockingIOError, OSError):
            # Nobody reads the slave and its buffer is full, or it was hung up: a real UART
            # would drop the bytes too.
            self.stats.tx_dropped += 1
            return
        self.stats.frames_tx += 1
        if written < len(data):
            self.stats.tx_dropped += 1

    def _on_readable(self) -> None:
        if self._master is None:
            return
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EIO: no slave open right now
        for message in self.parser.feed(data):
            self.stats.received.append(message)
            if isinstance(message.body, RailCommand):
                self._on_rail_command(message.seq, message.body.action)
            elif isinstance(message.body, PowerDownAllowed | NextWake):
                self._on_power_command(message)

    def _on_power_command(self, message: Message) -> None:
        body = message.body
        assert isinstance(body, PowerDownAllowed | NextWake)
        m = self.misbehave
        if m.legacy_firmware:
            return  # what a firmware without these types does: count unknown_type, say nothing
        kind = MsgType.POWER_DOWN_ALLOWED if isinstance(body, PowerDownAllowed) else MsgType.NEXT_WAKE
        if self._last_command.get(type(body)) != (message.seq, body):
            self._last_command[type(body)] = (message.seq, body)
            self.power_commands_applied += 1
            if isinstance(body, PowerDownAllowed):
                self.power_down = body
            else:
                self.next_wake = body
        if m.drop_power_acks > 0:
            m.drop_power_acks -= 1
            self._seq = (self._seq + 1) & 0xFF  # sent, and lost on the way
            return
        self.send(Ack(message.seq, kind))

    def _on_rail_command(self, seq: int, action: RailAction) -> None:
        m = self.misbehave
        if m.ignore_rail_commands:
            return
        if m.nack_rail_commands is not None:
            self.send(Nack(seq, MsgType.RAIL_COMMAND, int(m.nack_rail_commands)))
            return
        if not m.rail_stuck:
            # RESET is a power cycle: the rail ends up on.
            self.rail_on = action is not RailAction.OFF
        self.send(Ack(seq, MsgType.RAIL_COMMAND))
        # Report the new rail state at once, as real firmware would after switching.
        self.send(self.readings())
        _LOG.debug("MCU emulator: rail %s -> %s", action.name, "on" if self.rail_on else "off")


def _point_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)  # atomic: the link never sees a missing path mid-swap
