"""Asyncio client of the companion-MCU serial link (pyserial-asyncio-fast, Protocol-based).

The link owns the port: it opens it (in an executor, as serial_asyncio_fast does), reconnects
with exponential backoff after an open failure or a lost connection, watches the MCU's
heartbeat (no valid frame for `heartbeat_timeout_ms` = stale), keeps the latest HEARTBEAT and
READINGS, ACKs the MCU's wake/sleep requests and sends commands that await their ACK: rail
commands, and the power-down permission and next wake, which are repeated with the same seq
when no ACK comes (`command_attempts`).
It decides nothing: listeners (the daemon, McuAccelerator, McuPowerSensor) get every message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .base import DriverError, options_of
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
    WakeRequest,
    encode,
    message_type,
)

_LOG = logging.getLogger(__name__)

MessageListener = Callable[[Message], None]


async def wait_event(event: asyncio.Event, timeout: float) -> None:  # noqa: ASYNC109
    """`event.wait()` bounded by `timeout` (TimeoutError). asyncio.timeout rather than
    wait_for: on Python 3.11 wait_for can swallow a cancellation that races with the inner
    wait completing, which left long-lived loops uncancellable."""
    async with asyncio.timeout(timeout):
        await event.wait()


class McuLinkOptions(BaseModel):
    """Serial link to the companion MCU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: str = Field(..., description="Serial device; prefer /dev/serial/by-id/... paths.")
    baudrate: int = Field(115200, gt=0, description="Line speed (bit/s), 8N1.")
    heartbeat_timeout_ms: int = Field(
        1500, gt=0, description="No valid frame for this long = link stale.")
    ack_timeout_ms: int = Field(500, gt=0, description="Default wait for the ACK of a command.")
    command_attempts: int = Field(
        3, ge=1, le=20, description="POWER_DOWN_ALLOWED and NEXT_WAKE are sent this many times (same seq, "
                                    "one ACK timeout apart) before the link gives up.")
    reconnect_initial_ms: int = Field(200, gt=0, description="First reconnect delay.")
    reconnect_max_ms: int = Field(30_000, gt=0, description="Reconnect delay cap (doubles up to it).")


class _LinkProtocol(asyncio.Protocol):
    """One per connection: hands bytes and the end of the connection to the link."""

    def __init__(self, link: McuLink) -> None:
        self._link = link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._link._on_connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._link._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._link._on_connection_lost(exc)


class McuLink:
    """Client side of the MCU link. Start with `async_start()`, stop with `async_close()`."""

    def __init__(
        self,
        options: McuLinkOptions | Mapping[str, Any],
        on_message: MessageListener | None = None,
    ) -> None:
        self.options = options_of(McuLinkOptions, options)
        self.parser = FrameParser()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "frames_tx", "connects", "open_failures", "connections_lost", "stale",
                "ack_timeouts", "nacks", "listener_errors", "command_repeats",
            ),
            0,
        )
        self.last_heartbeat: Heartbeat | None = None
        self.last_readings: Readings | None = None
        #: time.monotonic() of the latest READINGS (None before the first).
        self.last_readings_time: float | None = None
        self._listeners: list[MessageListener] = [on_message] if on_message else []
        self._transport: asyncio.Transport | None = None
        self._seq = 0
        self._pending: dict[int, tuple[int, asyncio.Future[Ack | Nack]]] = {}  # seq -> (type, future)
        self._stale = True
        self._rx = asyncio.Event()
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- state ---------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    @property
    def stale(self) -> bool:
        """True until the first frame, after `heartbeat_timeout_ms` of silence, and while
        disconnected."""
        return self._stale or not self.connected

    @property
    def all_counters(self) -> dict[str, int]:
        """Link counters merged with the frame parser's (frames, crc, length, ...)."""
        return {**self.parser.counters, **self.counters}

    def add_listener(self, listener: MessageListener) -> Callable[[], None]:
        """Call `listener(message)` for every message; returns the function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    # -- lifecycle -----------------------------------------------------------------------------

    async def async_start(self) -> None:
        if self._tasks:
            return
        self._closing.clear()
        self._tasks = [
            asyncio.create_task(self._supervise(), name="mcu-link-supervisor"),
            asyncio.create_task(self._watch_heartbeat(), name="mcu-link-watchdog"),
        ]

    async def wait_connected(self, timeout: float) -> None:  # noqa: ASYNC109 (simple API)
        """Until the port is open; TimeoutError otherwise."""
        await wait_event(self._connected, timeout)

    async def async_close(self) -> None:
        self._closing.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
            # serial_asyncio_fast closes the port in an executor and then calls
            # connection_lost: wait for it so the port is free when we return.
            with contextlib.suppress(TimeoutError):
                await wait_event(self._lost, 2.0)
        self._fail_pending("MCU link closed")

    async def _supervise(self) -> None:
        # Imported when a link runs: the config imports this module for McuLinkOptions, and
        # pyserial is not worth `run`'s memory where there is no MCU (docs/PERFORMANCE.md).
        import serial_asyncio_fast

        loop = asyncio.get_running_loop()
        opts = self.options
        backoff = opts.reconnect_initial_ms / 1000
        while not self._closing.is_set():
            self._lost.clear()
            try:
                await serial_asyncio_fast.create_serial_connection(
                    loop, lambda: _LinkProtocol(self), opts.port, baudrate=opts.baudrate
                )
            except OSError as exc:  # serial.SerialException is an OSError
                self.counters["open_failures"] += 1
                _LOG.warning("MCU link: cannot open %s: %s (retry in %.1f s)",
                             opts.port, exc, backoff)
                with contextlib.suppress(TimeoutError):
                    await wait_event(self._closing, backoff)
                backoff = min(backoff * 2, opts.reconnect_max_ms / 1000)
                continue
            backoff = opts.reconnect_initial_ms / 1000
            await self._lost.wait()

    async def _watch_heartbeat(self) -> None:
        timeout = self.options.heartbeat_timeout_ms / 1000
        while True:
            self._rx.clear()
            try:
                await wait_event(self._rx, timeout)
            except TimeoutError:
                if not self._stale:
                    self._stale = True
                    self.counters["stale"] += 1
                    _LOG.warning("MCU link: no frame for %.1f s, readings are stale", timeout)
            else:
                if self._stale:
                    _LOG.info("MCU link: frames flowing")
                self._stale = False

    # -- protocol callbacks --------------------------------------------------------------------

    def _on_connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.parser.reset()
        self.counters["connects"] += 1
        self._connected.set()
        _LOG.info("MCU link: connected on %s", self.options.port)

    def _on_connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._connected.clear()
        self._lost.set()
        if not self._closing.is_set():
            self.counters["connections_lost"] += 1
            _LOG.warning("MCU link: connection lost: %s", exc or "closed")
        self._fail_pending("MCU link connection lost")

    def _on_data(self, data: bytes) -> None:
        for message in self.parser.feed(data):
            self._rx.set()
            self._dispatch(message)

    def _dispatch(self, message: Message) -> None:
        body = message.body
        if isinstance(body, Heartbeat):
            self.last_heartbeat = body
        elif isinstance(body, Readings):
            self.last_readings = body
            self.last_readings_time = time.monotonic()
        elif isinstance(body, Ack | Nack):
            pending = self._pending.get(body.acked_seq)
            if pending is not None and pending[0] == body.acked_type and not pending[1].done():
                pending[1].set_result(body)
        elif isinstance(body, WakeRequest | SleepRequest):
            # Acknowledge receipt (the MCU retries until it sees the ACK); deciding what to do
            # about it is the daemon's job, through the listeners.
            kind = MsgType.WAKE_REQUEST if isinstance(body, WakeRequest) else MsgType.SLEEP_REQUEST
            with contextlib.suppress(DriverError):
                self.send(Ack(message.seq, kind))
        for listener in list(self._listeners):
            try:
                listener(message)
            except Exception:  # a consumer bug must not break the link
                self.counters["listener_errors"] += 1
                _LOG.exception("MCU link listener failed")

    # -- sending -------------------------------------------------------------------------------

    def send(self, body: Body) -> int:
        """Write one frame now; returns its sequence number. DriverError when disconnected."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise DriverError(f"MCU link on {self.options.port} is not connected")
        self._seq = (self._seq + 1) & 0xFF
        transport.write(encode(body, self._seq))
        self.counters["frames_tx"] += 1
        return self._seq

    def _resend(self, body: Body, seq: int) -> None:
        """The same frame again, with its seq (a repeat the MCU recognises)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise DriverError(f"MCU link on {self.options.port} is not connected")
        transport.write(encode(body, seq))
        self.counters["frames_tx"] += 1
        self.counters["command_repeats"] += 1

    async def async_command(
        self, body: Body, *, attempts: int | None = None, timeout: float | None = None  # noqa: ASYNC109
    ) -> int:
        """Send a gateway command and wait for its ACK, repeating it (same seq) after each ACK
        timeout, `attempts` times in all (default `command_attempts`). Returns the number of
        frames sent. DriverError on NACK, on no ACK after the last attempt, or on disconnect."""
        kind = message_type(body)
        tries = self.options.command_attempts if attempts is None else attempts
        wait = self.options.ack_timeout_ms / 1000 if timeout is None else timeout
        future: asyncio.Future[Ack | Nack] = asyncio.get_running_loop().create_future()
        seq = self.send(body)
        self._pending[seq] = (kind, future)
        sent = 1
        try:
            while True:
                try:
                    async with asyncio.timeout(wait):
                        reply = await asyncio.shield(future)
                    break
                except TimeoutError:
                    self.counters["ack_timeouts"] += 1
                    if sent >= tries:
                        raise DriverError(
                            f"MCU did not acknowledge {kind.name} after {sent} frame(s), "
                            f"{wait:.3f} s apart (firmware without it, or the line is down)") from None
                    self._resend(body, seq)
                    sent += 1
        finally:
            self._pending.pop(seq, None)
        if isinstance(reply, Nack):
            self.counters["nacks"] += 1
            code = next((c.name for c in NackCode if c == reply.code), str(reply.code))
            raise DriverError(f"MCU refused {kind.name}: {code}")
        return sent

    async def async_allow_power_down(self, allow: bool, after_s: int, reason: int, **kw: Any) -> int:
        """POWER_DOWN_ALLOWED (see `async_command`)."""
        return await self.async_command(PowerDownAllowed(allow, after_s, reason), **kw)

    async def async_set_next_wake(self, wake_in_s: int, reason: int, **kw: Any) -> int:
        """NEXT_WAKE: wake the gateway in `wake_in_s` seconds, 0 cancels (see `async_command`)."""
        return await self.async_command(NextWake(wake_in_s, reason), **kw)

    async def async_send_rail_command(
        self, on: bool | RailAction, timeout: float | None = None  # noqa: ASYNC109
    ) -> None:
        """Send RAIL_COMMAND (True/False = on/off, or a RailAction) and wait for its ACK.
        DriverError on NACK, timeout or disconnect."""
        action = on if isinstance(on, RailAction) else (RailAction.ON if on else RailAction.OFF)
        wait = self.options.ack_timeout_ms / 1000 if timeout is None else timeout
        future: asyncio.Future[Ack | Nack] = asyncio.get_running_loop().create_future()
        seq = self.send(RailCommand(action))
        self._pending[seq] = (MsgType.RAIL_COMMAND, future)
        try:
            async with asyncio.timeout(wait):
                reply = await future
        except TimeoutError:
            self.counters["ack_timeouts"] += 1
            raise DriverError(
                f"MCU did not acknowledge RAIL_COMMAND {action.name} within {wait:.3f} s"
            ) from None
        finally:
            self._pending.pop(seq, None)
        if isinstance(reply, Nack):
            self.counters["nacks"] += 1
            code = next((c.name for c in NackCode if c == reply.code), str(reply.code))
            raise DriverError(f"MCU refused RAIL_COMMAND {action.name}: {code}")

    def _fail_pending(self, reason: str) -> None:
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(DriverError(reason))
        self._pending.clear()
