"""SOME/IP Service Discovery (SOME/IP-SD), client side: the message codec and a state machine.

Both are pure: no sockets, no clock, no asyncio. The state machine gets the time (monotonic
seconds) and the datagrams as arguments and answers with the datagrams to send; the transport
around it is `drivers/someip_sd_udp.py`. docs/someip.md lists the requirements of AUTOSAR
PRS_SOMEIPServiceDiscoveryProtocol this follows (cited below as `PRS_SOMEIPSD_xxxxx`).

Message (PRS_SOMEIPSD: a SOME/IP NOTIFICATION with message id 0xFFFF8100, client id 0,
protocol and interface version 1, return code 0), payload big-endian:

    flags (8: reboot 0x80, unicast 0x40) | reserved (24)
    length of the entries array (32) | entries, 16 bytes each
    length of the options array (32) | options, each: length (16, counts the bytes after the
                                       type field) | type (8) | ...

Entry (16 bytes): type | index 1st option run | index 2nd option run | #options 1 (4) | #options
2 (4) | service id (16) | instance id (16) | major version (8) | TTL (24, seconds), then for a
service entry the minor version (32), for an eventgroup entry reserved (12) | counter (4) |
eventgroup id (16). A TTL of 0 turns an OfferService into StopOffer, a SubscribeEventgroup into
StopSubscribe and a SubscribeEventgroupAck into a Nack.

Bad input never raises out of `SdClient.handle_datagram`: a message-level fault drops the
message, an entry-level fault (unknown type, an option run out of range, a malformed option it
references) drops that entry only; both are counted by kind (SD_ERROR_KINDS) and logged with
the reason.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from .someip import MessageType, SomeIpError, build_message, parse_packet
from .someip_sd_options import (
    ANY_INSTANCE,
    ANY_MAJOR,
    SD_ERROR_KINDS,
    TTL_INFINITE,
    SdOptions,
    SdServiceSpec,
)

_LOG = logging.getLogger(__name__)

SD_SERVICE_ID = 0xFFFF
SD_METHOD_ID = 0x8100
SD_INTERFACE_VERSION = 1
ENTRY_SIZE = 16
ANY_MINOR = 0xFFFFFFFF
FLAG_REBOOT = 0x80
FLAG_UNICAST = 0x40
L4_UDP = 0x11
L4_TCP = 0x06

_SD_HEADER = struct.Struct(">B3xI")
_ENTRY_COMMON = struct.Struct(">BBBBHHB3s")
_IP4_OPTION = struct.Struct(">HBB4sBBH")


class EntryType(IntEnum):
    FIND_SERVICE = 0x00
    OFFER_SERVICE = 0x01
    SUBSCRIBE_EVENTGROUP = 0x06
    SUBSCRIBE_EVENTGROUP_ACK = 0x07


_SERVICE_ENTRIES = frozenset({EntryType.FIND_SERVICE, EntryType.OFFER_SERVICE})


class OptionType(IntEnum):
    CONFIGURATION = 0x01
    LOAD_BALANCING = 0x02
    IP4_ENDPOINT = 0x04
    IP6_ENDPOINT = 0x06
    IP4_MULTICAST = 0x14
    IP6_MULTICAST = 0x16
    IP4_SD_ENDPOINT = 0x24
    IP6_SD_ENDPOINT = 0x26


#: The length field each fixed-size option type must carry (bytes after the type field).
_OPTION_LENGTHS: dict[int, int] = {
    OptionType.LOAD_BALANCING: 5,
    OptionType.IP4_ENDPOINT: 9, OptionType.IP4_MULTICAST: 9, OptionType.IP4_SD_ENDPOINT: 9,
    OptionType.IP6_ENDPOINT: 21, OptionType.IP6_MULTICAST: 21, OptionType.IP6_SD_ENDPOINT: 21,
}
_IP4_OPTIONS = frozenset({OptionType.IP4_ENDPOINT, OptionType.IP4_MULTICAST, OptionType.IP4_SD_ENDPOINT})



class SdError(SomeIpError):
    """Bad SD input (an SD message is a SOME/IP message); `kind` is one of SD_ERROR_KINDS."""


# -- messages ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An IPv4 endpoint, multicast or SD-endpoint option."""

    kind: OptionType
    address: str
    port: int
    protocol: int = L4_UDP

    @property
    def addr(self) -> tuple[str, int]:
        return self.address, self.port


@dataclass(frozen=True, slots=True)
class OtherOption:
    """An option this client does not interpret (configuration, load balancing, IPv6)."""

    kind: int
    data: bytes


Option = Endpoint | OtherOption


@dataclass(frozen=True, slots=True)
class Entry:
    type: EntryType
    service_id: int
    instance_id: int
    major_version: int
    ttl: int
    minor_version: int = 0  # service entries
    eventgroup_id: int = 0  # eventgroup entries
    counter: int = 0  # eventgroup entries
    options: tuple[Option, ...] = ()

    @property
    def is_service_entry(self) -> bool:
        return self.type in _SERVICE_ENTRIES

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(o for o in self.options if isinstance(o, Endpoint))


@dataclass(frozen=True, slots=True)
class SdMessage:
    session_id: int
    reboot: bool
    unicast: bool
    entries: tuple[Entry, ...]
    #: Entries dropped for an entry-level fault, with the reason (the rest of the message stands).
    dropped: tuple[SdError, ...] = ()


@dataclass(frozen=True, slots=True)
class _BadOption:
    reason: str


def _parse_option(kind: int, body: bytes) -> Option | _BadOption:
    """`body`: the option's bytes after its type field (reserved byte first)."""
    expected = _OPTION_LENGTHS.get(kind)
    if expected is not None and len(body) != expected:
        return _BadOption(f"option type 0x{kind:02x} with length {len(body)}, expected {expected}")
    if kind in _IP4_OPTIONS:
        address = str(ipaddress.IPv4Address(body[1:5]))
        protocol, port = body[6], int.from_bytes(body[7:9], "big")
        if protocol not in (L4_UDP, L4_TCP):
            return _BadOption(f"option type 0x{kind:02x}: L4 protocol 0x{protocol:02x} is neither UDP nor TCP")
        return Endpoint(OptionType(kind), address, port, protocol)
    if kind == OptionType.CONFIGURATION and not body:
        return _BadOption("configuration option with length 0")
    return OtherOption(kind, bytes(body))


def parse_sd(datagram: bytes) -> SdMessage:
    """Decode one SD message (a whole datagram). Raises SdError for a message-level fault."""
    try:
        header, payload = parse_packet(datagram)
    except SomeIpError as exc:
        kind = "protocol_version" if exc.kind == "version" else "malformed"
        raise SdError(kind, f"SOME/IP header: {exc.reason}") from None
    if (header.service_id, header.method_id) != (SD_SERVICE_ID, SD_METHOD_ID):
        raise SdError("malformed", f"message id 0x{header.message_id:08x} is not SD's 0xffff8100")
    if header.interface_version != SD_INTERFACE_VERSION:
        raise SdError("interface_version",
                      f"interface version {header.interface_version}, SD uses {SD_INTERFACE_VERSION}")
    if header.message_type is not MessageType.NOTIFICATION or header.return_code != 0:
        raise SdError("malformed", f"message type 0x{int(header.message_type):02x} / return code "
                                   f"0x{header.return_code:02x}, SD uses NOTIFICATION / E_OK")
    if len(payload) < _SD_HEADER.size + 4:
        raise SdError("length", f"SD payload of {len(payload)} bytes, at least 12 needed")
    flags, entries_len = _SD_HEADER.unpack_from(payload)
    if entries_len % ENTRY_SIZE:
        raise SdError("length", f"entries array of {entries_len} bytes is not a multiple of {ENTRY_SIZE}")
    options_at = _SD_HEADER.size + entries_len
    if options_at + 4 > len(payload):
        raise SdError("length", f"entries array of {entries_len} bytes overruns the {len(payload)}-byte payload")
    options_len = int.from_bytes(payload[options_at:options_at + 4], "big")
    end = options_at + 4 + options_len
    if end != len(payload):
        raise SdError("length", f"options array of {options_len} bytes but {len(payload) - options_at - 4} follow")
    options = _parse_options(payload[options_at + 4:end])
    entries: list[Entry] = []
    dropped: list[SdError] = []
    for at in range(_SD_HEADER.size, options_at, ENTRY_SIZE):
        try:
            entries.append(_parse_entry(payload[at:at + ENTRY_SIZE], options))
        except SdError as exc:
            dropped.append(exc)
    return SdMessage(header.session_id, bool(flags & FLAG_REBOOT), bool(flags & FLAG_UNICAST),
                     tuple(entries), tuple(dropped))


def _parse_options(data: bytes) -> list[Option | _BadOption]:
    options: list[Option | _BadOption] = []
    pos = 0
    while pos < len(data):
        if pos + 3 > len(data):
            raise SdError("length", f"{len(data) - pos} trailing bytes in the options array")
        length, kind = int.from_bytes(data[pos:pos + 2], "big"), data[pos + 2]
        if pos + 3 + length > len(data):
            raise SdError("length", f"option {len(options)} (type 0x{kind:02x}) of length {length} overruns "
                                    "the options array")
        options.append(_parse_option(kind, data[pos + 3:pos + 3 + length]))
        pos += 3 + length
    return options


def _parse_entry(data: bytes, options: Sequence[Option | _BadOption]) -> Entry:
    kind, index1, index2, counts, service, instance, major, ttl_bytes = _ENTRY_COMMON.unpack_from(data)
    if kind not in (t.value for t in EntryType):
        raise SdError("entry", f"unknown entry type 0x{kind:02x} (service 0x{service:04x})")
    refs: list[Option] = []
    for index, count in ((index1, counts >> 4), (index2, counts & 0x0F)):
        if count == 0:
            continue
        if index + count > len(options):
            raise SdError("option", f"entry type 0x{kind:02x} (service 0x{service:04x}) references options "
                                    f"{index}..{index + count - 1} of {len(options)}")
        for option in options[index:index + count]:
            if isinstance(option, _BadOption):
                raise SdError("option", f"entry type 0x{kind:02x} (service 0x{service:04x}): {option.reason}")
            refs.append(option)
    entry_type = EntryType(kind)
    ttl = int.from_bytes(ttl_bytes, "big")
    tail = int.from_bytes(data[12:16], "big")
    if entry_type in _SERVICE_ENTRIES:
        return Entry(entry_type, service, instance, major, ttl, minor_version=tail, options=tuple(refs))
    return Entry(entry_type, service, instance, major, ttl, eventgroup_id=tail & 0xFFFF,
                 counter=(tail >> 16) & 0x0F, options=tuple(refs))


def _encode_option(option: Option) -> bytes:
    if isinstance(option, Endpoint):
        return _IP4_OPTION.pack(9, int(option.kind), 0, ipaddress.IPv4Address(option.address).packed, 0,
                                option.protocol, option.port)
    return len(option.data).to_bytes(2, "big") + bytes([option.kind]) + option.data


def encode_sd(entries: Sequence[Entry], *, session_id: int, reboot: bool, unicast: bool = True) -> bytes:
    """One SD message. Each entry's options become its first option run; identical runs are
    shared (the options array holds each run once)."""
    options: list[Option] = []
    encoded_entries = bytearray()
    for entry in entries:
        run = list(entry.options)
        index = _find_run(options, run)
        if run and index < 0:
            index = len(options)
            options.extend(run)
        index = max(index, 0)
        counts = (len(run) << 4) if run else 0
        if len(run) > 15:
            raise ValueError("an option run holds at most 15 options")
        encoded_entries += _ENTRY_COMMON.pack(int(entry.type), index if run else 0, 0, counts, entry.service_id,
                                              entry.instance_id, entry.major_version, entry.ttl.to_bytes(3, "big"))
        if entry.is_service_entry:
            encoded_entries += entry.minor_version.to_bytes(4, "big")
        else:
            encoded_entries += ((entry.counter & 0x0F) << 16 | entry.eventgroup_id).to_bytes(4, "big")
    encoded_options = b"".join(_encode_option(o) for o in options)
    flags = (FLAG_REBOOT if reboot else 0) | (FLAG_UNICAST if unicast else 0)
    payload = (_SD_HEADER.pack(flags, len(encoded_entries)) + bytes(encoded_entries)
               + len(encoded_options).to_bytes(4, "big") + encoded_options)
    return build_message(SD_SERVICE_ID, SD_METHOD_ID, payload, client_id=0, session_id=session_id,
                         interface_version=SD_INTERFACE_VERSION, message_type=MessageType.NOTIFICATION)


def _find_run(options: Sequence[Option], run: Sequence[Option]) -> int:
    if not run:
        return -1
    for i in range(len(options) - len(run) + 1):
        if list(options[i:i + len(run)]) == list(run):
            return i
    return -1


# -- the client state machine ----------------------------------------------------------------


class Phase(Enum):
    """The client service's find phases (PRS_SOMEIPSD_00399..00416)."""

    DOWN = "down"
    INITIAL_WAIT = "initial_wait"
    REPETITION = "repetition"
    MAIN = "main"


class GroupState(Enum):
    IDLE = "idle"  # the service is not offered
    PENDING = "pending"  # subscribe sent, no ack yet
    SUBSCRIBED = "subscribed"
    NACKED = "nacked"


@dataclass(frozen=True, slots=True)
class Send:
    destination: tuple[str, int]
    data: bytes


@dataclass
class _Group:
    eventgroup_id: int
    state: GroupState = GroupState.IDLE
    expires_at: float | None = None
    resend_at: float | None = None
    multicast: Endpoint | None = None


@dataclass
class _Service:
    spec: SdServiceSpec
    groups: dict[int, _Group]
    phase: Phase = Phase.DOWN
    phase_due: float | None = None
    repetitions: int = 0
    server: tuple[str, int] | None = None  # the offering SD endpoint
    instance_id: int | None = None
    major_version: int | None = None
    offer_expires_at: float | None = None

    @property
    def available(self) -> bool:
        return self.server is not None


@dataclass
class _Partner:
    """Last session id and reboot flag seen from one SD partner on one channel (PRS_SOMEIPSD_00258)."""

    session_id: int
    reboot: bool


@dataclass
class _Sessions:
    """Our session id per channel (multicast, each unicast partner): 1 after start, +1 per
    message, wraps to 1, never 0 (PRS_SOMEIPSD_00158); the reboot flag stays set until the
    channel's session id has wrapped once (PRS_SOMEIPSD_00255)."""

    next_id: dict[tuple[str, int] | None, int] = field(default_factory=dict)
    wrapped: set[tuple[str, int] | None] = field(default_factory=set)

    def take(self, channel: tuple[str, int] | None) -> tuple[int, bool]:
        session = self.next_id.get(channel, 1)
        reboot = channel not in self.wrapped
        if session == 0xFFFF:
            self.wrapped.add(channel)
        self.next_id[channel] = session + 1 if session < 0xFFFF else 1
        return session, reboot


class SdClient:
    """The SD client of one endpoint. Feed it datagrams (`handle_datagram`) and call `poll` when
    `next_deadline` is due; both return the datagrams to send. All times are monotonic seconds."""

    def __init__(self, options: SdOptions, *, rng: Callable[[float, float], float] | None = None) -> None:
        self.options = options
        self._uniform = rng if rng is not None else random.SystemRandom().uniform
        self._services = [
            _Service(spec, {g: _Group(g) for g in spec.eventgroups}) for spec in options.services]
        self._sessions = _Sessions()
        self._partners: dict[tuple[tuple[str, int], bool], _Partner] = {}
        self._endpoint: Endpoint | None = None
        self._self: tuple[str, int] | None = None
        #: Bad input by kind (fixed keys: read by the metrics thread).
        self.errors: dict[str, int] = dict.fromkeys(SD_ERROR_KINDS, 0)
        self.counters: dict[str, int] = dict.fromkeys(
            ("received", "sent", "offers", "stop_offers", "acks", "reboots", "offer_expired",
             "subscription_expired"), 0)
        #: Set at start and whenever the subscriptions start over; cleared by the first notification.
        self.waiting_since: float | None = None

    # -- inputs --------------------------------------------------------------------------------

    def start(self, now: float, endpoint: tuple[str, int], sd_address: tuple[str, int] | None = None) -> list[Send]:
        """`endpoint`: where our notifications arrive (the SubscribeEventgroup's endpoint option);
        `sd_address`: our own unicast SD socket (messages from it are our multicast echoes)."""
        self._endpoint = Endpoint(OptionType.IP4_ENDPOINT, endpoint[0], endpoint[1], L4_UDP)
        self._self = sd_address
        self.waiting_since = now
        for service in self._services:
            if service.phase is Phase.DOWN:
                self._enter_initial_wait(service, now)
        return self.poll(now)

    def handle_datagram(self, data: bytes, source: tuple[str, int], *, multicast: bool, now: float) -> list[Send]:
        """One received SD datagram. Never raises for bad input: it is counted and logged."""
        if source == self._self:
            return []  # our own multicast, looped back
        self.counters["received"] += 1
        try:
            message = parse_sd(data)
        except SdError as exc:
            self._count(exc, source)
            return []
        for dropped in message.dropped:
            self._count(dropped, source)
        sends: list[Send] = []
        if self._partner_rebooted(source, multicast, message):
            self._on_reboot(source, now)
        by_server: dict[tuple[str, int], list[Entry]] = {}
        for entry in message.entries:
            for server, subscribes in self._handle_entry(entry, source, now).items():
                by_server.setdefault(server, []).extend(subscribes)
        sends += [self._send(server, entries) for server, entries in by_server.items()]
        return sends

    def poll(self, now: float) -> list[Send]:
        """Due timers: the find phases, offer TTLs, subscription renewals, retries and TTLs."""
        sends: list[Send] = []
        finds: list[Entry] = []
        for service in self._services:
            if service.offer_expires_at is not None and now >= service.offer_expires_at:
                _LOG.warning("SOME/IP-SD: the offer of service 0x%04x expired", service.spec.service_id)
                self.counters["offer_expired"] += 1
                self._lose(service, now)
                self._enter_initial_wait(service, now)
            if service.phase_due is not None and now >= service.phase_due:
                finds.append(self._find_entry(service))
                self._advance_find_phase(service, now)
            if service.available:
                renew = self._due_subscribes(service, now)
                if renew and service.server is not None:
                    sends.append(self._send(service.server, renew))
        if finds:
            sends += self._find_sends(finds)
        return sends

    def next_deadline(self) -> float | None:
        times: list[float] = []
        for service in self._services:
            times += [t for t in (service.phase_due, service.offer_expires_at) if t is not None]
            for group in service.groups.values():
                times += [t for t in (group.resend_at, group.expires_at) if t is not None]
        return min(times, default=None)

    def first_notification(self, now: float) -> float | None:
        """A notification arrived: the seconds since the (re)start if it is the first one."""
        if self.waiting_since is None:
            return None
        elapsed, self.waiting_since = now - self.waiting_since, None
        return max(0.0, elapsed)

    # -- read-only views (the metrics thread reads these) ------------------------------------

    def subscriptions(self) -> list[tuple[int, int, int, bool]]:
        """(service id, configured instance id, eventgroup id, subscribed) for every eventgroup."""
        return [(s.spec.service_id, s.spec.instance_id, g.eventgroup_id, g.state is GroupState.SUBSCRIBED)
                for s in self._services for g in list(s.groups.values())]

    def availability(self) -> list[tuple[int, int, bool]]:
        return [(s.spec.service_id, s.spec.instance_id, s.available) for s in self._services]

    def phase(self, service_id: int) -> Phase:
        return next(s.phase for s in self._services if s.spec.service_id == service_id)

    def group_state(self, service_id: int, eventgroup_id: int) -> GroupState:
        service = next(s for s in self._services if s.spec.service_id == service_id)
        return service.groups[eventgroup_id].state

    # -- find phases ---------------------------------------------------------------------------

    def _enter_initial_wait(self, service: _Service, now: float) -> None:
        # PRS_SOMEIPSD_00399/00400/00401: a random delay in [INITIAL_DELAY_MIN, INITIAL_DELAY_MAX].
        o = self.options
        delay = self._uniform(o.initial_delay_min_ms / 1000, o.initial_delay_max_ms / 1000)
        service.phase, service.phase_due, service.repetitions = Phase.INITIAL_WAIT, now + delay, 0

    def _advance_find_phase(self, service: _Service, now: float) -> None:
        o = self.options
        if service.phase is Phase.INITIAL_WAIT:
            service.repetitions = 0
        else:
            service.repetitions += 1
        if service.repetitions >= o.repetitions_max:
            # PRS_SOMEIPSD_00409 (no repetitions), 00410; no cyclic FindService in the main phase (00415).
            service.phase, service.phase_due = Phase.MAIN, None
            return
        # PRS_SOMEIPSD_00405/00406: wait REPETITIONS_BASE_DELAY, doubling after each message.
        service.phase = Phase.REPETITION
        service.phase_due = now + (o.repetitions_base_delay_ms / 1000) * (2 ** service.repetitions)

    def _find_entry(self, service: _Service) -> Entry:
        spec = service.spec
        return Entry(EntryType.FIND_SERVICE, spec.service_id, spec.instance_id, spec.major_version, spec.ttl_s,
                     minor_version=ANY_MINOR)

    def _find_sends(self, finds: list[Entry]) -> list[Send]:
        sends = []
        if self.options.multicast_group is not None:
            sends.append(self._send((self.options.multicast_group, self.options.port), finds, multicast=True))
        sends += [self._send(peer, finds) for peer in self.options.peer_addresses()]
        return sends

    # -- received entries ------------------------------------------------------------------------

    def _handle_entry(self, entry: Entry, source: tuple[str, int], now: float) -> dict[tuple[str, int], list[Entry]]:
        if entry.type is EntryType.OFFER_SERVICE:
            return self._on_offer(entry, source, now)
        if entry.type is EntryType.SUBSCRIBE_EVENTGROUP_ACK:
            self._on_ack(entry, source, now)
        # FindService and SubscribeEventgroup are for servers: not ours to answer.
        return {}

    def _matching(self, entry: Entry) -> _Service | None:
        for service in self._services:
            spec = service.spec
            if (spec.service_id == entry.service_id
                    and spec.instance_id in (ANY_INSTANCE, entry.instance_id)
                    and spec.major_version in (ANY_MAJOR, entry.major_version)):
                return service
        return None

    def _on_offer(self, entry: Entry, source: tuple[str, int], now: float) -> dict[tuple[str, int], list[Entry]]:
        service = self._matching(entry)
        if service is None or entry.instance_id == ANY_INSTANCE:
            return {}
        same = service.server == source and service.instance_id == entry.instance_id
        if entry.ttl == 0:  # StopOfferService
            if same:
                _LOG.info("SOME/IP-SD: service 0x%04x.%04x stopped by %s:%d", entry.service_id,
                          entry.instance_id, *source)
                self.counters["stop_offers"] += 1
                self._lose(service, now)
            return {}
        if service.available and not same:
            return {}  # already bound to another instance or server: one instance per configured service
        self.counters["offers"] += 1
        if not same:
            _LOG.info("SOME/IP-SD: service 0x%04x.%04x v%d offered by %s:%d", entry.service_id, entry.instance_id,
                      entry.major_version, *source)
        service.server, service.instance_id, service.major_version = source, entry.instance_id, entry.major_version
        service.offer_expires_at = None if entry.ttl == TTL_INFINITE else now + entry.ttl
        # PRS_SOMEIPSD_00408: an offer ends the find phases.
        service.phase, service.phase_due = Phase.MAIN, None
        # PRS_SOMEIPSD_00582: an offer triggers SubscribeEventgroup (each cyclic offer renews it).
        subscribes = [self._subscribe(service, group, now) for group in service.groups.values()]
        return {source: subscribes}

    def _on_ack(self, entry: Entry, source: tuple[str, int], now: float) -> None:
        # PRS_SOMEIPSD_00829: an Ack/Nack matches service, instance, eventgroup and major version.
        service = next((s for s in self._services if s.available and s.spec.service_id == entry.service_id
                        and s.instance_id == entry.instance_id and s.major_version == entry.major_version), None)
        group = service.groups.get(entry.eventgroup_id) if service is not None else None
        if service is None or group is None or group.state is GroupState.IDLE:
            _LOG.debug("SOME/IP-SD: ignoring an ack for 0x%04x.%04x eventgroup 0x%04x we did not ask for",
                       entry.service_id, entry.instance_id, entry.eventgroup_id)
            return
        if entry.ttl == 0:  # SubscribeEventgroupNack (PRS_SOMEIPSD_00393)
            self._count(SdError("nack", f"subscription to 0x{entry.service_id:04x}.{entry.instance_id:04x} "
                                        f"eventgroup 0x{entry.eventgroup_id:04x} refused"), source)
            group.state, group.expires_at = GroupState.NACKED, None
            group.resend_at = now + self.options.subscribe_retry_ms / 1000
            return
        self.counters["acks"] += 1
        if group.state is not GroupState.SUBSCRIBED:
            _LOG.info("SOME/IP-SD: subscribed to 0x%04x.%04x eventgroup 0x%04x (TTL %d s)", entry.service_id,
                      entry.instance_id, entry.eventgroup_id, entry.ttl)
        group.state = GroupState.SUBSCRIBED
        group.multicast = next((e for e in entry.endpoints if e.kind is OptionType.IP4_MULTICAST), None)
        if entry.ttl == TTL_INFINITE:
            group.expires_at = group.resend_at = None
        else:
            group.expires_at = now + entry.ttl
            group.resend_at = now + entry.ttl / 2  # renewed before half the TTL has run out

    # -- subscriptions ------------------------------------------------------------------------

    def _subscribe(self, service: _Service, group: _Group, now: float) -> Entry:
        assert self._endpoint is not None and service.instance_id is not None and service.major_version is not None
        if group.state in (GroupState.IDLE, GroupState.NACKED):
            group.state = GroupState.PENDING
        # Until the ack (and on a renewal that gets none) it is sent again after the retry delay.
        group.resend_at = now + self.options.subscribe_retry_ms / 1000
        return Entry(EntryType.SUBSCRIBE_EVENTGROUP, service.spec.service_id, service.instance_id,
                     service.major_version, service.spec.ttl_s, eventgroup_id=group.eventgroup_id,
                     options=(self._endpoint,))

    def _due_subscribes(self, service: _Service, now: float) -> list[Entry]:
        due = []
        for group in service.groups.values():
            if group.expires_at is not None and now >= group.expires_at:
                _LOG.warning("SOME/IP-SD: subscription to 0x%04x eventgroup 0x%04x expired unrenewed",
                             service.spec.service_id, group.eventgroup_id)
                self.counters["subscription_expired"] += 1
                group.state, group.expires_at = GroupState.PENDING, None
                group.resend_at = now
            if group.resend_at is not None and now >= group.resend_at:
                due.append(self._subscribe(service, group, now))
        return due

    def _lose(self, service: _Service, now: float) -> None:
        """The service is gone (StopOffer, TTL, reboot): every subscription of it ends."""
        service.server = service.instance_id = service.major_version = service.offer_expires_at = None
        for group in service.groups.values():
            group.state, group.expires_at, group.resend_at, group.multicast = GroupState.IDLE, None, None, None
        if self.waiting_since is None:
            self.waiting_since = now

    # -- reboot detection ---------------------------------------------------------------------

    def _partner_rebooted(self, source: tuple[str, int], multicast: bool, message: SdMessage) -> bool:
        """PRS_SOMEIPSD_00258: per partner and channel (unicast and multicast apart), a reboot is
        old.reboot == 0 and new.reboot == 1, or both 1 and old.session_id >= new.session_id."""
        key = (source, multicast)
        old = self._partners.get(key)
        self._partners[key] = _Partner(message.session_id, message.reboot)
        if old is None:
            return False
        return message.reboot and (not old.reboot or old.session_id >= message.session_id)

    def _on_reboot(self, source: tuple[str, int], now: float) -> None:
        self.counters["reboots"] += 1
        lost = [s for s in self._services if s.server is not None and s.server[0] == source[0]]
        _LOG.warning("SOME/IP-SD: %s:%d rebooted; %d service(s) start over", *source, len(lost))
        for service in lost:
            self._lose(service, now)

    # -- output --------------------------------------------------------------------------------

    def _send(self, destination: tuple[str, int], entries: Iterable[Entry], *, multicast: bool = False) -> Send:
        session, reboot = self._sessions.take(None if multicast else destination)
        self.counters["sent"] += 1
        return Send(destination, encode_sd(list(entries), session_id=session, reboot=reboot))

    def _count(self, error: SdError, source: tuple[str, int]) -> None:
        self.errors[error.kind] += 1
        level = logging.INFO if error.kind == "nack" else logging.WARNING
        _LOG.log(level, "SOME/IP-SD from %s:%d: %s", source[0], source[1], error)
