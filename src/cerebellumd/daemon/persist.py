"""Persistence of the energy totals across restarts (config `daemon.state_file`).

What is kept: joules per domain, wake and sleep counts (also per reason, so the Prometheus
counters of the contract continue instead of restarting at 0). Written every
`persist_interval_s` (wall seconds) and on clean stop, so a SIGKILL or a power cut loses at most
one interval.

Why each step of the write (`write_atomic`): a temp file in the *same directory* (os.replace is
atomic only within one file system), fsync of the file (its data is on disk before the rename
points at it), os.replace (readers see the old or the new file, never a half one), fsync of the
directory (the rename itself survives a power cut). All file I/O runs in a worker thread: the
decision loop never waits for a disk.

Parts may keep a section of their own in the file (`add_section`: the battery budget): it is
written under `sections.<key>` and handed back raw after a restart (`restored_section`); the part
validates it and decides what a bad one means. Files without `sections` (older versions) read as
before, and older versions ignore the key: the schema stays 1.

A state file that is corrupt, partial, of an unknown schema or unreadable is reported (log +
`cerebellumd_state_file_errors_total{kind}`), moved aside to `<file>.corrupt` for forensics and
replaced by a fresh one; it is never fatal: losing counters is bad, not starting is worse.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from ..config.state_file import StateFileError, Totals, read_totals, write_atomic
from .host import CoreTotals, TotalsHost
from .metrics import Metrics
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

ERROR_KINDS = ("corrupt", "schema", "unreadable", "write")


#: `Persistence.restored_section` markers.
MISSING: Any = object()
CORRUPT: Any = object()


# -- file operations (run in a worker thread) --------------------------------------------------


def move_aside(path: Path) -> Path | None:
    aside = path.with_name(path.name + ".corrupt")
    try:
        os.replace(path, aside)
    except OSError:
        return None
    return aside


# -- the service -------------------------------------------------------------------------------


class Persistence:
    """Part: restore at start, save every interval and at stop."""

    def __init__(self, path: Path, interval_s: float, node: str, host: TotalsHost, metrics: Metrics) -> None:
        self.path = path
        self.interval_s = interval_s
        self.node = node
        self._host = host
        self._metrics = metrics
        self.errors = metrics.counter(
            "cerebellumd_state_file_errors", "State file problems by kind (corrupt, schema, unreadable, write).",
            ["kind"])
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        self.writes = metrics.counter("cerebellumd_state_file_writes", "Successful state file writes.")
        self.restored: Totals | None = None
        self._sections: dict[str, Callable[[], Any]] = {}
        self._left: dict[str, Any] = {}  # the last value of a section whose part has stopped
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def async_start(self) -> None:
        try:
            totals = await asyncio.to_thread(read_totals, self.path)
        except StateFileError as exc:
            self.errors.labels(exc.kind).inc()
            aside = await asyncio.to_thread(move_aside, self.path) if exc.kind != "unreadable" else None
            log.error("state file %s: %s; starting from zero%s", self.path, exc,
                      f" (bad file kept as {aside})" if aside else "")
            totals = None
        if totals is not None:
            self._restore(totals)
            self.restored = totals
            log.info("state file %s: resumed %s", self.path,
                     ", ".join(f"{k}={v:.1f} J" for k, v in sorted(totals.joules.items())) or "no energy")
        await self.async_save()  # a fresh, good file from the first second on
        self._task = asyncio.create_task(self._run(), name="persist")

    def add_section(self, key: str, dump: Callable[[], Any]) -> Callable[[], None]:
        """A part's own section, written with every save (`dump` runs on the loop and returns
        JSON-able data). Returns the undo."""
        self._sections[key] = dump
        self._left.pop(key, None)

        def undo() -> None:
            # The part stops before us (reverse start order): its last value is still saved.
            if self._sections.get(key) is dump:
                self._left[key] = dump()
                del self._sections[key]

        return undo

    def restored_section(self, key: str) -> Any:
        """The raw value saved under `key` before this start: MISSING when there was none (first
        start, an older file, or the file itself was bad and moved aside), CORRUPT when the
        file's sections could not be read."""
        restored = self.restored
        if restored is None:
            return MISSING
        if restored.sections_corrupt:
            return CORRUPT
        return restored.sections.get(key, MISSING)

    async def async_stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        await self.async_save()  # `snapshot` integrates: the file holds the energy up to now

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.async_save()

    def _restore(self, totals: Totals) -> None:
        m = self._metrics
        self._host.restore_totals(CoreTotals(totals.joules, totals.wakes, totals.sleeps))
        for reason, n in totals.wakes_by_reason.items():
            m.wakes.labels(reason).inc(n)
        for (state, reason), n in totals.sleeps_by_state_reason.items():
            m.sleeps.labels(state, reason).inc(n)

    def snapshot(self) -> Totals:
        """Taken on the loop (consistent with the daemon's own state), written off it."""
        core, m = self._host.totals(), self._metrics
        return Totals(
            joules=dict(core.joules),
            wakes=core.wakes,
            sleeps=core.sleeps,
            wakes_by_reason=_counter_values(m.wakes, ("reason",), lambda labels: labels[0]),
            sleeps_by_state_reason=_counter_values(m.sleeps, ("state", "reason"), tuple),
            sections={**self._left, **{key: dump() for key, dump in self._sections.items()}},
        )

    async def async_save(self) -> bool:
        text = self.snapshot().to_json(self.node)
        async with self._lock:  # an interval save and the stop save never interleave
            try:
                await asyncio.to_thread(write_atomic, self.path, text)
            except OSError as exc:
                self.errors.labels("write").inc()
                log.error("state file %s: write failed: %s", self.path, exc)
                return False
        self.writes.inc()
        return True


def _counter_values(counter: Counter, names: tuple[str, ...], key: Any) -> dict[Any, float]:
    out: dict[Any, float] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.value > 0:
                out[key(tuple(sample.labels[n] for n in names))] = sample.value
    return out
