"""SOME/IP-SD against an independent implementation: scapy's SOME/IP and SD layers
(scapy.contrib.automotive.someip) play the ECU on loopback UDP against a running daemon.

The ECU answers with what scapy builds (OfferService with its endpoint option,
SubscribeEventgroupAck / Nack copying the subscribe's fields, notifications) and decodes what
the daemon sends with scapy's dissectors. Covered: offer -> subscribe -> ack -> notifications
become samples; a NACK then the retry acknowledged; a server reboot (reboot flag, session id
back to 1) -> resubscribed; malformed and wrong-version SD messages counted and ignored;
multicast SD on the lo interface where the kernel allows it; a reload with SD on."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.contrib.automotive.someip import (
    SD,
    SOMEIP,
    SDEntry_EventGroup,
    SDEntry_Service,
    SDOption_IP4_EndPoint,
)
from scapy.packet import Raw

from cerebellumd.config import parse_config
from cerebellumd.daemon.runtime import Daemon
from cerebellumd.daemon.sources import SomeIpSource

from .helpers import free_port, until

SERVICE, INSTANCE, MAJOR, EVENTGROUP, EVENT = 0x1234, 0x0001, 1, 0x0010, 0x8001

BASE = """
[daemon]
initial_state = "idle"
[prometheus]
enabled = false
[policy]
release_ms = 300
min_dwell_ms = 0

[signals.obstacle]
someip = "adas.obstacle_m"
max_age_ms = 5000
"""

ENDPOINT = """
[[someip]]
name = "adas"
host = "127.0.0.1"
port = 0
[[someip.fields]]
notification = "adas"
service_id = 0x1234
event_id = 0x8001
field = "obstacle_m"
offset = 0
type = "u16"
scale = 0.01

[someip.sd]
port = {sd_port}
{transport}
initial_delay_min_ms = 0
initial_delay_max_ms = 100
repetitions_base_delay_ms = 10
repetitions_max = 3
subscribe_retry_ms = 300
[[someip.sd.services]]
service_id = 0x1234
instance_id = 0x0001
major_version = 1
eventgroups = [{eventgroups}]
ttl_s = 3
"""


class ScapyEcu(asyncio.DatagramProtocol):
    """A SOME/IP-SD server made of scapy's packets, on a loopback UDP socket."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[SOMEIP, SD | None, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None
        self.session = 0
        self.reboot = True
        self.sessions_seen: list[int] = []  # session ids of the SD messages received

    @classmethod
    async def start(cls, sock: socket.socket | None = None) -> ScapyEcu:
        ecu = cls()
        loop = asyncio.get_running_loop()
        if sock is None:
            await loop.create_datagram_endpoint(lambda: ecu, local_addr=("127.0.0.1", 0))
        else:
            await loop.create_datagram_endpoint(lambda: ecu, sock=sock)
        return ecu

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        header = SOMEIP(data)
        # scapy 2.8 leaves the SOME/IP payload as Raw in `data`: the SD part is dissected on its own.
        sd = SD(data[16:]) if SOMEIP._is_sd(data) else None
        if sd is not None:
            self.sessions_seen.append(header.session_id)
        self.inbox.put_nowait((header, sd, (str(addr[0]), int(addr[1]))))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- sending -------------------------------------------------------------------------------

    def next_session(self) -> int:
        self.session += 1
        if self.session > 0xFFFF:
            self.session, self.reboot = 1, False
        return self.session

    def send_sd(self, destination: tuple[str, int], entries: list[object], options: list[object] = (),  # type: ignore[assignment]
                **someip: int) -> None:
        sd = SD(flags=0xC0 if self.reboot else 0x40)
        sd.set_entryArray(list(entries))
        if options:
            sd.set_optionArray(list(options))
        self.send_raw(destination, bytes(SOMEIP(session_id=self.next_session(), **someip) / sd))

    def send_raw(self, destination: tuple[str, int], data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, destination)

    def offer(self, destination: tuple[str, int], ttl: int = 30) -> None:
        entry = SDEntry_Service(type=0x01, srv_id=SERVICE, inst_id=INSTANCE, major_ver=MAJOR, ttl=ttl, minor_ver=0,
                                index_1=0, n_opt_1=1)
        option = SDOption_IP4_EndPoint(addr="127.0.0.1", l4_proto=0x11, port=self.address[1])
        self.send_sd(destination, [entry], [option])

    def answer(self, destination: tuple[str, int], subscribe: SDEntry_EventGroup, *, ack: bool) -> None:
        """SubscribeEventgroupAck (Nack: TTL 0) with the subscribe's fields (PRS_SOMEIPSD_00391)."""
        entry = SDEntry_EventGroup(type=0x07, srv_id=subscribe.srv_id, inst_id=subscribe.inst_id,
                                   major_ver=subscribe.major_ver, ttl=subscribe.ttl if ack else 0,
                                   cnt=subscribe.cnt, eventgroup_id=subscribe.eventgroup_id)
        self.send_sd(destination, [entry])

    def notify(self, destination: tuple[str, int], obstacle_cm: int) -> None:
        packet = SOMEIP(srv_id=SERVICE, sub_id=EVENT, client_id=0, session_id=1, iface_ver=MAJOR,
                        msg_type=SOMEIP.TYPE_NOTIFICATION) / Raw(load=obstacle_cm.to_bytes(2, "big"))
        self.send_raw(destination, bytes(packet))

    def reboot_now(self) -> None:
        self.session, self.reboot = 0, True

    # -- receiving -----------------------------------------------------------------------------

    async def expect(self, entry_type: int, timeout: float = 10.0) -> tuple[SOMEIP, SD, object, tuple[str, int]]:
        """The next SD message from the daemon holding an entry of `entry_type` (others skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                header, sd, source = await self.inbox.get()
                if sd is None:
                    continue
                for entry in sd.entry_array:
                    if entry.type == entry_type:
                        return header, sd, entry, source

    def drain(self) -> None:
        while not self.inbox.empty():
            self.inbox.get_nowait()


@dataclass
class Rig:
    daemon: Daemon
    ecu: ScapyEcu

    @property
    def source(self) -> SomeIpSource:
        return next(p for p in self.daemon.parts if isinstance(p, SomeIpSource))

    def metric(self, name: str, **labels: str) -> float:
        value = self.daemon.metrics.registry.get_sample_value(name, {"endpoint": "adas", **labels})
        return -1.0 if value is None else value

    def subscribed(self) -> float:
        return self.metric("cerebellumd_someip_sd_subscribed", service="0x1234", instance="0x0001",
                           eventgroup="0x0010")

    def sd_errors(self, kind: str) -> float:
        return self.metric("cerebellumd_someip_sd_errors_total", kind=kind)

    def first_notifications(self) -> float:
        return self.metric("cerebellumd_someip_sd_first_notification_seconds_count")


def config_text(transport: str, *, sd_port: int = 0, eventgroups: str = "0x0010") -> str:
    return BASE + ENDPOINT.format(sd_port=sd_port, transport=transport, eventgroups=eventgroups)


@contextlib.asynccontextmanager
async def running(text: str, ecu: ScapyEcu) -> AsyncIterator[Rig]:
    daemon = await Daemon.async_create(await asyncio.to_thread(parse_config, text))
    await daemon.async_start()
    try:
        yield Rig(daemon, ecu)
    finally:
        await daemon.async_stop()
        ecu.close()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    ecu = await ScapyEcu.start()
    text = config_text(f'unicast_only = true\npeers = ["127.0.0.1:{ecu.address[1]}"]')
    async with running(text, ecu) as r:
        yield r


async def subscribe_and_ack(r: Rig, sd_address: tuple[str, int] | None = None) -> tuple[str, int]:
    """Offer, take the subscribe, ack it; returns the daemon's SD address."""
    if sd_address is None:
        _, _, _, sd_address = await r.ecu.expect(0x00)  # FindService
    r.ecu.offer(sd_address)
    _, _, subscribe, source = await r.ecu.expect(0x06)
    assert source == sd_address
    r.ecu.answer(sd_address, subscribe, ack=True)
    await until(lambda: r.subscribed() == 1, 5, "subscribed")
    return sd_address


# -- the scenarios -------------------------------------------------------------------------------


async def test_offer_subscribe_ack_then_notifications_become_samples(rig: Rig) -> None:
    r = rig
    header, sd, find, sd_address = await r.ecu.expect(0x00)
    # Our FindService, as scapy reads it.
    assert (header.srv_id, header.sub_id, header.client_id, header.proto_ver, header.iface_ver, header.msg_type,
            header.retcode) == (0xFFFF, 0x8100, 0, 1, 1, 0x02, 0)
    assert header.session_id == 1 and sd.flags.REBOOT and sd.flags.UNICAST
    assert (find.srv_id, find.inst_id, find.major_ver, find.ttl) == (SERVICE, INSTANCE, MAJOR, 3)
    assert sd_address == r.source.sd.local_address  # type: ignore[union-attr]
    assert r.subscribed() == 0

    r.ecu.offer(sd_address)
    header, sd, subscribe, _ = await r.ecu.expect(0x06)
    assert (subscribe.srv_id, subscribe.inst_id, subscribe.major_ver, subscribe.ttl, subscribe.eventgroup_id) == (
        SERVICE, INSTANCE, MAJOR, 3, EVENTGROUP)
    (endpoint,) = sd.option_array[subscribe.index_1:subscribe.index_1 + subscribe.n_opt_1]
    assert isinstance(endpoint, SDOption_IP4_EndPoint) and endpoint.l4_proto == 0x11
    events_at = (endpoint.addr, endpoint.port)
    assert events_at == r.source.receiver.local_address  # where our notifications arrive
    # One session counter for this unicast partner: 1, 2, ... with the reboot flag (PRS_SOMEIPSD_00255)
    assert sd.flags.REBOOT and r.ecu.sessions_seen == list(range(1, len(r.ecu.sessions_seen) + 1))

    r.ecu.answer(sd_address, subscribe, ack=True)
    await until(lambda: r.subscribed() == 1, 5, "the subscription acknowledged")
    assert r.metric("cerebellumd_someip_sd_service_available", service="0x1234", instance="0x0001") == 1
    r.ecu.notify(events_at, 550)
    await until(lambda: "obstacle" in r.daemon.samples, 5, "a sample from the notification")
    assert r.daemon.samples["obstacle"].value == pytest.approx(5.5)
    assert r.first_notifications() == 1
    assert 0 < r.metric("cerebellumd_someip_sd_first_notification_seconds_sum") < 10
    r.ecu.notify(events_at, 420)
    await until(lambda: r.daemon.samples["obstacle"].value == pytest.approx(4.2), 5, "the next sample")
    assert r.first_notifications() == 1  # only the first after a (re)start is timed
    assert sum(r.sd_errors(k) for k in ("malformed", "protocol_version", "length", "option", "nack")) == 0


async def test_a_nack_is_counted_and_the_retry_is_acknowledged(rig: Rig) -> None:
    r = rig
    _, _, _, sd_address = await r.ecu.expect(0x00)
    r.ecu.offer(sd_address)
    _, _, first, _ = await r.ecu.expect(0x06)
    r.ecu.answer(sd_address, first, ack=False)  # SubscribeEventgroupNack
    await until(lambda: r.sd_errors("nack") == 1, 5, "the nack counted")
    assert r.subscribed() == 0
    _, _, retry, _ = await r.ecu.expect(0x06)  # sent again after subscribe_retry_ms
    assert retry.eventgroup_id == EVENTGROUP
    r.ecu.answer(sd_address, retry, ack=True)
    await until(lambda: r.subscribed() == 1, 5, "the retry acknowledged")


async def test_a_server_reboot_is_detected_and_we_resubscribe(rig: Rig) -> None:
    r = rig
    sd_address = await subscribe_and_ack(r)
    events_at = r.source.receiver.local_address
    r.ecu.notify(events_at, 100)
    await until(lambda: r.first_notifications() == 1, 5, "the first notification timed")
    assert r.ecu.session >= 2

    r.ecu.reboot_now()  # session id back to 1, reboot flag set
    r.ecu.drain()
    r.ecu.offer(sd_address)
    await until(lambda: r.metric("cerebellumd_someip_sd_reboots_total") == 1, 5, "the reboot detected")
    _, _, subscribe, _ = await r.ecu.expect(0x06)
    assert r.subscribed() == 0  # the old subscription died with the server
    r.ecu.answer(sd_address, subscribe, ack=True)
    await until(lambda: r.subscribed() == 1, 5, "subscribed again")
    r.ecu.notify(events_at, 300)
    await until(lambda: r.daemon.samples["obstacle"].value == pytest.approx(3.0), 5, "samples again")
    assert r.first_notifications() == 2  # timed again from the reboot


BAD: dict[str, Callable[[ScapyEcu, tuple[str, int]], None]] = {
    # entries array length 17: not a multiple of 16
    "length": lambda ecu, to: ecu.send_raw(to, bytes(SOMEIP(session_id=ecu.next_session()) / SD(
        flags=0xC0, len_entry_array=17, entry_array=[SDEntry_Service(type=1, srv_id=SERVICE, inst_id=1, ttl=3)]))),
    "malformed": lambda ecu, to: ecu.send_raw(to, bytes(SOMEIP(session_id=ecu.next_session()) / SD(flags=0xC0))[:-3]),
    "protocol_version": lambda ecu, to: ecu.send_sd(to, [SDEntry_Service(type=1, srv_id=SERVICE, inst_id=1, ttl=0)],
                                                    proto_ver=2),
    "interface_version": lambda ecu, to: ecu.send_sd(to, [SDEntry_Service(type=1, srv_id=SERVICE, inst_id=1, ttl=0)],
                                                     iface_ver=3),
    # a StopOffer whose option run points past the (empty) options array
    "option": lambda ecu, to: ecu.send_sd(to, [SDEntry_Service(type=1, srv_id=SERVICE, inst_id=1, major_ver=1,
                                                               ttl=0, index_1=2, n_opt_1=1)]),
}


async def test_malformed_and_wrong_version_sd_messages_are_counted_and_ignored(rig: Rig) -> None:
    r = rig
    sd_address = await subscribe_and_ack(r)
    for kind, send in BAD.items():
        send(r.ecu, sd_address)
        await until(lambda kind=kind: r.sd_errors(kind) == 1, 5, f"{kind} counted")  # type: ignore[misc]
    # Ignored: none of them (each carrying a StopOffer or an offer) touched the subscription.
    assert r.subscribed() == 1 and r.metric("cerebellumd_someip_sd_reboots_total") == 0
    r.ecu.notify(r.source.receiver.local_address, 777)
    await until(lambda: "obstacle" in r.daemon.samples, 5, "samples still flow")
    assert r.daemon.samples["obstacle"].value == pytest.approx(7.77)


def multicast_on_loopback(group: str, port: int) -> bool:
    """Whether the kernel loops multicast through lo here (CI containers may not)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, socket.socket(socket.AF_INET,
                                                                               socket.SOCK_DGRAM) as tx:
        try:
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            rx.bind((group, port))
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                          socket.inet_aton(group) + socket.inet_aton("127.0.0.1"))
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            tx.sendto(b"probe", (group, port))
            rx.settimeout(1.0)
            return rx.recv(16) == b"probe"
        except OSError:
            return False


def test_multicast_probe_is_not_fooled_by_a_unicast_group() -> None:
    assert multicast_on_loopback("127.0.0.1", free_port(socket.SOCK_DGRAM)) is False


async def test_multicast_find_and_offer_on_loopback() -> None:
    group, port = "224.224.224.245", free_port(socket.SOCK_DGRAM)
    if not await asyncio.to_thread(multicast_on_loopback, group, port):
        pytest.skip("this kernel does not deliver multicast over lo")
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setblocking(False)
    listener.bind((group, port))
    listener.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        socket.inet_aton(group) + socket.inet_aton("127.0.0.1"))
    group_rx = await ScapyEcu.start(listener)  # the ECU's multicast socket
    ecu = await ScapyEcu.start()  # its unicast socket
    assert ecu.transport is not None
    ecu.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                                                      socket.inet_aton("127.0.0.1"))
    try:
        async with running(config_text(f'multicast = "{group}"', sd_port=port), ecu) as r:
            header, sd, find, sd_address = await group_rx.expect(0x00)  # FindService to the group
            assert sd_address == ("127.0.0.1", port) and find.srv_id == SERVICE
            assert header.session_id == 1 and sd.flags.REBOOT  # the multicast channel's own counter
            ecu.offer((group, port))  # a multicast offer
            _, _, subscribe, source = await ecu.expect(0x06)  # the subscribe comes unicast
            assert source == sd_address
            ecu.answer(sd_address, subscribe, ack=True)
            await until(lambda: r.subscribed() == 1, 5, "subscribed after a multicast offer")
    finally:
        group_rx.close()


async def test_a_reload_rebuilds_the_sd_client(tmp_path: Path) -> None:
    ecu = await ScapyEcu.start()
    transport = f'unicast_only = true\npeers = ["127.0.0.1:{ecu.address[1]}"]'
    path = tmp_path / "cerebellumd.toml"
    await asyncio.to_thread(path.write_text, config_text(transport))
    config = await asyncio.to_thread(parse_config, path.read_text())
    daemon = await Daemon.async_create(config, config_path=str(path))
    await daemon.async_start()
    r = Rig(daemon, ecu)
    try:
        await subscribe_and_ack(r)
        old = r.source
        await asyncio.to_thread(path.write_text, config_text(transport, eventgroups="0x0010, 0x0020"))
        result = await daemon.reload()
        assert result.result == "ok", result.message
        assert r.source is not old and old.sd is not None and old.sd._unicast is None  # the old one closed
        while True:  # the new client finds again from its own socket, counting from 1
            header, _, _, sd_address = await ecu.expect(0x00)
            if sd_address == r.source.sd.local_address:  # type: ignore[union-attr]
                break
        assert header.session_id == 1
        ecu.offer(sd_address)
        _, sd, _, _ = await ecu.expect(0x06)
        assert sorted(e.eventgroup_id for e in sd.entry_array) == [0x10, 0x20]
    finally:
        # Bounded: the SD task's cancellation once hung on wait_for until the 10 s stop-step timeout.
        async with asyncio.timeout(5):
            await daemon.async_stop()
        ecu.close()
    assert daemon.assembly.stop_errors == []


def test_notifications_and_sd_cannot_share_a_port() -> None:
    from cerebellumd.config import ConfigError

    text = config_text('unicast_only = true\npeers = ["127.0.0.1:30490"]', sd_port=30490)
    with pytest.raises(ConfigError, match="is the SD port"):
        parse_config(text.replace("port = 0\n", "port = 30490\n", 1))
