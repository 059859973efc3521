"""Poll until a deadline: the one loop every driver waits with (GPIO power-good, PCI sysfs
state, Jetson status, PCIe runtime PM)."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from .base import DriverError

T = TypeVar("T")


class PollTimeout(DriverError, Generic[T]):
    """The condition did not hold by the deadline; `last` is the last value read."""

    def __init__(self, message: str, last: T) -> None:
        super().__init__(message)
        self.last = last


async def poll_until(
    read: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    timeout_s: float,
    interval_s: float,
    what: str,
) -> T:
    """Read, and read again every `interval_s`, until `done(value)`; return that value.
    Past `timeout_s` raise PollTimeout ("<what> not reached after N s (reads <last>)").
    The value is always read at least once, and once more at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await read()
        if done(value):
            return value
        now = loop.time()
        if now >= deadline:
            raise PollTimeout(f"{what} not reached after {timeout_s:.3g} s (reads {_show(value)})", value)
        await asyncio.sleep(min(interval_s, deadline - now))


async def poll_blocking(check: Callable[[], bool], *, timeout_s: float, interval_s: float, what: str) -> None:
    """poll_until for a blocking predicate (file I/O): each call runs in a worker thread."""
    await poll_until(lambda: asyncio.to_thread(check), bool, timeout_s=timeout_s, interval_s=interval_s, what=what)


def _show(value: object) -> str:
    if isinstance(value, enum.Enum):  # AccelState (a StrEnum): its word; gpiod Value: its name
        return str(value.value) if isinstance(value, str) else value.name
    return repr(value) if isinstance(value, str) else str(value)
