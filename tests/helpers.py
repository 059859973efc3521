"""Helpers shared by the tests: poll with a deadline (never sleep to wait), free ports, a CAN
adapter that can fail under its reader."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import can
from can.interfaces.virtual import VirtualBus


async def until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll `predicate` every 5 ms until it holds; fail with `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(0.005)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free on 127.0.0.1 a moment ago (TCP by default, UDP with SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FailingBus(can.BusABC):
    """A python-can virtual bus whose receive raises CanOperationError while `failing()` says so
    (an adapter unplugged under its reader), for CanIngest's `bus_factory`. It opens its virtual
    bus directly, not through `can.Bus`, which a test may have patched to return this class."""

    def __init__(self, channel: str, failing: Callable[[], bool]) -> None:
        self._failing = failing
        self._inner = VirtualBus(channel=channel)
        super().__init__(channel=channel)

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        if self._failing():
            raise can.CanOperationError("adapter unplugged")
        return self._inner._recv_internal(timeout)

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        self._inner.send(msg, timeout)

    def shutdown(self) -> None:
        self._inner.shutdown()
        super().shutdown()
