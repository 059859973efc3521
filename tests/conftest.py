"""Shared fixtures. Every test runs under blockbuster: a blocking call (file, socket, sleep,
...) made by cerebellumd's own code inside a running event loop fails the test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from blockbuster import BlockBuster, blockbuster_ctx


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    with blockbuster_ctx("cerebellumd") as bb:
        yield bb
