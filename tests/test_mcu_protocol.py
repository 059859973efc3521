"""Companion-MCU protocol: encode/decode, resynchronisation, error counters, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cerebellumd.drivers.mcu_protocol import (
    MAX_FRAME,
    MAX_WAKE_IN_S,
    SOF,
    Ack,
    Body,
    FrameParser,
    Heartbeat,
    Message,
    Nack,
    NextWake,
    PowerDownAllowed,
    RailAction,
    RailCommand,
    Readings,
    SleepRequest,
    WakeRequest,
    crc16,
    encode,
)

READINGS = Readings(battery_mv=12_480, mcu_temp_dc=412, accel_temp_dc=-55, rail_mv=5_020,
                    rail_ma=2_310, rail_mw=11_596, rail_on=True)
BODIES: list[Body] = [
    Heartbeat(uptime_ms=123_456, status=0x0003),
    WakeRequest(reason=2),
    SleepRequest(reason=1),
    READINGS,
    RailCommand(RailAction.RESET),
    PowerDownAllowed(allow=True, after_s=65535, reason=8),
    PowerDownAllowed(allow=False, after_s=0, reason=0),
    NextWake(wake_in_s=MAX_WAKE_IN_S, reason=4),
    NextWake(wake_in_s=0, reason=0),
    Ack(acked_seq=9, acked_type=0x10),
    Nack(acked_seq=9, acked_type=0x10, code=3),
]


def test_crc_is_ccitt_false() -> None:
    assert crc16(b"123456789") == 0x29B1


@pytest.mark.parametrize("body", BODIES)
def test_every_message_round_trips(body: Body) -> None:
    parser = FrameParser()
    assert parser.feed(encode(body, seq=200)) == [Message(200, body)]
    assert parser.counters["frames"] == 1
    assert parser.buffered == 0


def test_frame_layout_is_as_documented() -> None:
    frame = encode(WakeRequest(reason=7), seq=0x42)
    assert frame[:2] == SOF
    assert frame[2:6] == bytes((1, 0x02, 0x42, 1))
    assert frame[6] == 7
    assert int.from_bytes(frame[7:9], "big") == crc16(frame[2:7])


def test_readings_as_signals_in_si_units() -> None:
    s = READINGS.as_signals()
    assert s["battery_v"] == pytest.approx(12.48)
    assert s["accel_temp_c"] == pytest.approx(-5.5)
    assert s["rail_w"] == pytest.approx(11.596)
    assert s["rail_on"] == 1.0


def test_partial_frames_byte_by_byte() -> None:
    parser = FrameParser()
    frame = encode(READINGS, seq=1)
    got: list[Message] = []
    for i in range(len(frame)):
        got += parser.feed(frame[i : i + 1])
        if i < len(frame) - 1:
            assert got == []
    assert got == [Message(1, READINGS)]
    assert parser.counters["garbage_bytes"] == 0


def test_resync_after_garbage_and_each_error_kind_is_counted() -> None:
    parser = FrameParser()
    good = encode(Heartbeat(1, 0), seq=1)
    bad_crc = bytearray(encode(Heartbeat(2, 0), seq=2))
    bad_crc[-1] ^= 0xFF
    bad_version = encode(Heartbeat(3, 0), seq=3, version=9)
    too_long = SOF + bytes((1, 0x01, 4, 200)) + b"\x00" * 10
    unknown_type_inner = bytes((1, 0x55, 5, 1, 0))
    unknown_type = SOF + unknown_type_inner + crc16(unknown_type_inner).to_bytes(2, "big")
    wrong_size_inner = bytes((1, 0x01, 6, 1, 0))
    wrong_size = SOF + wrong_size_inner + crc16(wrong_size_inner).to_bytes(2, "big")
    stream = (b"\x00noise\xa5" + bytes(bad_crc) + bad_version + too_long + unknown_type
              + wrong_size + good)
    assert parser.feed(stream) == [Message(1, Heartbeat(1, 0))]
    c = parser.counters
    assert (c["crc"], c["version"], c["length"], c["unknown_type"]) == (1, 1, 2, 1)
    assert c["garbage_bytes"] > len(b"\x00noise")
    assert c["frames"] == 1


def test_garbage_that_looks_like_sof_does_not_swallow_the_next_frame() -> None:
    # A lone SOF followed by a header claiming a long payload: the real frame inside the
    # "payload" must still be found once the CRC fails.
    parser = FrameParser()
    frame = encode(WakeRequest(1), seq=3)
    stream = SOF + bytes((1, 0x01, 0, 40)) + frame + b"\x00" * 40
    assert Message(3, WakeRequest(1)) in parser.feed(stream)
    assert parser.counters["crc"] == 1


def test_bad_rail_action_counts_bad_value() -> None:
    inner = bytes((1, 0x10, 1, 1, 9))
    parser = FrameParser()
    assert parser.feed(SOF + inner + crc16(inner).to_bytes(2, "big")) == []
    assert parser.counters["bad_value"] == 1


@pytest.mark.parametrize(("mtype", "payload", "kind"), [
    (0x11, bytes((2, 0, 30, 8)), "bad_value"),  # allow is 0 or 1
    (0x12, (MAX_WAKE_IN_S + 1).to_bytes(4, "big") + b"\x04", "bad_value"),
    (0x11, bytes((1, 0, 30)), "length"),
    (0x12, bytes(6), "length"),
])
def test_power_commands_out_of_range_are_counted(mtype: int, payload: bytes, kind: str) -> None:
    inner = bytes((1, mtype, 1, len(payload))) + payload
    parser = FrameParser()
    good = encode(NextWake(60, 4), 2)
    assert parser.feed(SOF + inner + crc16(inner).to_bytes(2, "big") + good) == [Message(2, NextWake(60, 4))]
    assert parser.counters[kind] == 1 and parser.counters["frames"] == 1


def test_reset_drops_a_partial_frame() -> None:
    parser = FrameParser()
    parser.feed(encode(READINGS, seq=1)[:5])
    assert parser.buffered == 5
    parser.reset()
    assert parser.buffered == 0
    assert parser.feed(encode(READINGS, seq=2)) == [Message(2, READINGS)]


_bodies = st.sampled_from(BODIES)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_fuzz_never_raises_and_stays_bounded(chunks: list[bytes]) -> None:
    parser = FrameParser()
    fed = 0
    for chunk in chunks:
        parser.feed(chunk)
        fed += len(chunk)
        assert parser.buffered < MAX_FRAME
    c = parser.counters
    assert c["garbage_bytes"] + parser.buffered <= fed


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.binary(max_size=40), _bodies), min_size=1, max_size=6),
    st.integers(1, 17),
)
def test_fuzz_recovers_valid_frames_after_garbage(
    items: list[tuple[bytes, Body]], chunk_size: int
) -> None:
    # Garbage may contain a partial frame that swallows the start of the next real one: that
    # is why each real frame is followed by a spacer of zeros long enough to flush any
    # candidate (a header claiming up to MAX_PAYLOAD bytes fails its CRC within MAX_FRAME).
    stream = b""
    expected: list[Message] = []
    for i, (garbage, body) in enumerate(items):
        stream += garbage + b"\x00" * MAX_FRAME + encode(body, seq=i)
        expected.append(Message(i, body))
    parser = FrameParser()
    got: list[Message] = []
    for pos in range(0, len(stream), chunk_size):
        got += parser.feed(stream[pos : pos + chunk_size])
    assert got[-len(expected):] == expected
    assert parser.buffered == 0
