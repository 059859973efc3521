"""One non-blocking frame read for the CAN buses read on the loop, one function per backend.

`bus.recv(0)` works for every python-can backend, but for the sockets it selects before it
reads: on the loop, which has just been told by epoll that the socket is readable, that is a
second system call per frame, and the drain's last `recv(0)` is a third (an empty select).
python-can's own receive steps are kept as they are; only the select goes:

- socketcan: `capture_message`, python-can's public reader of a raw CAN socket, on the bus's
  public `socket` made non-blocking;
- udp_multicast: the socket's `recvmsg` with the kernel receive timestamp, then python-can's
  `unpack_message`, as `GeneralPurposeUdpMulticastBus.recv` does. python-can 4.6 has no public
  handle on that socket (`bus._multicast._socket`); where it is missing the bus is read through
  `recv(0)`.

A reader returns the next frame, or None when the socket is empty, and raises
`can.CanOperationError` for a broken read or a datagram that is not a frame (counted by the
caller). Only python-can's own bus classes get a backend reader (a subclass may override how it
receives). Frames python-can would not deliver (an FD frame on a classic udp_multicast bus) are
skipped, as `recv` skips them.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import can

FrameReader = Callable[[], "can.Message | None"]


def _socketcan(bus: can.BusABC) -> FrameReader | None:
    from can.interfaces.socketcan.socketcan import SocketcanBus, capture_message

    sock = bus_socket(bus)
    if type(bus) is not SocketcanBus or sock is None:
        return None
    sock.setblocking(False)

    def read() -> can.Message | None:
        try:
            return capture_message(sock)
        except can.CanOperationError as exc:
            if isinstance(exc.__cause__, BlockingIOError):
                return None
            raise

    return read


def _udp_multicast(bus: can.BusABC) -> FrameReader | None:
    from can.interfaces.udp_multicast import UdpMulticastBus
    from can.interfaces.udp_multicast.utils import unpack_message

    if type(bus) is not UdpMulticastBus:
        return None
    multicast: Any = getattr(bus, "_multicast", None)
    sock = bus_socket(bus)
    if sock is None or not getattr(multicast, "timestamp_nanosecond", False):
        return None
    sock.setblocking(False)
    max_buffer = int(multicast.max_buffer)
    ancillary_size = int(multicast.received_ancillary_buffer_size)
    timestamp = struct.Struct(str(multicast.received_timestamp_struct))
    classic_only = getattr(bus, "protocol", can.CanProtocol.CAN_20) is not can.CanProtocol.CAN_FD
    recvmsg = sock.recvmsg

    def read() -> can.Message | None:
        while True:
            try:
                data, ancillary, _flags, _sender = recvmsg(max_buffer, ancillary_size)
            except BlockingIOError:
                return None
            except OSError as exc:
                raise can.CanOperationError(f"Failed to receive from the IP/UDP socket: {exc}") from exc
            if len(ancillary) == 1 and len(ancillary[0][2]) == timestamp.size:
                seconds, nanoseconds = timestamp.unpack(ancillary[0][2])
                stamp = seconds + nanoseconds * 1e-9
            else:  # no kernel timestamp: the read time
                stamp = time.time()
            try:
                msg = unpack_message(data, replace={"timestamp": stamp}, check=True)
            except Exception as exc:  # msgpack and Message raise several types: all are bad input
                raise can.CanOperationError("could not unpack received message") from exc
            if classic_only and msg.is_fd:
                continue
            return msg

    return read


def _slcan(bus: can.BusABC) -> FrameReader | None:
    """slcan reads its serial port with the port's timeout (1 ms by default) once its buffer is
    empty, whatever `recv` is given: the timeout is set to 0, and `recv(0)` reads."""
    port = getattr(bus, "serialPortOrig", None)
    if port is not None and hasattr(port, "timeout"):
        port.timeout = 0
    return None


#: Read errors that say the device behind the fd is gone for good. Linux's CAN_RAW answers the
#: unregistering of its netdev (a USB adapter unplugged, a driver unloaded) with ENODEV on the
#: next read and unbinds the socket (net/can/raw.c `raw_notify`): every later read finds
#: nothing, even once the adapter is back. Only a new bus binds again. ENETDOWN (the interface
#: set down) keeps the binding, and frames come again when it is up: not among these.
_DEVICE_GONE_ERRNOS = frozenset({errno.ENODEV, errno.ENXIO, errno.EBADF})


def device_gone(exc: BaseException) -> bool:
    """Whether a read error says the device behind the bus is gone (the bus must be recreated,
    not read again): an OSError with such an errno, or python-can's CanOperationError carrying
    one (`error_code`) or raised from one."""
    for err in (exc, exc.__cause__):
        if isinstance(err, OSError) and err.errno in _DEVICE_GONE_ERRNOS:
            return True
        if isinstance(err, can.CanOperationError) and err.error_code in _DEVICE_GONE_ERRNOS:
            return True
    return False


def bus_socket(bus: can.BusABC) -> socket.socket | None:
    """The kernel socket a socketcan or udp_multicast bus (or a subclass) reads, else None."""
    for sock in (getattr(bus, "socket", None), getattr(getattr(bus, "_multicast", None), "_socket", None)):
        if isinstance(sock, socket.socket):
            return sock
    return None


#: Linux `SO_MEMINFO` (4.6+; not in Python's socket module): the socket's memory counters, of
#: which `SK_MEMINFO_DROPS` counts the datagrams or frames dropped when its receive buffer was full.
_SO_MEMINFO = 55
_SK_MEMINFO_VARS = 9
_SK_MEMINFO_DROPS = 8


def socket_drops(sock: socket.socket) -> int | None:
    """Frames the kernel dropped on this socket since it was opened (its receive buffer was
    full), or None where the kernel does not say. One getsockopt: it never waits."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, 4 * _SK_MEMINFO_VARS)
    except OSError:
        return None
    if len(raw) < 4 * _SK_MEMINFO_VARS:
        return None
    return int(struct.unpack_from("I", raw, 4 * _SK_MEMINFO_DROPS)[0])


def _sockets_nonblocking(bus: can.BusABC) -> None:
    """`recv(0)` selects before it reads, so it never waits; the socket is switched to
    non-blocking all the same, so that no read can wait should the select and the read ever
    disagree (a subclass of a python-can bus, say)."""
    sock = bus_socket(bus)
    if sock is not None:
        sock.setblocking(False)


_READERS: dict[str, Callable[[can.BusABC], FrameReader | None]] = {
    "socketcan": _socketcan,
    "udp_multicast": _udp_multicast,
    "slcan": _slcan,
}


class LoopRead(NamedTuple):
    read: FrameReader
    #: The frames carry the kernel's receive time (wall clock): the caller can tell the frame
    #: that woke it from frames that queued up while it was busy.
    kernel_stamped: bool


def frame_reader(interface: str, bus: can.BusABC) -> LoopRead:
    """The fastest read python-can allows for this bus that never waits: a backend's own reader
    where one is registered and the bus has what it needs, else `bus.recv(0)` (after the
    backend's set-up for it, as for slcan)."""
    make = _READERS.get(interface)
    reader = make(bus) if make is not None else None
    if reader is not None:
        return LoopRead(reader, kernel_stamped=True)
    _sockets_nonblocking(bus)
    recv = bus.recv
    return LoopRead(lambda: recv(0), kernel_stamped=False)
