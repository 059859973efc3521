"""Ticker semantics with a fake timerfd and clock at the seam, plus real-timer smoke tests.

The fake timer is a non-blocking pipe: ``fire(n)`` writes the 8-byte expiration count the
kernel would, so the real ``loop.add_reader`` path runs and the test decides exactly how many
periods have elapsed. No test depends on wall-clock speed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import struct
from collections.abc import Callable

import pytest

from cerebellumd.daemon import ticker as ticker_mod
from cerebellumd.daemon.ticker import LinuxTimerFd, Ticker, TickInfo

PERIOD = 0.01
T0 = 1000.0
WAIT_S = 5.0  # generous deadline for an event that should arrive within a few ms


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeTimer:
    """TimerFdOps over a pipe; records every call so tests can check arming and teardown."""

    def __init__(self) -> None:
        self.armed: list[tuple[float, float]] = []
        self.closed: list[int] = []
        self.reader_registered_at_close: list[bool] = []
        self._w: int | None = None
        self.fd: int | None = None

    def create(self) -> int:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self.fd, self._w = r, w
        return r

    def settime(self, fd: int, first_deadline_s: float, interval_s: float) -> None:
        self.armed.append((first_deadline_s, interval_s))

    def read(self, fd: int) -> int:
        try:
            data = os.read(fd, 8)
        except BlockingIOError:
            return 0
        return int(struct.unpack("=Q", data)[0])

    def close(self, fd: int) -> None:
        # remove_reader() returns True only if a reader was still registered on the fd.
        loop = asyncio.get_running_loop()
        self.reader_registered_at_close.append(loop.remove_reader(fd))
        self.closed.append(fd)
        os.close(fd)
        if self._w is not None:
            os.close(self._w)
            self._w = None

    def fire(self, expirations: int = 1) -> None:
        assert self._w is not None
        os.write(self._w, struct.pack("=Q", expirations))


class Recorder:
    """Tick callback that records TickInfo and lets the test await the n-th tick."""

    def __init__(self, action: Callable[[TickInfo], None] | None = None) -> None:
        self.ticks: list[TickInfo] = []
        self._action = action
        self._changed = asyncio.Event()

    def __call__(self, info: TickInfo) -> None:
        self.ticks.append(info)
        self._changed.set()
        if self._action is not None:
            self._action(info)

    async def wait_count(self, n: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while len(self.ticks) < n:
                self._changed.clear()
                await self._changed.wait()


def make_fake_ticker(rec: Recorder) -> tuple[Ticker, FakeTimer, FakeClock]:
    timer, clock = FakeTimer(), FakeClock()
    t = Ticker(PERIOD, rec, timer=timer, clock=clock, use_timerfd=True)
    return t, timer, clock


async def test_timerfd_armed_at_absolute_deadline_with_period_interval() -> None:
    rec = Recorder()
    t, timer, _ = make_fake_ticker(rec)
    t.start()
    try:
        assert t.backend == "timerfd"
        assert len(timer.armed) == 1
        assert timer.armed[0] == pytest.approx((T0 + PERIOD, PERIOD))
    finally:
        t.stop()


async def test_ticks_carry_absolute_deadlines_and_lateness() -> None:
    rec = Recorder()
    t, timer, clock = make_fake_ticker(rec)
    t.start()
    try:
        for k in (1, 2, 3):
            clock.now = T0 + k * PERIOD + 0.0004  # 400 us late
            timer.fire(1)
            await rec.wait_count(k)
        assert [i.index for i in rec.ticks] == [1, 2, 3]
        assert [i.deadline for i in rec.ticks] == pytest.approx(
            [T0 + PERIOD, T0 + 2 * PERIOD, T0 + 3 * PERIOD])
        assert [i.lateness_s for i in rec.ticks] == pytest.approx([0.0004] * 3)
        assert all(i.expirations == 1 for i in rec.ticks)
        assert t.overruns == 0
    finally:
        t.stop()


async def test_overrun_skips_missed_deadlines_without_catch_up_burst() -> None:
    rec = Recorder()
    t, timer, clock = make_fake_ticker(rec)
    t.start()
    try:
        clock.now = T0 + PERIOD
        timer.fire(1)
        await rec.wait_count(1)
        # The loop stalls for 4 periods: the kernel reports 4 expirations in one read.
        clock.now = T0 + 5 * PERIOD + 0.001
        timer.fire(4)
        await rec.wait_count(2)
        clock.now = T0 + 6 * PERIOD
        timer.fire(1)
        await rec.wait_count(3)
        # One callback for the stall (index jumps 1 -> 5), then normal ticks: no burst.
        assert [i.index for i in rec.ticks] == [1, 5, 6]
        assert [i.expirations for i in rec.ticks] == [1, 4, 1]
        assert rec.ticks[1].deadline == pytest.approx(T0 + 5 * PERIOD)
        assert rec.ticks[1].lateness_s == pytest.approx(0.001)
        assert t.overruns == 3
    finally:
        t.stop()


async def test_spurious_wakeup_with_nothing_to_read_does_not_tick() -> None:
    rec = Recorder()
    t, timer, _ = make_fake_ticker(rec)
    t.start()
    try:
        timer.fire(0)  # a read returning a zero count must not produce a tick
        timer.fire(1)
        await rec.wait_count(1)
        assert [i.index for i in rec.ticks] == [1]
    finally:
        t.stop()


async def test_lateness_is_never_negative() -> None:
    rec = Recorder()
    t, timer, clock = make_fake_ticker(rec)
    t.start()
    try:
        clock.now = T0 + PERIOD - 1e-6  # clocks disagree by a hair
        timer.fire(1)
        await rec.wait_count(1)
        assert rec.ticks[0].lateness_s == 0.0
    finally:
        t.stop()


async def test_callback_exception_is_logged_and_ticker_keeps_going(
        caplog: pytest.LogCaptureFixture) -> None:
    def explode_on_first(info: TickInfo) -> None:
        if info.index == 1:
            raise RuntimeError("policy bug")

    rec = Recorder(explode_on_first)
    t, timer, clock = make_fake_ticker(rec)
    caplog.set_level(logging.ERROR, logger=ticker_mod.__name__)
    t.start()
    try:
        clock.now = T0 + PERIOD
        timer.fire(1)
        await rec.wait_count(1)
        clock.now = T0 + 2 * PERIOD
        timer.fire(1)
        await rec.wait_count(2)
        assert [i.index for i in rec.ticks] == [1, 2]
        assert any("policy bug" in (r.exc_text or str(r.exc_info)) for r in caplog.records)
    finally:
        t.stop()


async def test_stop_is_idempotent_and_removes_reader_before_close() -> None:
    rec = Recorder()
    t, timer, _ = make_fake_ticker(rec)
    t.start()
    fd = timer.fd
    t.stop()
    t.stop()
    assert timer.closed == [fd]
    assert timer.reader_registered_at_close == [False]


async def test_stop_before_start_is_harmless() -> None:
    rec = Recorder()
    t, timer, _ = make_fake_ticker(rec)
    t.stop()
    assert timer.closed == []


def test_start_outside_running_loop_raises() -> None:
    t = Ticker(PERIOD, lambda _info: None, use_timerfd=False)
    with pytest.raises(RuntimeError):
        t.start()


async def test_start_twice_raises() -> None:
    rec = Recorder()
    t, _, _ = make_fake_ticker(rec)
    t.start()
    try:
        with pytest.raises(RuntimeError):
            t.start()
    finally:
        t.stop()


def test_bad_period_rejected() -> None:
    for bad in (0.0, -0.01, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            Ticker(bad, lambda _info: None, use_timerfd=False)


def test_auto_falls_back_to_call_at_when_timerfd_missing(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(ticker_mod, "linux_timerfd", lambda: None)
    caplog.set_level(logging.WARNING, logger=ticker_mod.__name__)
    t = Ticker(PERIOD, lambda _info: None)
    assert t.backend == "call_at"
    assert any("timerfd is unavailable" in r.getMessage() for r in caplog.records)
    with pytest.raises(OSError):
        Ticker(PERIOD, lambda _info: None, use_timerfd=True)


async def test_call_at_fallback_absolute_deadlines_and_skips() -> None:
    """Fake clock decides which deadlines have passed; the real loop only delivers wake-ups."""
    clock = FakeClock(T0)
    # What the fake clock reads at each following tick (each callback sets the next one).
    script = iter([
        T0 + 2 * PERIOD + 0.0002,  # tick 2, 200 us late
        T0 + 6 * PERIOD + 0.0005,  # stall: deadlines 3..6 passed -> one callback for 6
        T0 + 7 * PERIOD + 0.000001,  # back to normal
    ])

    def advance(_info: TickInfo) -> None:
        clock.now = next(script, clock.now)

    rec = Recorder(advance)
    t = Ticker(PERIOD, rec, use_timerfd=False, clock=clock)
    assert t.backend == "call_at"
    t.start()  # t0 = T0
    clock.now = T0 + PERIOD + 0.0001  # tick 1, 100 us late
    try:
        await rec.wait_count(4)
    finally:
        t.stop()
    got = rec.ticks[:4]
    assert [i.index for i in got] == [1, 2, 6, 7]
    assert [i.expirations for i in got] == [1, 1, 4, 1]
    assert [i.deadline for i in got] == pytest.approx([T0 + k * PERIOD for k in (1, 2, 6, 7)])
    assert [i.lateness_s for i in got] == pytest.approx([0.0001, 0.0002, 0.0005, 0.000001])
    assert t.overruns == 3


async def test_call_at_fallback_stop_cancels_pending_tick() -> None:
    rec = Recorder()
    t = Ticker(PERIOD, rec, use_timerfd=False)
    t.start()
    await rec.wait_count(1)
    t.stop()
    t.stop()
    n = len(rec.ticks)
    # A stopped ticker schedules nothing: after the loop has had several periods' worth of
    # chances to run a stale handle, the count is unchanged. Wait on a real timer, not sleep().
    done = asyncio.Event()
    asyncio.get_running_loop().call_later(5 * PERIOD, done.set)
    await asyncio.wait_for(done.wait(), WAIT_S)
    assert len(rec.ticks) == n


async def test_real_timerfd_smoke() -> None:
    rec = Recorder()
    t = Ticker(0.005, rec)
    assert t.backend == "timerfd"
    t.start()
    try:
        await rec.wait_count(5)
    finally:
        t.stop()
    idx = [i.index for i in rec.ticks]
    assert all(b > a for a, b in itertools.pairwise(idx))
    first = rec.ticks[0]
    for info in rec.ticks:
        assert info.lateness_s >= 0
        assert info.deadline == pytest.approx(
            first.deadline + (info.index - first.index) * 0.005, abs=1e-6)
        assert info.now >= info.deadline - 1e-6


async def test_real_timerfd_read_when_nothing_pending_returns_zero() -> None:
    ops = LinuxTimerFd()
    fd = ops.create()
    try:
        assert os.get_blocking(fd) is False
        assert ops.read(fd) == 0
    finally:
        ops.close(fd)


async def test_real_call_at_smoke() -> None:
    rec = Recorder()
    t = Ticker(0.005, rec, use_timerfd=False)
    t.start()
    try:
        await rec.wait_count(3)
    finally:
        t.stop()
    idx = [i.index for i in rec.ticks]
    assert all(b > a for a, b in itertools.pairwise(idx))
