"""The UDP transport around the SOME/IP-SD client state machine (`drivers/someip_sd.py`).

Two sockets, both on the SD port:
- unicast: bound to the endpoint's host; everything we send leaves from it (so servers answer
  to it), multicast sent out of the host's interface (IP_MULTICAST_IF);
- multicast (unless `sd.unicast_only`): bound to the group, joined on the host's interface,
  receiving the servers' multicast offers. Our own looped-back multicast is recognised by its
  source address and dropped by the state machine.

One task runs the state machine's timers: it sleeps until `next_deadline()` or until a datagram
has changed the state, whichever comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

from .someip_sd import SdClient, Send

_LOG = logging.getLogger(__name__)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: SdTransport, multicast: bool) -> None:
        self._owner = owner
        self._multicast = multicast

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._owner._on_datagram(data, (str(addr[0]), int(addr[1])), self._multicast)

    def error_received(self, exc: Exception) -> None:
        self._owner.socket_errors += 1
        _LOG.warning("SOME/IP-SD socket error: %s", exc)


class SdTransport:
    def __init__(self, client: SdClient, host: str) -> None:
        self.client = client
        self.host = host
        self.socket_errors = 0
        self._unicast: asyncio.DatagramTransport | None = None
        self._multicast: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def local_address(self) -> tuple[str, int]:
        if self._unicast is None:
            raise RuntimeError("SD transport not started")
        host, port = self._unicast.get_extra_info("sockname")[:2]
        return str(host), int(port)

    async def async_start(self, endpoint: tuple[str, int]) -> None:
        """`endpoint`: the (host, port) our notifications arrive on."""
        loop = asyncio.get_running_loop()
        options = self.client.options
        unicast_sock = self._unicast_socket(options.port)
        try:
            self._unicast, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self, False), sock=unicast_sock)
        except BaseException:
            unicast_sock.close()
            raise
        try:
            if options.multicast_group is not None:
                port = self.local_address[1]  # the same port, also when the config says 0
                mcast_sock = self._multicast_socket(options.multicast_group, port)
                try:
                    self._multicast, _ = await loop.create_datagram_endpoint(
                        lambda: _Protocol(self, True), sock=mcast_sock)
                except BaseException:
                    mcast_sock.close()
                    raise
            self._emit(self.client.start(time.monotonic(), endpoint, self.local_address))
        except BaseException:
            await self.async_close()
            raise
        self._task = asyncio.create_task(self._run(), name="someip-sd")
        _LOG.info("SOME/IP-SD on udp %s:%d%s", *self.local_address,
                  f", multicast {options.multicast_group}" if options.multicast_group else "")

    def _unicast_socket(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, port))
            if self.client.options.multicast_group is not None:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(self.host))
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)  # servers on this host
        except OSError:
            sock.close()
            raise
        return sock

    def _multicast_socket(self, group: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Bound to the group: only datagrams sent to it arrive here, not unicast.
            sock.bind((group, port))
            mreq = socket.inet_aton(group) + socket.inet_aton(self.host)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        except OSError:
            sock.close()
            raise
        return sock

    def _on_datagram(self, data: bytes, source: tuple[str, int], multicast: bool) -> None:
        try:
            sends = self.client.handle_datagram(data, source, multicast=multicast, now=time.monotonic())
        except Exception:  # a state-machine bug must not kill the endpoint; bad input never gets here
            _LOG.exception("SOME/IP-SD: handling a datagram from %s:%d failed", *source)
            return
        self._emit(sends)
        self._changed.set()

    def _emit(self, sends: list[Send]) -> None:
        if self._unicast is None:
            return
        for send in sends:
            try:
                self._unicast.sendto(send.data, send.destination)
            except OSError as exc:
                self.socket_errors += 1
                _LOG.warning("SOME/IP-SD: sending to %s:%d failed: %s", *send.destination, exc)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._changed.clear()  # before the poll: a datagram handled after it wakes the wait below
            self._emit(self.client.poll(time.monotonic()))
            deadline = self.client.next_deadline()
            # asyncio.timeout, not wait_for: on 3.11 a cancel racing wait_for's inner task can hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(None if deadline is None else loop.time() + deadline - time.monotonic()):
                    await self._changed.wait()

    async def async_close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for transport in (self._multicast, self._unicast):
            if transport is not None:
                transport.close()
        self._multicast = self._unicast = None
