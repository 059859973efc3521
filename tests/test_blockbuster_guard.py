"""The blocking-call guard itself works: a blocking call from our package inside the loop fails."""

import asyncio
import time

import pytest
from blockbuster import BlockingError

from cerebellumd import accel as model


async def test_blocking_sleep_in_loop_from_our_code_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def blocking() -> None:
        time.sleep(0.001)

    # Pretend the blocking function lives in our package, where the guard scans.
    blocking.__module__ = model.__name__
    code = blocking.__code__.replace(co_filename=model.__file__)
    blocking.__code__ = code
    with pytest.raises(BlockingError):
        blocking()
    await asyncio.sleep(0)
