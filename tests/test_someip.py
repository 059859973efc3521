"""SOME/IP: header validation, field mapping, fuzzing, and a real loopback UDP socket."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cerebellumd.drivers.someip import (
    MessageType,
    SomeIpDecoder,
    SomeIpError,
    SomeIpFieldSpec,
    SomeIpOptions,
    SomeIpReceiver,
    build_message,
    build_notification,
    encode_payload,
    iter_messages,
    parse_packet,
)

SPEED = SomeIpFieldSpec(
    notification="vehicle", service_id=0x1234, event_id=0x8001, field="speed_kmh",
    offset=0, type="u16", scale=0.01,
)
GEAR = SomeIpFieldSpec(
    notification="vehicle", service_id=0x1234, event_id=0x8001, field="gear",
    offset=2, type="i8",
)
TEMP = SomeIpFieldSpec(
    notification="thermal", service_id=0x2000, event_id=0x8010, field="npu_c",
    offset=4, type="f32", endianness="little", offset_value=-40.0,
)
FIELDS = [SPEED, GEAR, TEMP]


def test_header_fields_round_trip() -> None:
    packet = build_message(0x1234, 0x8001, b"\x01\x02\x03", client_id=0xABCD, session_id=7,
                           interface_version=3, message_type=MessageType.NOTIFICATION)
    header, payload = parse_packet(packet)
    assert payload == b"\x01\x02\x03"
    assert header.message_id == 0x12348001
    assert header.request_id == 0xABCD0007
    assert header.length == 8 + 3
    assert header.interface_version == 3
    assert header.message_type is MessageType.NOTIFICATION
    assert header.is_event


@pytest.mark.parametrize(
    ("packet", "kind"),
    [
        (b"\x00" * 15, "short"),
        (build_notification(1, 0x8001, b"abcd")[:-1], "length"),
        (build_notification(1, 0x8001, b"abcd") + b"x", "length"),
        (struct.pack(">HHI", 1, 2, 3) + b"\x00" * 8, "length"),
        (build_message(1, 0x8001, b"", protocol_version=2), "version"),
        (build_message(1, 0x8001, b"", message_type=0x7F), "type"),
    ],
)
def test_parse_packet_rejects_with_a_kind(packet: bytes, kind: str) -> None:
    with pytest.raises(SomeIpError) as info:
        parse_packet(packet)
    assert info.value.kind == kind
    assert info.value.reason


def test_decoder_maps_fields_with_scale_offset_and_endianness() -> None:
    payload = encode_payload(FIELDS[:2], {"speed_kmh": 88.5, "gear": -1})
    assert payload[:2] == struct.pack(">H", 8850)
    temp_payload = b"\x00" * 4 + struct.pack("<f", 105.5)
    decoder = SomeIpDecoder(FIELDS)
    datagram = build_notification(0x1234, 0x8001, payload) + build_notification(
        0x2000, 0x8010, temp_payload)
    samples = decoder.decode(datagram)
    assert samples == {"vehicle.speed_kmh": pytest.approx(88.5), "vehicle.gear": -1.0,
                       "thermal.npu_c": pytest.approx(65.5)}
    assert decoder.counters["messages"] == 2


def test_decoder_counts_every_kind_of_bad_input() -> None:
    decoder = SomeIpDecoder(FIELDS)
    assert decoder.decode(b"\x01\x02") == {}
    assert decoder.decode(build_message(0x1234, 0x8001, b"\x00\x00\x00", protocol_version=9)) == {}
    assert decoder.decode(build_message(0x1234, 0x8001, b"\x00\x00\x00", message_type=0x55)) == {}
    assert decoder.decode(build_notification(0x1234, 0x8001, b"\x00\x00\x00")[:-2]) == {}
    # Unknown service/event, and a known id that is a REQUEST, not a notification.
    assert decoder.decode(build_notification(0x9999, 0x8001, b"\x00\x00\x00")) == {}
    assert decoder.decode(build_message(0x1234, 0x8001, b"\x00\x00\x00",
                                        message_type=MessageType.REQUEST)) == {}
    # Payload too short for `gear`: speed still decodes, gear is counted.
    assert decoder.decode(build_notification(0x1234, 0x8001, b"\x00\x64")) == {
        "vehicle.speed_kmh": pytest.approx(1.0)}
    # NaN in a float field.
    nan_payload = b"\0" * 4 + struct.pack("<f", float("nan"))
    assert decoder.decode(build_notification(0x2000, 0x8010, nan_payload)) == {}
    c = decoder.counters
    assert (c["short"], c["version"], c["type"], c["length"]) == (1, 1, 1, 1)
    assert c["unknown_message"] == 2
    assert c["field_out_of_range"] == 1
    assert c["non_finite"] == 1


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_parse_packet_raises_only_someip_error(data: bytes) -> None:
    try:
        header, payload = parse_packet(data)
    except SomeIpError as exc:
        assert exc.kind in ("short", "length", "version", "type")
    else:
        assert len(payload) == header.length - 8


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=24), max_size=4), st.integers(0, 3))
def test_decoder_never_raises_on_fuzzed_datagrams(chunks: list[bytes], pick: int) -> None:
    # Mix random bytes with valid headers so the fuzzer reaches the payload paths.
    valid = build_notification(0x1234, 0x8001, b"\x00\x10\x02")
    datagram = b"".join(chunks[:pick]) + valid + b"".join(chunks[pick:])
    decoder = SomeIpDecoder(FIELDS)
    decoder.decode(datagram)
    assert sum(decoder.counters.values()) >= 1


def test_iter_messages_splits_a_datagram() -> None:
    a = build_notification(1, 0x8001, b"a")
    b = build_notification(2, 0x8002, b"bb")
    parts = list(iter_messages(a + b))
    assert [(h.service_id, p) for h, p in parts] == [(1, b"a"), (2, b"bb")]


async def _wait_for(predicate: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def test_receiver_over_loopback_udp() -> None:
    got: asyncio.Queue[tuple[dict[str, float], float]] = asyncio.Queue()
    receiver = SomeIpReceiver(
        SomeIpOptions(host="127.0.0.1", port=0, fields=FIELDS),
        lambda samples, t: got.put_nowait((samples, t)),
    )
    await receiver.async_start()
    host, port = receiver.local_address
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sender.sendto(b"garbage", (host, port))
        sender.sendto(build_message(0x1234, 0x8001, b"\0\0\0", protocol_version=3), (host, port))
        sender.sendto(build_notification(0x1234, 0x8001, encode_payload(FIELDS[:2], {
            "speed_kmh": 42.0, "gear": 4})), (host, port))
        samples, t = await asyncio.wait_for(got.get(), 5)
        assert samples == {"vehicle.speed_kmh": pytest.approx(42.0), "vehicle.gear": 4.0}
        assert t > 0
        counters = receiver.error_counters
        assert counters["short"] == 1
        assert counters["version"] == 1
        assert counters["datagrams"] == 3
    finally:
        sender.close()
        await receiver.async_close()


async def test_receiver_survives_a_failing_callback() -> None:
    calls = 0

    def callback(samples: dict[str, float], t: float) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("consumer bug")

    receiver = SomeIpReceiver({"host": "127.0.0.1", "port": 0, "fields": [SPEED.model_dump()]},
                              callback)
    await receiver.async_start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packet = build_notification(0x1234, 0x8001, b"\x00\x01")
        sender.sendto(packet, receiver.local_address)
        sender.sendto(packet, receiver.local_address)
        await _wait_for(lambda: calls == 2)
        assert receiver.counters["callback_errors"] == 2
    finally:
        sender.close()
        await receiver.async_close()


async def test_receiver_joins_multicast_group() -> None:
    group = "239.255.42.99"
    got: asyncio.Queue[dict[str, float]] = asyncio.Queue()
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    receiver = SomeIpReceiver(
        SomeIpOptions(port=port, multicast_group=group, multicast_interface="127.0.0.1",
                      fields=[SPEED]),
        lambda samples, t: got.put_nowait(samples),
    )
    try:
        await receiver.async_start()
    except OSError as exc:
        pytest.skip(f"multicast join not possible here: {exc}")
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    try:
        sender.sendto(build_notification(0x1234, 0x8001, b"\x27\x10"), (group, port))
        try:
            samples = await asyncio.wait_for(got.get(), 3)
        except TimeoutError:
            pytest.skip("no multicast route on loopback in this environment")
        assert samples == {"vehicle.speed_kmh": pytest.approx(100.0)}
    finally:
        sender.close()
        await receiver.async_close()
