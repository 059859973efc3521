"""drivers/can_read.py: the loop's non-blocking frame reads give what python-can's `recv` gives,
on real buses (udp_multicast on loopback, virtual), and never wait."""

from __future__ import annotations

import errno
import socket
import time

import can

from cerebellumd.drivers.can_read import device_gone, frame_reader

from .helpers import free_port

GROUP = "239.74.163.10"


def udp_pair(fd: bool) -> tuple[can.BusABC, can.BusABC, int]:
    port = free_port(socket.SOCK_DGRAM)
    rx = can.Bus(interface="udp_multicast", channel=GROUP, port=port, fd=fd)
    tx = can.Bus(interface="udp_multicast", channel=GROUP, port=port, fd=True)
    return rx, tx, port


def read_within(read, seconds: float = 5.0) -> can.Message:
    """The next frame (datagrams on loopback are not there at once: poll with a deadline)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        msg = read()
        if msg is not None:
            return msg
        time.sleep(0.001)
    raise AssertionError(f"no frame within {seconds} s")


def test_udp_multicast_reader_gives_what_recv_gives() -> None:
    rx, tx, _ = udp_pair(fd=True)
    try:
        read, stamped = frame_reader("udp_multicast", rx)
        assert stamped
        assert read() is None  # empty: returns at once
        sent = [
            can.Message(arbitration_id=0x123, data=b"\x01\x02", is_extended_id=False),
            can.Message(arbitration_id=0x18FEF100, data=bytes(range(8)), is_extended_id=True),
            can.Message(arbitration_id=0x7FF, data=bytes(range(64)), is_fd=True, bitrate_switch=True,
                        is_extended_id=False),
        ]
        for msg in sent:
            tx.send(msg)
        got = [read_within(read) for _ in sent]
        for want, msg in zip(sent, got, strict=True):
            assert (msg.arbitration_id, msg.is_extended_id, msg.is_fd, msg.bitrate_switch, bytes(msg.data)) == (
                want.arbitration_id, want.is_extended_id, want.is_fd, want.bitrate_switch, bytes(want.data))
            assert abs(msg.timestamp - time.time()) < 5  # the kernel's receive time, wall clock
        assert read() is None
    finally:
        rx.shutdown()
        tx.shutdown()


def test_udp_multicast_reader_skips_fd_frames_on_a_classic_bus_as_recv_does() -> None:
    rx, tx, _ = udp_pair(fd=False)
    try:
        read, _ = frame_reader("udp_multicast", rx)
        tx.send(can.Message(arbitration_id=0x100, data=bytes(64), is_fd=True, is_extended_id=False))
        tx.send(can.Message(arbitration_id=0x101, data=b"\x05", is_extended_id=False))
        msg = read_within(read)
        assert msg.arbitration_id == 0x101
    finally:
        rx.shutdown()
        tx.shutdown()


def test_udp_multicast_reader_raises_can_error_on_garbage_and_reads_on() -> None:
    rx, tx, port = udp_pair(fd=False)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        read, _ = frame_reader("udp_multicast", rx)
        raw.sendto(b"\xc1 not msgpack", (GROUP, port))
        tx.send(can.Message(arbitration_id=0x102, data=b"\x07", is_extended_id=False))
        deadline = time.monotonic() + 5
        errors, msg = 0, None
        while msg is None and time.monotonic() < deadline:
            try:
                msg = read()
            except can.CanOperationError:
                errors += 1
        assert errors == 1
        assert msg is not None and msg.arbitration_id == 0x102
    finally:
        raw.close()
        rx.shutdown()
        tx.shutdown()


def test_other_backends_read_through_recv_zero() -> None:
    rx = can.Bus(interface="virtual", channel="test-can-read")
    tx = can.Bus(interface="virtual", channel="test-can-read")
    try:
        read, stamped = frame_reader("virtual", rx)
        assert not stamped
        assert read() is None
        tx.send(can.Message(arbitration_id=0x55, data=b"\x09", is_extended_id=False))
        msg = read_within(read)
        assert (msg.arbitration_id, bytes(msg.data)) == (0x55, b"\x09")
    finally:
        rx.shutdown()
        tx.shutdown()


def test_subclass_of_a_python_can_bus_reads_through_its_own_recv() -> None:
    """A bus class that overrides how it receives keeps that (the fast reader is for python-can's
    own classes only)."""
    from can.interfaces.udp_multicast import UdpMulticastBus

    port = free_port(socket.SOCK_DGRAM)

    class Counting(UdpMulticastBus):
        reads = 0

        def _recv_internal(self, timeout: float | None):  # type: ignore[no-untyped-def]
            Counting.reads += 1
            return super()._recv_internal(timeout)

    rx = Counting(channel=GROUP, port=port)
    tx = can.Bus(interface="udp_multicast", channel=GROUP, port=port)
    try:
        read, stamped = frame_reader("udp_multicast", rx)
        assert not stamped
        tx.send(can.Message(arbitration_id=0x66, data=b"", is_extended_id=False))
        assert read_within(read).arbitration_id == 0x66
        assert Counting.reads >= 1
    finally:
        rx.shutdown()
        tx.shutdown()


def test_a_reader_is_registered_for_every_loop_read_interface() -> None:
    from cerebellumd.daemon.ingest import _LOOP_READ_INTERFACES
    from cerebellumd.drivers.can_read import _READERS

    assert set(_READERS) == set(_LOOP_READ_INTERFACES)


def test_only_errors_that_say_the_device_is_gone_recreate_the_bus() -> None:
    def raised_from(cause: OSError) -> can.CanOperationError:
        try:
            raise can.CanOperationError("Error receiving") from cause
        except can.CanOperationError as exc:
            return exc

    for gone in (OSError(errno.ENODEV, "No such device"), can.CanOperationError("Error receiving", errno.ENODEV),
                 raised_from(OSError(errno.ENXIO, "No such device or address")), OSError(errno.EBADF, "closed")):
        assert device_gone(gone), gone
    for kept in (OSError(errno.ENETDOWN, "Network is down"), raised_from(BlockingIOError(errno.EAGAIN, "again")),
                 can.CanOperationError("could not unpack received message"), ValueError("bad datagram"),
                 can.CanOperationError("Error receiving", errno.ENETDOWN)):
        assert not device_gone(kept), kept
