"""SOME/IP notifications over UDP: header parsing, payload fields mapped to named signals.

Only what a power manager needs from automotive Ethernet: it listens to events (notifications)
that other ECUs publish and turns configured payload fields into signal samples. No service
discovery and no requests: the service/event ids and the payload layout come from the config
(the same facts an ARXML or FIDL file would give).

Header layout (16 bytes, big-endian, AUTOSAR PRS_SOMEIP):

    message id  = service id (16) | method/event id (16)
    length (32) = 8 + payload length (covers request id .. end of payload)
    request id  = client id (16) | session id (16)
    protocol version (8, must be 1) | interface version (8) | message type (8) | return code (8)

One UDP datagram may carry several SOME/IP messages back to back; `iter_messages` splits them.
Bad input never raises out of the decoder or the receiver: it is counted by kind.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

from .base import options_of
from .someip_options import ERROR_KINDS, SomeIpFieldSpec, SomeIpOptions

_LOG = logging.getLogger(__name__)

HEADER_SIZE = 16
#: Bytes of the header that the length field covers (request id .. return code).
_LENGTH_COVERED = 8
PROTOCOL_VERSION = 1
_HEADER = struct.Struct(">HHIHHBBBB")


class MessageType(IntEnum):
    REQUEST = 0x00
    REQUEST_NO_RETURN = 0x01
    NOTIFICATION = 0x02
    RESPONSE = 0x80
    ERROR = 0x81
    TP_REQUEST = 0x20
    TP_REQUEST_NO_RETURN = 0x21
    TP_NOTIFICATION = 0x22
    TP_RESPONSE = 0xA0
    TP_ERROR = 0xA1


_KNOWN_TYPES = frozenset(int(t) for t in MessageType)



class SomeIpError(ValueError):
    """A malformed SOME/IP message; `kind` is one of ERROR_KINDS."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SomeIpHeader:
    service_id: int
    method_id: int
    length: int
    client_id: int
    session_id: int
    protocol_version: int
    interface_version: int
    message_type: MessageType
    return_code: int

    @property
    def message_id(self) -> int:
        return (self.service_id << 16) | self.method_id

    @property
    def request_id(self) -> int:
        return (self.client_id << 16) | self.session_id

    @property
    def payload_length(self) -> int:
        return self.length - _LENGTH_COVERED

    @property
    def is_event(self) -> bool:
        """Event/notification ids have the top bit of the method id set."""
        return bool(self.method_id & 0x8000)


def _parse_header(data: bytes | memoryview, *, exact: bool) -> SomeIpHeader:
    if len(data) < HEADER_SIZE:
        raise SomeIpError("short", f"{len(data)} bytes, a header needs {HEADER_SIZE}")
    service, method, length, client, session, proto, iface, mtype, rc = _HEADER.unpack_from(data)
    if length < _LENGTH_COVERED:
        raise SomeIpError("length", f"length field {length} < {_LENGTH_COVERED}")
    available = len(data) - _LENGTH_COVERED
    if (exact and length != available) or length > available:
        raise SomeIpError(
            "length", f"length field {length} but {available} bytes follow the length field"
        )
    if proto != PROTOCOL_VERSION:
        raise SomeIpError("version", f"protocol version {proto}, expected {PROTOCOL_VERSION}")
    if mtype not in _KNOWN_TYPES:
        raise SomeIpError("type", f"unknown message type 0x{mtype:02x}")
    return SomeIpHeader(
        service_id=service,
        method_id=method,
        length=length,
        client_id=client,
        session_id=session,
        protocol_version=proto,
        interface_version=iface,
        message_type=MessageType(mtype),
        return_code=rc,
    )


def parse_packet(data: bytes) -> tuple[SomeIpHeader, bytes]:
    """Parse exactly one SOME/IP message: the length field must match the data."""
    header = _parse_header(data, exact=True)
    return header, bytes(data[HEADER_SIZE:])


def iter_messages(datagram: bytes) -> Iterator[tuple[SomeIpHeader, bytes]]:
    """Split a UDP datagram into its SOME/IP messages. Raises SomeIpError at the first bad
    one (the messages before it have been yielded: the length field is the only framing, so
    nothing after a bad header can be trusted)."""
    view = memoryview(datagram)
    pos = 0
    while pos < len(view):
        header = _parse_header(view[pos:], exact=False)
        end = pos + _LENGTH_COVERED + header.length
        yield header, bytes(view[pos + HEADER_SIZE : end])
        pos = end


def build_message(
    service_id: int,
    method_id: int,
    payload: bytes,
    *,
    client_id: int = 0,
    session_id: int = 1,
    interface_version: int = 1,
    message_type: MessageType | int = MessageType.NOTIFICATION,
    return_code: int = 0,
    protocol_version: int = PROTOCOL_VERSION,
) -> bytes:
    """Encode one SOME/IP message (any type; tests use the odd arguments to make bad ones)."""
    header = _HEADER.pack(
        service_id,
        method_id,
        _LENGTH_COVERED + len(payload),
        client_id,
        session_id,
        protocol_version,
        interface_version,
        int(message_type),
        return_code,
    )
    return header + payload


def build_notification(
    service_id: int,
    event_id: int,
    payload: bytes,
    *,
    session_id: int = 1,
    interface_version: int = 1,
) -> bytes:
    """Encode a NOTIFICATION (what the plant and the tests send)."""
    return build_message(
        service_id,
        event_id,
        payload,
        session_id=session_id,
        interface_version=interface_version,
        message_type=MessageType.NOTIFICATION,
    )


# -- payload fields ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _CompiledField:
    signal: str
    offset: int
    codec: struct.Struct
    scale: float
    offset_value: float


def encode_payload(fields: Sequence[SomeIpFieldSpec], values: Mapping[str, float]) -> bytes:
    """Build a payload holding `values` (by field name) at the fields' offsets (plant/tests).
    Inverse of the decoder's scaling; integers are rounded."""
    size = max((f.offset + f.struct.size for f in fields), default=0)
    buf = bytearray(size)
    for f in fields:
        if f.field not in values:
            continue
        raw = (values[f.field] - f.offset_value) / f.scale
        value: float | int = raw if f.type in ("f32", "f64") else round(raw)
        f.struct.pack_into(buf, f.offset, value)
    return bytes(buf)


class SomeIpDecoder:
    """Maps packets to {signal: value} for the configured notifications; counts bad input."""

    def __init__(self, fields: Sequence[SomeIpFieldSpec]) -> None:
        self._by_message: dict[tuple[int, int], list[_CompiledField]] = {}
        for f in fields:
            self._by_message.setdefault((f.service_id, f.event_id), []).append(
                _CompiledField(f.signal, f.offset, f.struct, f.scale, f.offset_value)
            )
        self.counters: dict[str, int] = dict.fromkeys(("messages", *ERROR_KINDS), 0)

    def decode(self, datagram: bytes) -> dict[str, float]:
        """All samples found in a datagram; errors are counted, never raised."""
        samples: dict[str, float] = {}
        try:
            for header, payload in iter_messages(datagram):
                self._decode_message(header, payload, samples)
        except SomeIpError as exc:
            self.counters[exc.kind] += 1
            _LOG.debug("bad SOME/IP datagram: %s", exc)
        return samples

    def _decode_message(
        self, header: SomeIpHeader, payload: bytes, samples: dict[str, float]
    ) -> None:
        fields = self._by_message.get((header.service_id, header.method_id))
        if fields is None or header.message_type is not MessageType.NOTIFICATION:
            self.counters["unknown_message"] += 1
            return
        self.counters["messages"] += 1
        for f in fields:
            if f.offset + f.codec.size > len(payload):
                self.counters["field_out_of_range"] += 1
                continue
            (raw,) = f.codec.unpack_from(payload, f.offset)
            value = float(raw) * f.scale + f.offset_value
            if not math.isfinite(value):
                self.counters["non_finite"] += 1
                continue
            samples[f.signal] = value


SampleCallback = Callable[[dict[str, float], float], None]


class _ReceiverProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: SomeIpReceiver) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._owner._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        self._owner.counters["socket_errors"] += 1
        _LOG.warning("SOME/IP socket error: %s", exc)


class SomeIpReceiver:
    """asyncio UDP endpoint: calls `callback(samples, monotonic_time)` for each datagram that
    yields at least one sample; bad datagrams are counted (`counters`) and dropped."""

    def __init__(self, options: SomeIpOptions | Mapping[str, object], callback: SampleCallback):
        self.options = options_of(SomeIpOptions, options)
        self.decoder = SomeIpDecoder(self.options.fields)
        self._callback = callback
        self._transport: asyncio.DatagramTransport | None = None
        self.counters: dict[str, int] = {"datagrams": 0, "socket_errors": 0, "callback_errors": 0}

    @property
    def error_counters(self) -> dict[str, int]:
        """Decoder counters (messages and error kinds) merged with the socket's."""
        return {**self.decoder.counters, **self.counters}

    @property
    def bound(self) -> bool:
        return self._transport is not None

    @property
    def local_address(self) -> tuple[str, int]:
        if self._transport is None:
            raise RuntimeError("receiver not started")
        host, port = self._transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    async def async_start(self) -> None:
        if self._transport is not None:
            return
        loop = asyncio.get_running_loop()
        sock = self._make_socket()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _ReceiverProtocol(self), sock=sock
        )
        self._transport = transport

    def _make_socket(self) -> socket.socket:
        opts = self.options
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            # A multicast receiver binds the group address itself: Linux then delivers only
            # datagrams sent to that group, not unicast from any interface.
            sock.bind((opts.host if opts.multicast_group is None else opts.multicast_group, opts.port))
            if opts.multicast_group is not None:
                mreq = socket.inet_aton(opts.multicast_group) + socket.inet_aton(
                    opts.multicast_interface
                )
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        except OSError:
            sock.close()
            raise
        return sock

    def _on_datagram(self, data: bytes) -> None:
        self.counters["datagrams"] += 1
        samples = self.decoder.decode(data)
        if not samples:
            return
        try:
            self._callback(samples, time.monotonic())
        except Exception:  # a consumer bug must not kill the endpoint
            self.counters["callback_errors"] += 1
            _LOG.exception("SOME/IP sample callback failed")

    async def async_close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
