"""`Daemon`: the core (`daemon/core.py`) with its composition root (`daemon/assembly.py`).

This is the object the CLI, the demo and the tests create; its parts never see it, only the
Protocols of `daemon/host.py`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from ..config import Config
from ..profiles import load_profile
from .assembly import Assembly, ReloadResult
from .core import DaemonCore, PolicyCore, build_driver
from .host import Snapshot, Undo


class Daemon(DaemonCore):
    """The core plus its parts. Built like the core (inside a running loop, with `async_create`:
    the profile is a file read)."""

    @functools.cached_property
    def assembly(self) -> Assembly:
        """The composition root of the parts (built once, on first use)."""
        return Assembly(self)

    @classmethod
    async def async_create(cls, config: Config, **kwargs: Any) -> Daemon:
        if kwargs.get("model") is None:
            kwargs["model"] = await asyncio.to_thread(load_profile, config.accelerator.profile)
        return cls(config, **kwargs)

    @property
    def parts(self) -> tuple[object, ...]:
        """The running parts, in start order (introspection and tests; parts never scan it)."""
        return self.assembly.parts

    async def async_start(self) -> None:
        await self.assembly.async_start()

    async def async_stop(self) -> None:
        """Every step runs even when one before it fails; the safe state is the last."""
        await self.assembly.async_stop()

    async def async_run(self, stop: asyncio.Event, started: Callable[[], object] | None = None) -> None:
        """Start, run until `stop`, stop. `started` (the CLI's after-start-up step) runs on the
        loop right after the first decision tick, so it never delays that tick."""
        await self.async_start()
        if started is not None:
            self._after_first_tick(started)
        try:
            await stop.wait()
        finally:
            await self.async_stop()

    def _after_first_tick(self, fn: Callable[[], object]) -> None:
        loop = asyncio.get_running_loop()
        undo: list[Undo] = []

        def fire() -> None:
            if undo:  # once, however many ticks ran before this callback
                undo.pop()()
                fn()

        def hook(_now: float) -> None:
            loop.call_soon(fire)

        undo.append(self.on_tick(hook))

    async def async_reload(self, path: str | None = None) -> bool:
        """SIGHUP: validate, classify, swap between ticks or keep the old config whole."""
        return (await self.reload(path)).applied

    async def reload(self, path: str | None = None) -> ReloadResult:
        return await self.assembly.async_reload(path)


__all__ = ["Daemon", "PolicyCore", "ReloadResult", "Snapshot", "build_driver"]
