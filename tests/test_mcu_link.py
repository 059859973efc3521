"""McuLink against the MCU emulator over a real pty pair (the link opens the slave with
pyserial, the emulator drives the master)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cerebellumd.drivers.base import DriverError
from cerebellumd.drivers.mcu_emulator import McuEmulator
from cerebellumd.drivers.mcu_link import McuLink, McuLinkOptions
from cerebellumd.drivers.mcu_protocol import (
    Ack,
    Message,
    MsgType,
    NackCode,
    NextWake,
    PowerDownAllowed,
    RailAction,
    Readings,
    Reason,
    SleepRequest,
    WakeRequest,
    encode,
)

from .helpers import until

# The conditions here settle within seconds: a tighter deadline than the shared default.
wait_until = functools.partial(until, timeout=5.0)


@pytest.fixture
async def emulator() -> AsyncIterator[McuEmulator]:
    emu = McuEmulator(heartbeat_interval_s=0.05, readings_interval_s=0.1)
    await emu.async_open()
    emu.start()
    yield emu
    await emu.stop()


def _options(port: str, **kw: int) -> McuLinkOptions:
    return McuLinkOptions(port=port, heartbeat_timeout_ms=kw.pop("heartbeat_timeout_ms", 400),
                          reconnect_initial_ms=50, reconnect_max_ms=200, **kw)


@pytest.fixture
async def link(emulator: McuEmulator) -> AsyncIterator[McuLink]:
    lk = McuLink(_options(emulator.path))
    await lk.async_start()
    await lk.wait_connected(5)
    yield lk
    await lk.async_close()


async def test_heartbeats_and_readings_arrive(link: McuLink) -> None:
    await wait_until(lambda: link.last_readings is not None and not link.stale)
    assert link.last_heartbeat is not None
    assert isinstance(link.last_readings, Readings)
    assert link.last_readings.battery_mv == 12_600
    assert link.all_counters["frames"] >= 2
    assert link.all_counters["crc"] == 0


async def test_rail_command_is_acked_and_reflected_in_readings(
    link: McuLink, emulator: McuEmulator
) -> None:
    await link.async_send_rail_command(True, timeout=2)
    assert emulator.rail_on
    await wait_until(lambda: link.last_readings is not None and link.last_readings.rail_on)
    await link.async_send_rail_command(False, timeout=2)
    assert not emulator.rail_on
    await link.async_send_rail_command(RailAction.RESET, timeout=2)
    assert emulator.rail_on
    actions = [m.body.action for m in emulator.stats.received if hasattr(m.body, "action")]
    assert actions == [RailAction.ON, RailAction.OFF, RailAction.RESET]


async def test_nack_and_missing_ack_raise_driver_error(link: McuLink, emulator: McuEmulator) -> None:
    emulator.misbehave.nack_rail_commands = NackCode.FAULT
    with pytest.raises(DriverError, match="FAULT"):
        await link.async_send_rail_command(True, timeout=2)
    assert link.counters["nacks"] == 1
    emulator.misbehave.nack_rail_commands = None
    emulator.misbehave.ignore_rail_commands = True
    with pytest.raises(DriverError, match="acknowledge"):
        await link.async_send_rail_command(True, timeout=0.2)
    assert link.counters["ack_timeouts"] == 1
    assert not emulator.rail_on


async def test_garbage_bad_crc_and_partial_frames_are_survived(
    link: McuLink, emulator: McuEmulator
) -> None:
    got: list[Message] = []
    link.add_listener(got.append)
    emulator.inject_garbage(b"\xa5\xa5\x00 line noise \xff" * 8)
    emulator.inject_bad_crc()
    # A frame split across two writes with a pause in between.
    frame = encode(WakeRequest(reason=3), seq=77)
    emulator.write_raw(frame[:4])
    await wait_until(lambda: link.parser.buffered > 0 or link.all_counters["garbage_bytes"] > 0)
    emulator.write_raw(frame[4:])
    await wait_until(lambda: any(m.seq == 77 for m in got))
    assert link.all_counters["crc"] >= 1
    assert link.all_counters["garbage_bytes"] > 0
    # The link acknowledged the wake request back to the MCU.
    await wait_until(lambda: any(
        isinstance(m.body, Ack) and m.body.acked_seq == 77 for m in emulator.stats.received))
    await link.async_send_rail_command(True, timeout=2)  # still fully working


async def test_wake_and_sleep_requests_reach_listeners(link: McuLink, emulator: McuEmulator) -> None:
    got: list[Message] = []
    link.add_listener(got.append)
    emulator.send_wake_request(2)
    emulator.send_sleep_request(4)
    await wait_until(lambda: any(isinstance(m.body, SleepRequest) for m in got))
    bodies = [m.body for m in got if isinstance(m.body, WakeRequest | SleepRequest)]
    assert bodies == [WakeRequest(2), SleepRequest(4)]
    await wait_until(lambda: len([m for m in emulator.stats.received
                                  if isinstance(m.body, Ack)]) >= 2)
    acked = [m.body.acked_type for m in emulator.stats.received if isinstance(m.body, Ack)]
    assert acked == [MsgType.WAKE_REQUEST, MsgType.SLEEP_REQUEST]


async def test_silent_link_goes_stale_then_recovers(link: McuLink, emulator: McuEmulator) -> None:
    await wait_until(lambda: not link.stale)
    emulator.misbehave.silent = True
    await wait_until(lambda: link.stale, timeout=3)
    assert link.counters["stale"] == 1
    assert link.connected  # silent, not disconnected
    emulator.misbehave.silent = False
    await wait_until(lambda: not link.stale, timeout=3)
    assert link.counters["stale"] == 1


async def test_a_failing_listener_does_not_break_the_link(link: McuLink) -> None:
    def bad(message: Message) -> None:
        raise RuntimeError("consumer bug")

    link.add_listener(bad)
    await wait_until(lambda: link.counters["listener_errors"] >= 2)
    await link.async_send_rail_command(True, timeout=2)


async def test_send_while_disconnected_is_a_driver_error(tmp_path: Path) -> None:
    lk = McuLink(_options(str(tmp_path / "no-such-tty")))
    await lk.async_start()
    try:
        await wait_until(lambda: lk.counters["open_failures"] >= 2)
        assert lk.stale and not lk.connected
        with pytest.raises(DriverError, match="not connected"):
            await lk.async_send_rail_command(True, timeout=0.1)
    finally:
        await lk.async_close()


async def test_reconnects_after_hangup_with_backoff(tmp_path: Path) -> None:
    emu = McuEmulator(heartbeat_interval_s=0.05, readings_interval_s=0.1,
                      link_path=tmp_path / "ttyMCU")
    await emu.async_open()
    emu.start()
    lk = McuLink(_options(emu.path))
    await lk.async_start()
    try:
        await lk.wait_connected(5)
        await wait_until(lambda: not lk.stale)
        emu.hangup()
        await wait_until(lambda: lk.counters["connections_lost"] == 1)
        assert lk.stale
        # The old pty is gone: opening the dangling symlink fails and is retried.
        await wait_until(lambda: lk.counters["open_failures"] >= 1)
        await emu.async_reopen()
        await wait_until(lambda: lk.counters["connects"] == 2 and not lk.stale)
        await lk.async_send_rail_command(True, timeout=2)
        assert emu.rail_on
    finally:
        await lk.async_close()
        await emu.stop()


# -- gateway commands: power-down permission and next wake -----------------------------------------


async def test_power_down_and_next_wake_are_acknowledged(emulator: McuEmulator, link: McuLink) -> None:
    assert await link.async_allow_power_down(True, 30, Reason.ENERGY_BUDGET) == 1
    assert emulator.power_down == PowerDownAllowed(True, 30, Reason.ENERGY_BUDGET)
    assert await link.async_set_next_wake(3600, Reason.TIMER) == 1
    assert emulator.next_wake == NextWake(3600, Reason.TIMER)
    assert link.counters["ack_timeouts"] == 0 and link.counters["command_repeats"] == 0


async def test_a_lost_ack_is_repeated_with_the_same_seq(emulator: McuEmulator, link: McuLink) -> None:
    emulator.misbehave.drop_power_acks = 2  # the first two ACKs are lost on the line
    frames = await link.async_allow_power_down(True, 10, Reason.PARKED_TIME, timeout=0.2)
    assert frames == 3
    sent = [m for m in emulator.stats.received if isinstance(m.body, PowerDownAllowed)]
    assert len(sent) == 3 and len({m.seq for m in sent}) == 1  # one command, repeated
    assert emulator.power_commands_applied == 1  # applied once
    assert link.counters["command_repeats"] == 2 and link.counters["ack_timeouts"] == 2


async def test_firmware_without_the_commands_gets_no_ack_and_the_caller_is_told(
        emulator: McuEmulator, link: McuLink) -> None:
    emulator.misbehave.legacy_firmware = True  # a version-1 MCU from before these types
    with pytest.raises(DriverError, match="did not acknowledge POWER_DOWN_ALLOWED after 3 frame"):
        await link.async_allow_power_down(True, 10, Reason.ENERGY_BUDGET, timeout=0.1)
    assert link.counters["ack_timeouts"] == 3 and link.counters["command_repeats"] == 2
    assert emulator.power_down is None
    # A rail command still works: nothing that worked before changed.
    await link.async_send_rail_command(True)
    assert emulator.rail_on


async def test_an_ack_of_another_type_does_not_answer_a_command(emulator: McuEmulator, link: McuLink) -> None:
    emulator.misbehave.legacy_firmware = True
    task = asyncio.create_task(link.async_set_next_wake(60, Reason.TIMER, attempts=1, timeout=0.3))
    await wait_until(lambda: any(isinstance(m.body, NextWake) for m in emulator.stats.received))
    seq = next(m.seq for m in emulator.stats.received if isinstance(m.body, NextWake))
    emulator.send(Ack(seq, MsgType.RAIL_COMMAND))  # right seq, wrong type
    with pytest.raises(DriverError, match="NEXT_WAKE"):
        await task
