"""Companion-MCU serial protocol: pure encode/decode and an incremental, resynchronising parser.

Frame (all multi-byte fields big-endian; full description in docs/mcu-protocol.md):

    SOF 0xA5 0x5A | version (1) | type (1) | seq (1) | length (1) | payload (length) | CRC16 (2)

CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF; `binascii.crc_hqx(data, 0xFFFF)`) over version ..
payload. Resynchronisation is SOF + length: on any error the parser drops one byte and searches
for the next SOF, so a frame following garbage is found again. A valid frame whose payload has
the wrong size for its type is counted as `length`, one with an out-of-range field as
`bad_value`; an unknown type with a good CRC as `unknown_type` (a newer MCU firmware, not line
noise).
"""

from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

SOF = b"\xa5\x5a"
VERSION = 1
HEADER_SIZE = 6  # SOF(2) version type seq length
CRC_SIZE = 2
MAX_PAYLOAD = 64
MAX_FRAME = HEADER_SIZE + MAX_PAYLOAD + CRC_SIZE

#: Error kinds counted by FrameParser (keys of `FrameParser.counters`, besides `frames`).
ERROR_KINDS: tuple[str, ...] = (
    "crc", "length", "version", "unknown_type", "bad_value", "garbage_bytes")


class ProtocolError(ValueError):
    """A payload that does not decode; `kind` is one of ERROR_KINDS."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind


class MsgType(IntEnum):
    HEARTBEAT = 0x01
    WAKE_REQUEST = 0x02
    SLEEP_REQUEST = 0x03
    READINGS = 0x04
    RAIL_COMMAND = 0x10
    POWER_DOWN_ALLOWED = 0x11
    NEXT_WAKE = 0x12
    ACK = 0x7E
    NACK = 0x7F


class StatusFlags(IntFlag):
    """HEARTBEAT status bits."""

    IGNITION_ON = 0x0001
    RAIL_ON = 0x0002
    LOW_BATTERY = 0x0004
    OVER_TEMPERATURE = 0x0008
    WATCHDOG_RESET = 0x0010  # the MCU rebooted from its own watchdog since power-up


class Reason(IntEnum):
    """Why the MCU asks for a wake or a sleep (unknown codes decode as plain ints)."""

    UNSPECIFIED = 0
    IGNITION = 1
    CAN_ACTIVITY = 2
    USER_BUTTON = 3
    TIMER = 4
    DIAGNOSTICS = 5
    LOW_BATTERY = 6
    OVER_TEMPERATURE = 7
    ENERGY_BUDGET = 8  # the 12 V energy budget ran out
    PARKED_TIME = 9  # the longest time awake while parked ran out


class RailAction(IntEnum):
    OFF = 0
    ON = 1
    RESET = 2  # power-cycle the rail


class NackCode(IntEnum):
    UNSPECIFIED = 0
    BAD_ARGUMENT = 1
    BUSY = 2
    FAULT = 3  # the rail did not reach the commanded state


@dataclass(frozen=True, slots=True)
class Heartbeat:
    uptime_ms: int
    status: int

    @property
    def flags(self) -> StatusFlags:
        return StatusFlags(self.status & sum(StatusFlags))


@dataclass(frozen=True, slots=True)
class WakeRequest:
    reason: int


@dataclass(frozen=True, slots=True)
class SleepRequest:
    reason: int


@dataclass(frozen=True, slots=True)
class Readings:
    battery_mv: int
    mcu_temp_dc: int  # 0.1 °C
    accel_temp_dc: int  # 0.1 °C
    rail_mv: int
    rail_ma: int
    rail_mw: int
    rail_on: bool

    def as_signals(self) -> dict[str, float]:
        """SI values by reading name (what `signals.X.mcu = "NAME"` refers to)."""
        return {
            "battery_v": self.battery_mv / 1000,
            "mcu_temp_c": self.mcu_temp_dc / 10,
            "accel_temp_c": self.accel_temp_dc / 10,
            "rail_v": self.rail_mv / 1000,
            "rail_a": self.rail_ma / 1000,
            "rail_w": self.rail_mw / 1000,
            "rail_on": 1.0 if self.rail_on else 0.0,
        }


@dataclass(frozen=True, slots=True)
class RailCommand:
    action: RailAction


@dataclass(frozen=True, slots=True)
class PowerDownAllowed:
    """GW -> MCU: the gateway may be powered down `after_s` seconds after the ACK (allow=True),
    or not any more (allow=False: a pending power-down is cancelled)."""

    allow: bool
    after_s: int
    reason: int


#: NEXT_WAKE.wake_in_s above this is out of range (the MCU compares millisecond times modulo
#: 2^32, valid below 2^31 ms, about 24.8 days).
MAX_WAKE_IN_S = 2_000_000


@dataclass(frozen=True, slots=True)
class NextWake:
    """GW -> MCU: wake the gateway in `wake_in_s` seconds (0 cancels a scheduled wake)."""

    wake_in_s: int
    reason: int


@dataclass(frozen=True, slots=True)
class Ack:
    acked_seq: int
    acked_type: int


@dataclass(frozen=True, slots=True)
class Nack:
    acked_seq: int
    acked_type: int
    code: int


Body = (Heartbeat | WakeRequest | SleepRequest | Readings | RailCommand | PowerDownAllowed | NextWake
        | Ack | Nack)


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded frame: its sequence number and its body."""

    seq: int
    body: Body


_LAYOUT: dict[MsgType, struct.Struct] = {
    MsgType.HEARTBEAT: struct.Struct(">IH"),
    MsgType.WAKE_REQUEST: struct.Struct(">B"),
    MsgType.SLEEP_REQUEST: struct.Struct(">B"),
    MsgType.READINGS: struct.Struct(">HhhHHIB"),
    MsgType.RAIL_COMMAND: struct.Struct(">B"),
    MsgType.POWER_DOWN_ALLOWED: struct.Struct(">BHB"),
    MsgType.NEXT_WAKE: struct.Struct(">IB"),
    MsgType.ACK: struct.Struct(">BB"),
    MsgType.NACK: struct.Struct(">BBB"),
}
_TYPE_OF: dict[type, MsgType] = {
    Heartbeat: MsgType.HEARTBEAT,
    WakeRequest: MsgType.WAKE_REQUEST,
    SleepRequest: MsgType.SLEEP_REQUEST,
    Readings: MsgType.READINGS,
    RailCommand: MsgType.RAIL_COMMAND,
    PowerDownAllowed: MsgType.POWER_DOWN_ALLOWED,
    NextWake: MsgType.NEXT_WAKE,
    Ack: MsgType.ACK,
    Nack: MsgType.NACK,
}
_KNOWN_TYPES = frozenset(int(t) for t in MsgType)


def crc16(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/CCITT-FALSE (check value 0x29B1 for b"123456789")."""
    return binascii.crc_hqx(data, 0xFFFF)


def message_type(body: Body) -> MsgType:
    return _TYPE_OF[type(body)]


def encode_payload(body: Body) -> bytes:
    layout = _LAYOUT[message_type(body)]
    match body:
        case Heartbeat(uptime_ms, status):
            return layout.pack(uptime_ms & 0xFFFFFFFF, status)
        case WakeRequest(reason) | SleepRequest(reason):
            return layout.pack(reason)
        case Readings(bat, t_mcu, t_acc, mv, ma, mw, on):
            return layout.pack(bat, t_mcu, t_acc, mv, ma, mw, 1 if on else 0)
        case RailCommand(action):
            return layout.pack(int(action))
        case PowerDownAllowed(allow, after_s, reason):
            return layout.pack(1 if allow else 0, after_s, reason)
        case NextWake(wake_in_s, reason):
            return layout.pack(wake_in_s, reason)
        case Ack(seq, mtype):
            return layout.pack(seq, mtype)
        case Nack(seq, mtype, code):
            return layout.pack(seq, mtype, code)
    raise TypeError(f"not a message body: {body!r}")  # pragma: no cover


def encode(body: Body, seq: int, *, version: int = VERSION) -> bytes:
    """A complete frame. `version` is only for tests that need a wrong one."""
    payload = encode_payload(body)
    inner = bytes((version, message_type(body), seq & 0xFF, len(payload))) + payload
    return SOF + inner + crc16(inner).to_bytes(2, "big")


def decode_payload(mtype: int, payload: bytes) -> Body:
    """Decode the payload of a frame whose CRC was good."""
    if mtype not in _KNOWN_TYPES:
        raise ProtocolError("unknown_type", f"message type 0x{mtype:02x}")
    kind = MsgType(mtype)
    layout = _LAYOUT[kind]
    if len(payload) != layout.size:
        raise ProtocolError(
            "length", f"{kind.name} payload is {len(payload)} bytes, expected {layout.size}")
    values = layout.unpack(payload)
    if kind is MsgType.HEARTBEAT:
        return Heartbeat(*values)
    if kind is MsgType.WAKE_REQUEST:
        return WakeRequest(values[0])
    if kind is MsgType.SLEEP_REQUEST:
        return SleepRequest(values[0])
    if kind is MsgType.READINGS:
        bat, t_mcu, t_acc, mv, ma, mw, on = values
        return Readings(bat, t_mcu, t_acc, mv, ma, mw, rail_on=bool(on))
    if kind is MsgType.RAIL_COMMAND:
        try:
            return RailCommand(RailAction(values[0]))
        except ValueError:
            raise ProtocolError("bad_value", f"rail action {values[0]} out of range") from None
    if kind is MsgType.POWER_DOWN_ALLOWED:
        allow, after_s, reason = values
        if allow > 1:
            raise ProtocolError("bad_value", f"POWER_DOWN_ALLOWED allow {allow} out of range")
        return PowerDownAllowed(bool(allow), after_s, reason)
    if kind is MsgType.NEXT_WAKE:
        if values[0] > MAX_WAKE_IN_S:
            raise ProtocolError("bad_value", f"NEXT_WAKE wake_in_s {values[0]} over {MAX_WAKE_IN_S}")
        return NextWake(*values)
    if kind is MsgType.ACK:
        return Ack(*values)
    return Nack(*values)


class FrameParser:
    """Incremental parser: `feed(chunk)` returns the messages completed by it.

    Never raises on input; every byte not part of a good frame is counted in
    `garbage_bytes`, every rejected frame candidate by its kind. The buffer never holds more
    than one maximal frame (MAX_FRAME - 1 bytes) between calls."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.counters: dict[str, int] = dict.fromkeys(("frames", *ERROR_KINDS), 0)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        """Forget a partial frame (after a reconnect the rest of it will never come)."""
        self.counters["garbage_bytes"] += len(self._buf)
        self._buf.clear()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        buf = self._buf
        while True:
            start = buf.find(SOF)
            if start < 0:
                # Keep a trailing first SOF byte: its partner may be in the next chunk.
                keep = 1 if buf.endswith(SOF[:1]) else 0
                self._drop(len(buf) - keep)
                break
            if start:
                self._drop(start)
            if len(buf) < HEADER_SIZE:
                break
            version, mtype, seq, length = buf[2], buf[3], buf[4], buf[5]
            if version != VERSION:
                self._reject("version")
                continue
            if length > MAX_PAYLOAD:
                self._reject("length")
                continue
            end = HEADER_SIZE + length + CRC_SIZE
            if len(buf) < end:
                break
            inner = bytes(buf[2 : HEADER_SIZE + length])
            if crc16(inner) != int.from_bytes(buf[end - CRC_SIZE : end], "big"):
                self._reject("crc")
                continue
            try:
                body = decode_payload(mtype, bytes(buf[HEADER_SIZE : HEADER_SIZE + length]))
            except ProtocolError as exc:
                # CRC was good: the frame is real, just not for us. Skip all of it.
                self.counters[exc.kind] += 1
                self._drop(end)
                continue
            del buf[:end]
            self.counters["frames"] += 1
            out.append(Message(seq, body))
        return out

    def _drop(self, n: int) -> None:
        if n > 0:
            del self._buf[:n]
            self.counters["garbage_bytes"] += n

    def _reject(self, kind: str) -> None:
        """A bad candidate at the buffer head: count it and skip its SOF's first byte."""
        self.counters[kind] += 1
        self._drop(1)
