"""Fixed-period ticker for the decision loop (ARCHITECTURE.md §4).

Deadlines are absolute: tick k is due at ``t0 + k * period`` (``time.monotonic()`` seconds), so
the loop never drifts the way ``sleep(period)`` does. On Linux a timerfd armed with
TFD_TIMER_ABSTIME wakes the loop through ``loop.add_reader``; asyncio's own timers round to
milliseconds in epoll and showed ~5x the p99 lateness (PITFALLS.md, Timers).

Missed periods (a stalled loop, a slow callback) are skipped and counted, never replayed: a burst
of catch-up ticks would hand the policy stale deadlines back to back.

The kernel calls sit behind :class:`TimerFdOps` so tests can inject a fake timer and clock.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["LinuxTimerFd", "TickInfo", "Ticker", "TimerFdOps", "linux_timerfd"]

logger = logging.getLogger(__name__)

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = 0o4000  # 0x800
TFD_CLOEXEC = 0o2000000  # 0x80000
TFD_TIMER_ABSTIME = 1
_NS_PER_S = 1_000_000_000
# A callback that raises on every tick would otherwise log 100 tracebacks a second.
_ERROR_LOG_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class TickInfo:
    index: int  # tick number k (deadline = t0 + k*period), skipping missed ones
    deadline: float  # absolute deadline, time.monotonic() seconds
    now: float  # time.monotonic() when the callback runs
    lateness_s: float  # now - deadline (>= 0)
    expirations: int  # timer expirations read this time; overruns = expirations - 1


class TimerFdOps(Protocol):
    """The four timerfd syscalls the ticker needs (the test seam)."""

    def create(self) -> int:
        """A new non-blocking CLOCK_MONOTONIC timer fd."""
        ...

    def settime(self, fd: int, first_deadline_s: float, interval_s: float) -> None:
        """Arm: first expiry at the absolute monotonic time, then every interval."""
        ...

    def read(self, fd: int) -> int:
        """Expirations since the last read; 0 if none are pending (spurious wake-up)."""
        ...

    def close(self, fd: int) -> None: ...


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _timespec(ns: int) -> _Timespec:
    sec, nsec = divmod(ns, _NS_PER_S)
    return _Timespec(sec, nsec)


class LinuxTimerFd:
    """timerfd via ``os`` (Python >= 3.13) or ctypes on libc (older Pythons)."""

    def __init__(self) -> None:
        # getattr: the names are absent from 3.11's os module and its type stubs.
        self._os_create = getattr(os, "timerfd_create", None)
        self._os_settime_ns = getattr(os, "timerfd_settime_ns", None)
        self._libc: ctypes.CDLL | None = None
        if self._os_create is None or self._os_settime_ns is None:
            # CDLL(None) = symbols already loaded in the process (libc included); avoids
            # ctypes.util.find_library, which spawns ldconfig.
            libc = ctypes.CDLL(None, use_errno=True)
            libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.timerfd_create.restype = ctypes.c_int
            libc.timerfd_settime.argtypes = [
                ctypes.c_int,
                ctypes.c_int,
                ctypes.POINTER(_Itimerspec),
                ctypes.POINTER(_Itimerspec),
            ]
            libc.timerfd_settime.restype = ctypes.c_int
            self._libc = libc

    def create(self) -> int:
        flags = TFD_NONBLOCK | TFD_CLOEXEC
        if self._libc is None:
            assert self._os_create is not None
            fd: int = self._os_create(CLOCK_MONOTONIC, flags=flags)
            return fd
        fd = self._libc.timerfd_create(CLOCK_MONOTONIC, flags)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        return fd

    def settime(self, fd: int, first_deadline_s: float, interval_s: float) -> None:
        first_ns = round(first_deadline_s * _NS_PER_S)
        interval_ns = round(interval_s * _NS_PER_S)
        if self._libc is None:
            assert self._os_settime_ns is not None
            self._os_settime_ns(fd, flags=TFD_TIMER_ABSTIME, initial=first_ns, interval=interval_ns)
            return
        spec = _Itimerspec(_timespec(interval_ns), _timespec(first_ns))
        if self._libc.timerfd_settime(fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def read(self, fd: int) -> int:
        # The fd is non-blocking (TFD_NONBLOCK), so this never blocks the loop; blockbuster
        # agrees (it only flags os.read on blocking fds).
        try:
            data = os.read(fd, 8)
        except BlockingIOError:
            return 0
        (count,) = struct.unpack("=Q", data)
        return int(count)

    def close(self, fd: int) -> None:
        os.close(fd)


def linux_timerfd() -> LinuxTimerFd | None:
    """The real timerfd ops, or None where the platform lacks timerfd."""
    try:
        return LinuxTimerFd()
    except (OSError, AttributeError):  # no libc symbol (non-Linux) or no CDLL(None)
        return None


class Ticker:
    """Calls ``callback(TickInfo)`` every ``period_s`` at absolute monotonic deadlines.

    ``timer`` and ``clock`` are test seams: a fake :class:`TimerFdOps` and a fake
    ``time.monotonic``. Production code leaves them unset.
    """

    def __init__(
        self,
        period_s: float,
        callback: Callable[[TickInfo], None],
        *,
        name: str = "decision",
        loop: asyncio.AbstractEventLoop | None = None,
        use_timerfd: bool | None = None,
        timer: TimerFdOps | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not (period_s > 0 and math.isfinite(period_s)):
            raise ValueError(f"period_s must be a positive finite number, got {period_s!r}")
        self._period = period_s
        self._callback = callback
        self._name = name
        self._loop = loop
        self._clock: Callable[[], float] = clock or time.monotonic
        self._timer: TimerFdOps | None = None
        if use_timerfd is not False:
            self._timer = timer if timer is not None else linux_timerfd()
            if self._timer is None:
                if use_timerfd:
                    raise OSError(f"ticker {name!r}: timerfd requested but unavailable")
                logger.warning(
                    "ticker %r: timerfd is unavailable; falling back to loop.call_at "
                    "(expect ~ms lateness)", name)
        self._fd: int | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._running_loop: asyncio.AbstractEventLoop | None = None
        self._t0 = 0.0
        self._index = 0
        self._overruns = 0
        self._started = False
        self._stopped = False
        self._last_error_log = -math.inf
        self._suppressed_errors = 0

    @property
    def backend(self) -> str:
        return "timerfd" if self._timer is not None else "call_at"

    @property
    def overruns(self) -> int:
        """Total missed periods (skipped deadlines) since start()."""
        return self._overruns

    @property
    def period_s(self) -> float:
        return self._period

    def start(self) -> None:
        """Arm the timer. Must be called from within the running loop."""
        running = asyncio.get_running_loop()  # raises RuntimeError outside a running loop
        if self._loop is not None and self._loop is not running:
            raise RuntimeError(f"ticker {self._name!r}: start() called outside its loop")
        if self._started:
            raise RuntimeError(f"ticker {self._name!r}: already started")
        self._started = True
        self._running_loop = running
        self._t0 = self._clock()
        self._index = 0
        if self._timer is not None:
            self._start_timerfd(running, self._timer)
        else:
            self._schedule_call_at(running)

    def stop(self) -> None:
        """Idempotent. Removes the reader before closing the fd (an fd number can be reused)."""
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._fd is not None and self._timer is not None:
            fd, self._fd = self._fd, None
            if self._running_loop is not None and not self._running_loop.is_closed():
                self._running_loop.remove_reader(fd)
            self._timer.close(fd)

    # timerfd backend -------------------------------------------------------------------------

    def _start_timerfd(self, loop: asyncio.AbstractEventLoop, timer: TimerFdOps) -> None:
        fd = timer.create()
        try:
            timer.settime(fd, self._t0 + self._period, self._period)
            loop.add_reader(fd, self._on_timerfd_readable)
        except BaseException:
            timer.close(fd)
            raise
        self._fd = fd

    def _on_timerfd_readable(self) -> None:
        if self._fd is None or self._timer is None:
            return
        # Always read: the fd is level-triggered, an unread count would spin the loop.
        try:
            expirations = self._timer.read(self._fd)
        except OSError:
            logger.exception("ticker %r: reading the timerfd failed", self._name)
            return
        if expirations <= 0:
            return
        self._advance(expirations)

    # call_at fallback ------------------------------------------------------------------------

    def _schedule_call_at(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = self._t0 + (self._index + 1) * self._period
        # loop.time() is monotonic but may not share time.monotonic()'s origin (uvloop), so
        # translate the absolute deadline into the loop's clock at scheduling time.
        when = loop.time() + (deadline - self._clock())
        self._handle = loop.call_at(when, self._on_call_at)

    def _on_call_at(self) -> None:
        self._handle = None
        if self._stopped or self._running_loop is None:
            return
        now = self._clock()
        # Every deadline that has passed counts as an expiration, like a timerfd's count; an
        # early wake-up (uvloop rounds to ms) still counts as the one tick it was scheduled for.
        due_index = math.floor((now - self._t0) / self._period)
        expirations = max(1, due_index - self._index)
        self._advance(expirations)
        if not self._stopped:
            self._schedule_call_at(self._running_loop)

    # shared ----------------------------------------------------------------------------------

    def _advance(self, expirations: int) -> None:
        self._index += expirations
        self._overruns += expirations - 1
        deadline = self._t0 + self._index * self._period
        now = self._clock()
        info = TickInfo(
            index=self._index,
            deadline=deadline,
            now=now,
            lateness_s=max(0.0, now - deadline),
            expirations=expirations,
        )
        try:
            self._callback(info)
        except Exception:
            self._log_callback_error()

    def _log_callback_error(self) -> None:
        now = self._clock()
        if now - self._last_error_log < _ERROR_LOG_INTERVAL_S:
            self._suppressed_errors += 1
            return
        suppressed, self._suppressed_errors = self._suppressed_errors, 0
        self._last_error_log = now
        logger.exception(
            "ticker %r: tick callback raised (ticker keeps running; %d similar errors "
            "suppressed since the last report)", self._name, suppressed)
