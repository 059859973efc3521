"""SOME/IP-SD client, pure parts: the codec (checked against scapy's independent SD layers in both
directions), the state machine on a fake clock (find phases, offers and their TTL, subscribe /
ack / nack, renewal, reboot detection, our session ids), and bad input (counted by kind, never
raised, fuzzed). The loopback interop with scapy as the ECU is tests/test_someip_sd_interop.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.contrib.automotive.someip import (
    SD,
    SOMEIP,
    SDEntry_EventGroup,
    SDEntry_Service,
    SDOption_IP4_EndPoint,
    SDOption_IP4_Multicast,
)

from cerebellumd.drivers.someip import build_message
from cerebellumd.drivers.someip_sd import (
    ANY_MINOR,
    SD_ERROR_KINDS,
    TTL_INFINITE,
    Endpoint,
    Entry,
    EntryType,
    GroupState,
    OptionType,
    Phase,
    SdClient,
    SdError,
    SdOptions,
    _Sessions,
    encode_sd,
    parse_sd,
)

SERVER = ("127.0.0.1", 30490)
ENDPOINT = ("127.0.0.1", 30501)
SERVER_EVENTS = Endpoint(OptionType.IP4_ENDPOINT, "127.0.0.1", 30509)


def scapy_sd(entries: list[object], options: list[object] = (), *, session: int = 1,  # type: ignore[assignment]
             flags: int = 0xC0, **someip: int) -> bytes:
    """An SD message built by scapy (the independent encoder)."""
    sd = SD(flags=flags)
    sd.set_entryArray(list(entries))
    if options:
        sd.set_optionArray(list(options))
    return bytes(SOMEIP(session_id=session, **someip) / sd)


def offer(ttl: int = 3, *, service: int = 0x1234, instance: int = 1, major: int = 1) -> SDEntry_Service:
    return SDEntry_Service(type=0x01, srv_id=service, inst_id=instance, major_ver=major, ttl=ttl, minor_ver=0,
                           index_1=0, n_opt_1=1)


def ack(ttl: int = 3, *, group: int = 0x10, instance: int = 1, major: int = 1, n_opt: int = 0) -> SDEntry_EventGroup:
    return SDEntry_EventGroup(type=0x07, srv_id=0x1234, inst_id=instance, major_ver=major, ttl=ttl,
                              eventgroup_id=group, index_1=0, n_opt_1=n_opt)


def server_endpoint() -> SDOption_IP4_EndPoint:
    return SDOption_IP4_EndPoint(addr="127.0.0.1", l4_proto=0x11, port=30509)


def decode_ours(data: bytes) -> tuple[SOMEIP, SD]:
    """scapy 2.8 keeps a SOME/IP payload as Raw in `data` (its SD binding is not used on
    dissection), so the SD part is dissected on its own."""
    header = SOMEIP(data)
    assert len(data) == 8 + header.len
    return header, SD(data[16:])


# -- the codec against scapy ---------------------------------------------------------------------


def test_our_messages_decode_in_scapy_field_by_field() -> None:
    ours = Endpoint(OptionType.IP4_ENDPOINT, "192.168.7.2", 30501)
    entries = [
        Entry(EntryType.FIND_SERVICE, 0x1234, 0xFFFF, 0xFF, 3, minor_version=ANY_MINOR),
        Entry(EntryType.SUBSCRIBE_EVENTGROUP, 0x1234, 0x0001, 2, 5, eventgroup_id=0x10, options=(ours,)),
        Entry(EntryType.SUBSCRIBE_EVENTGROUP, 0x1234, 0x0001, 2, 5, eventgroup_id=0x11, options=(ours,)),
    ]
    data = encode_sd(entries, session_id=0x0102, reboot=True)
    header, sd = decode_ours(data)
    assert (header.srv_id, header.sub_id, header.client_id, header.session_id) == (0xFFFF, 0x8100, 0, 0x0102)
    assert (header.proto_ver, header.iface_ver, header.msg_type, header.retcode) == (1, 1, 0x02, 0)
    assert sd.flags.REBOOT and sd.flags.UNICAST and int(sd.flags) == 0xC0
    find, sub1, sub2 = sd.entry_array
    assert isinstance(find, SDEntry_Service) and isinstance(sub1, SDEntry_EventGroup)
    assert (find.type, find.srv_id, find.inst_id, find.major_ver, find.ttl, find.minor_ver) == (
        0, 0x1234, 0xFFFF, 0xFF, 3, 0xFFFFFFFF)
    assert (find.n_opt_1, find.n_opt_2) == (0, 0)
    for sub, group in ((sub1, 0x10), (sub2, 0x11)):
        assert (sub.type, sub.srv_id, sub.inst_id, sub.major_ver, sub.ttl, sub.eventgroup_id, sub.cnt) == (
            6, 0x1234, 1, 2, 5, group, 0)
        assert (sub.index_1, sub.n_opt_1, sub.n_opt_2) == (0, 1, 0)  # both share the one endpoint option
    (option,) = sd.option_array
    assert isinstance(option, SDOption_IP4_EndPoint)
    assert (option.len, option.addr, option.l4_proto, option.port) == (9, "192.168.7.2", 0x11, 30501)
    # And scapy's own encoding of what it decoded is byte-identical to ours.
    assert bytes(sd) == data[16:]


def test_scapy_messages_decode_in_ours() -> None:
    data = scapy_sd([offer(ttl=TTL_INFINITE), ack(ttl=0, group=0x22, n_opt=1)],
                    [server_endpoint(), SDOption_IP4_Multicast(addr="239.1.1.1", l4_proto=0x11, port=30600)],
                    session=77, flags=0x80)
    message = parse_sd(data)
    assert (message.session_id, message.reboot, message.unicast, message.dropped) == (77, True, False, ())
    off, nack = message.entries
    assert (off.type, off.service_id, off.instance_id, off.major_version, off.ttl) == (
        EntryType.OFFER_SERVICE, 0x1234, 1, 1, TTL_INFINITE)
    assert off.options == (SERVER_EVENTS,)
    assert (nack.type, nack.ttl, nack.eventgroup_id) == (EntryType.SUBSCRIBE_EVENTGROUP_ACK, 0, 0x22)
    assert nack.options == (SERVER_EVENTS,)  # index_1=0, one option


def test_a_second_option_run_and_unknown_options_are_kept() -> None:
    entry = SDEntry_Service(type=0x01, srv_id=0x1234, inst_id=1, major_ver=1, ttl=3, index_1=0, n_opt_1=1,
                            index_2=1, n_opt_2=1)
    config = bytes.fromhex("0004") + b"\x01\x00" + b"a=b"[:3]  # configuration option, length 4
    sd = SD(flags=0xC0)
    sd.set_entryArray([entry])
    raw_sd = bytes(sd)
    # options array by hand: the endpoint, then the configuration option
    options = bytes(server_endpoint()) + config
    raw_sd = raw_sd[:-4] + len(options).to_bytes(4, "big") + options
    data = bytes(SOMEIP(session_id=1, srv_id=0xFFFF, sub_id=0x8100, msg_type=2)) [:16]
    data = data[:4] + (8 + len(raw_sd)).to_bytes(4, "big") + data[8:] + raw_sd
    (parsed,) = parse_sd(data).entries
    assert parsed.options[0] == SERVER_EVENTS
    assert parsed.options[1].kind == OptionType.CONFIGURATION


# -- bad input -----------------------------------------------------------------------------------


def _sd_payload(entries: bytes, options: bytes) -> bytes:
    return b"\xc0\x00\x00\x00" + len(entries).to_bytes(4, "big") + entries + len(options).to_bytes(4, "big") + options


def _sd(payload: bytes, **kw: int) -> bytes:
    return build_message(0xFFFF, 0x8100, payload, **kw)


GOOD_OFFER = bytes(offer())
GOOD_OPTION = bytes(server_endpoint())


@pytest.mark.parametrize(("data", "kind"), [
    (b"\x00" * 10, "malformed"),
    (_sd(_sd_payload(GOOD_OFFER, GOOD_OPTION))[:-1], "malformed"),  # SOME/IP length disagrees
    (_sd(_sd_payload(GOOD_OFFER, GOOD_OPTION), protocol_version=2), "protocol_version"),
    (_sd(_sd_payload(GOOD_OFFER, GOOD_OPTION), interface_version=2), "interface_version"),
    (_sd(_sd_payload(GOOD_OFFER, GOOD_OPTION), message_type=0x00), "malformed"),
    (_sd(_sd_payload(GOOD_OFFER, GOOD_OPTION), return_code=1), "malformed"),
    (build_message(0x1234, 0x8100, _sd_payload(GOOD_OFFER, GOOD_OPTION)), "malformed"),
    (_sd(b"\xc0\x00\x00"), "length"),
    (_sd(_sd_payload(GOOD_OFFER[:15], b"")), "length"),  # entries not a multiple of 16
    (_sd(b"\xc0\x00\x00\x00" + (64).to_bytes(4, "big") + GOOD_OFFER + b"\x00\x00\x00\x00"), "length"),
    (_sd(_sd_payload(GOOD_OFFER, GOOD_OPTION) + b"\x00"), "length"),  # trailing byte after the options
    (_sd(_sd_payload(GOOD_OFFER, GOOD_OPTION[:-2])), "length"),  # option overruns the array
])
def test_message_level_faults_raise_with_a_kind(data: bytes, kind: str) -> None:
    with pytest.raises(SdError) as info:
        parse_sd(data)
    assert info.value.kind == kind and info.value.reason


@pytest.mark.parametrize(("entry", "options", "kind"), [
    (bytes(offer())[:0] + b"\x05" + bytes(offer())[1:], GOOD_OPTION, "entry"),  # unknown entry type
    (bytes(offer()), b"", "option"),  # references option 0 of none
    (bytes(SDEntry_Service(type=1, srv_id=0x1234, inst_id=1, ttl=3, index_1=1, n_opt_1=1)), GOOD_OPTION,
     "option"),  # index out of range
    (bytes(offer()), b"\x00\x08\x04" + GOOD_OPTION[3:-1], "option"),  # IPv4 endpoint with length 8
    (bytes(offer()), GOOD_OPTION[:9] + b"\x42" + GOOD_OPTION[10:], "option"),  # L4 protocol 0x42
])
def test_entry_level_faults_drop_the_entry_and_keep_the_rest(entry: bytes, options: bytes, kind: str) -> None:
    second = bytes(SDEntry_Service(type=0, srv_id=0x4321, inst_id=0xFFFF, major_ver=0xFF, ttl=3))
    message = parse_sd(_sd(_sd_payload(entry + second, options)))
    assert [e.service_id for e in message.entries] == [0x4321]
    assert [d.kind for d in message.dropped] == [kind]


def test_the_client_counts_every_kind_and_never_raises() -> None:
    client, _ = started_client()
    bad = [
        b"\x01", _sd(_sd_payload(GOOD_OFFER, GOOD_OPTION), protocol_version=3),
        _sd(_sd_payload(GOOD_OFFER, GOOD_OPTION), interface_version=9), _sd(_sd_payload(GOOD_OFFER[:3], b"")),
        _sd(_sd_payload(GOOD_OFFER, b"")), _sd(_sd_payload(b"\x09" + GOOD_OFFER[1:], GOOD_OPTION)),
    ]
    for data in bad:
        assert client.handle_datagram(data, SERVER, multicast=False, now=1.0) == []
    assert client.errors == {"malformed": 1, "protocol_version": 1, "interface_version": 1, "length": 1,
                             "option": 1, "entry": 1, "nack": 0}
    assert client.group_state(0x1234, 0x10) is GroupState.IDLE  # the bad offer subscribed to nothing


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_parse_sd_raises_only_sd_error(data: bytes) -> None:
    try:
        message = parse_sd(data)
    except SdError as exc:
        assert exc.kind in SD_ERROR_KINDS
    else:
        assert all(d.kind in SD_ERROR_KINDS for d in message.dropped)


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=1, max_size=96), st.integers(0, 60), st.binary(max_size=40))
def test_fuzz_the_client_with_mutated_valid_messages(noise: bytes, at: int, options: bytes) -> None:
    """Valid SD framing around fuzzed entries/options reaches the entry and option paths."""
    client, _ = started_client()
    entries = (GOOD_OFFER + noise)[: (len(GOOD_OFFER + noise) // 16) * 16]
    payload = bytearray(_sd_payload(entries, GOOD_OPTION + options))
    payload[min(at, len(payload) - 1)] ^= noise[0]
    for data in (_sd(bytes(payload)), _sd(_sd_payload(entries, options))):
        client.handle_datagram(data, SERVER, multicast=False, now=1.0)
        client.poll(2.0)
    assert sum(client.errors.values()) + client.counters["offers"] + client.counters["received"] >= 1


# -- the state machine ---------------------------------------------------------------------------


def options(**overrides: object) -> SdOptions:
    base: dict[str, object] = {
        "unicast_only": True, "peers": ["127.0.0.1:30490"], "initial_delay_min_ms": 100,
        "initial_delay_max_ms": 300, "repetitions_base_delay_ms": 10, "repetitions_max": 3,
        "subscribe_retry_ms": 200,
        "services": [{"service_id": 0x1234, "instance_id": 1, "major_version": 1, "eventgroups": [0x10],
                      "ttl_s": 4}],
    }
    return SdOptions.model_validate(base | overrides)


def started_client(**overrides: object) -> tuple[SdClient, list[object]]:
    draws: list[object] = []

    def rng(low: float, high: float) -> float:
        draws.append((low, high))
        return (low + high) / 2

    client = SdClient(options(**overrides), rng=rng)
    assert client.start(0.0, ENDPOINT, ("127.0.0.1", 40000)) == []
    return client, draws


def decode_sends(sends: list[object]) -> list[tuple[tuple[str, int], int, list[Entry]]]:
    out = []
    for send in sends:
        message = parse_sd(send.data)  # type: ignore[attr-defined]
        out.append((send.destination, message.session_id, list(message.entries)))  # type: ignore[attr-defined]
    return out


def test_find_phases_follow_the_initial_delay_and_doubling_repetitions() -> None:
    client, draws = started_client()
    assert draws == [(0.1, 0.3)]  # PRS_SOMEIPSD_00399/00400: random in [min, max]
    assert client.phase(0x1234) is Phase.INITIAL_WAIT
    sent_at = []
    now = 0.0
    while (deadline := client.next_deadline()) is not None and deadline < 10:
        assert client.poll(deadline - 1e-6) == []  # nothing before its time
        now = deadline
        for destination, _, entries in decode_sends(client.poll(now)):
            assert destination == ("127.0.0.1", 30490)
            assert [e.type for e in entries] == [EntryType.FIND_SERVICE]
            sent_at.append(round(now, 6))
    # 0.2 s initial delay, then 10, 20, 40 ms (PRS_SOMEIPSD_00405/00406), 3 repetitions (00407)
    assert sent_at == [0.2, 0.21, 0.23, 0.27]
    assert client.phase(0x1234) is Phase.MAIN and client.next_deadline() is None  # no cyclic find (00415)


def test_no_repetitions_goes_straight_to_the_main_phase() -> None:
    client, _ = started_client(repetitions_max=0)
    assert len(client.poll(0.2)) == 1 and client.phase(0x1234) is Phase.MAIN  # PRS_SOMEIPSD_00409


def offer_from_server(client: SdClient, now: float, *, session: int, ttl: int = 3, flags: int = 0xC0,
                      multicast: bool = False) -> list[tuple[tuple[str, int], int, list[Entry]]]:
    data = scapy_sd([offer(ttl=ttl)], [server_endpoint()], session=session, flags=flags)
    return decode_sends(client.handle_datagram(data, SERVER, multicast=multicast, now=now))


def ack_from_server(client: SdClient, now: float, *, session: int, ttl: int = 4, flags: int = 0xC0) -> None:
    data = scapy_sd([ack(ttl=ttl)], session=session, flags=flags)
    assert client.handle_datagram(data, SERVER, multicast=False, now=now) == []


def test_an_offer_in_the_initial_wait_subscribes_and_ends_the_find_phases() -> None:
    client, _ = started_client()
    ((destination, session, entries),) = offer_from_server(client, 0.05, session=1)
    assert destination == SERVER and session == 1
    (sub,) = entries
    assert (sub.type, sub.service_id, sub.instance_id, sub.major_version, sub.ttl, sub.eventgroup_id) == (
        EntryType.SUBSCRIBE_EVENTGROUP, 0x1234, 1, 1, 4, 0x10)
    assert sub.endpoints == (Endpoint(OptionType.IP4_ENDPOINT, *ENDPOINT),)
    assert client.phase(0x1234) is Phase.MAIN  # PRS_SOMEIPSD_00408: no FindService after it
    assert client.group_state(0x1234, 0x10) is GroupState.PENDING
    ack_from_server(client, 0.06, session=2)
    assert client.group_state(0x1234, 0x10) is GroupState.SUBSCRIBED
    assert client.subscriptions() == [(0x1234, 1, 0x10, True)]


def test_subscription_is_renewed_before_half_its_ttl_and_lapses_without_acks() -> None:
    client, _ = started_client()
    offer_from_server(client, 0.0, session=1, ttl=TTL_INFINITE)
    ack_from_server(client, 0.0, session=2, ttl=4)
    assert client.next_deadline() == pytest.approx(2.0)
    assert client.poll(1.99) == []
    ((_, _, (renewal,)),) = decode_sends(client.poll(2.0))
    assert renewal.type is EntryType.SUBSCRIBE_EVENTGROUP and renewal.ttl == 4
    assert client.group_state(0x1234, 0x10) is GroupState.SUBSCRIBED  # still, until its TTL runs out
    # No ack: resent every subscribe_retry_ms, and at 4 s the subscription has lapsed.
    assert len(client.poll(2.2)) == 1
    client.poll(4.0)
    assert client.group_state(0x1234, 0x10) is GroupState.PENDING
    assert client.counters["subscription_expired"] == 1


def test_nack_is_counted_and_the_subscription_retried() -> None:
    client, _ = started_client()
    offer_from_server(client, 0.0, session=1)
    ack_from_server(client, 0.01, session=2, ttl=0)  # SubscribeEventgroupNack
    assert client.errors["nack"] == 1 and client.group_state(0x1234, 0x10) is GroupState.NACKED
    assert client.poll(0.2) == []
    ((_, _, (retry,)),) = decode_sends(client.poll(0.211))
    assert retry.type is EntryType.SUBSCRIBE_EVENTGROUP
    ack_from_server(client, 0.22, session=3)
    assert client.group_state(0x1234, 0x10) is GroupState.SUBSCRIBED


def test_an_ack_must_match_service_instance_eventgroup_and_major() -> None:
    client, _ = started_client()
    offer_from_server(client, 0.0, session=1)
    for session, wrong in enumerate((ack(instance=2), ack(major=2), ack(group=0x11)), start=2):  # PRS_SOMEIPSD_00829
        client.handle_datagram(scapy_sd([wrong], session=session), SERVER, multicast=False, now=0.01)
    assert client.group_state(0x1234, 0x10) is GroupState.PENDING


def test_stop_offer_and_offer_ttl_end_the_subscription() -> None:
    client, _ = started_client()
    offer_from_server(client, 0.0, session=1, ttl=3)
    ack_from_server(client, 0.0, session=2)
    assert offer_from_server(client, 0.5, session=3, ttl=0) == []  # StopOfferService
    assert client.group_state(0x1234, 0x10) is GroupState.IDLE and client.availability() == [(0x1234, 1, False)]
    assert client.phase(0x1234) is Phase.MAIN
    # A new offer; then silence: at its TTL the service is lost and the find phases start over.
    offer_from_server(client, 1.0, session=4, ttl=3)
    ack_from_server(client, 1.0, session=5)
    assert client.first_notification(1.5) == 1.5
    client.poll(4.0)
    assert client.counters["offer_expired"] == 1 and client.phase(0x1234) is Phase.INITIAL_WAIT
    assert client.group_state(0x1234, 0x10) is GroupState.IDLE
    assert client.waiting_since == 4.0


@pytest.mark.parametrize(("offer1", "ack1", "offer2", "reboot"), [
    ((5, 0x40), (6, 0x40), (1, 0xC0), True),  # reboot flag 0 -> 1 (PRS_SOMEIPSD_00258)
    ((5, 0xC0), (6, 0xC0), (1, 0xC0), True),  # both 1, the session went back
    ((5, 0xC0), (6, 0xC0), (6, 0xC0), True),  # both 1, the same session again
    ((5, 0xC0), (6, 0xC0), (7, 0xC0), False),
    ((0xFFFF, 0xC0), (1, 0x40), (2, 0x40), False),  # the partner's session wrapped: its flag drops to 0
])
def test_reboot_detection(offer1: tuple[int, int], ack1: tuple[int, int], offer2: tuple[int, int],
                          reboot: bool) -> None:
    client, _ = started_client()
    offer_from_server(client, 0.0, session=offer1[0], flags=offer1[1])
    ack_from_server(client, 0.0, session=ack1[0], flags=ack1[1])
    assert client.group_state(0x1234, 0x10) is GroupState.SUBSCRIBED
    assert client.first_notification(0.5) == 0.5
    sends = offer_from_server(client, 1.0, session=offer2[0], flags=offer2[1])
    assert client.counters["reboots"] == int(reboot)
    assert len(sends) == 1  # every offer (re)subscribes
    if reboot:  # the subscription starts over: pending until a new ack, and the timer restarts
        assert client.group_state(0x1234, 0x10) is GroupState.PENDING and client.waiting_since == 1.0
    else:
        assert client.group_state(0x1234, 0x10) is GroupState.SUBSCRIBED and client.waiting_since is None


def test_unicast_and_multicast_sessions_are_tracked_apart() -> None:
    client, _ = started_client()
    offer_from_server(client, 0.0, session=40, multicast=True)
    ack_from_server(client, 0.0, session=2)  # unicast channel: its own counter, lower, no reboot
    offer_from_server(client, 1.0, session=41, multicast=True)
    assert client.counters["reboots"] == 0


def test_our_session_ids_and_reboot_flag() -> None:
    sessions = _Sessions()
    a, b = ("10.0.0.1", 30490), ("10.0.0.2", 30490)
    assert [sessions.take(a) for _ in range(3)] == [(1, True), (2, True), (3, True)]
    assert sessions.take(b) == (1, True) and sessions.take(None) == (1, True)  # per channel
    sessions.next_id[a] = 0xFFFF
    assert sessions.take(a) == (0xFFFF, True)
    assert sessions.take(a) == (1, False)  # wrapped to 1, never 0; the reboot flag drops (00255)
    assert sessions.take(b) == (2, True)


def test_the_first_notification_is_timed_once_per_restart() -> None:
    client, _ = started_client()
    assert client.first_notification(1.25) == pytest.approx(1.25)
    assert client.first_notification(2.0) is None


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="unicast-only SD needs at least one peer"):
        options(peers=[])
    with pytest.raises(ValueError, match="address:port"):
        options(peers=["127.0.0.1"])
    with pytest.raises(ValueError, match="not an IPv4 multicast"):
        options(multicast="10.0.0.1")
    with pytest.raises(ValueError, match="must not exceed"):
        options(initial_delay_min_ms=10, initial_delay_max_ms=5)
    with pytest.raises(ValueError, match="distinct"):
        options(services=[{"service_id": 1, "eventgroups": [1, 1]}])
    with pytest.raises(ValueError, match="Extra inputs"):
        options(typo=1)

