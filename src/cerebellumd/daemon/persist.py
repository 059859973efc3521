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
import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from .host import CoreTotals, TotalsHost
from .metrics import Metrics
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: Restored label sets are capped: a state file must not be able to blow up the registry.
MAX_RESTORED_LABELS = 256
ERROR_KINDS = ("corrupt", "schema", "unreadable", "write")


#: `Persistence.restored_section` markers.
MISSING: Any = object()
CORRUPT: Any = object()


class StateFileError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Totals:
    joules: dict[str, float] = field(default_factory=dict)
    wakes: int = 0
    sleeps: int = 0
    wakes_by_reason: dict[str, float] = field(default_factory=dict)
    #: (state, reason) -> count; stored as a list of [state, reason, count] (JSON has no tuples).
    sleeps_by_state_reason: dict[tuple[str, str], float] = field(default_factory=dict)
    #: Parts' own sections, raw JSON values (validated by their part, not here).
    sections: dict[str, Any] = field(default_factory=dict)
    #: The file's `sections` was there but not an object: every part's section counts as corrupt.
    sections_corrupt: bool = False

    def to_json(self, node: str) -> str:
        return json.dumps({
            "schema": SCHEMA_VERSION,
            "node": node,
            "saved_at": time.time(),
            "joules": self.joules,
            "wakes": self.wakes,
            "sleeps": self.sleeps,
            "wakes_by_reason": self.wakes_by_reason,
            "sleeps_by_state_reason": [[s, r, n] for (s, r), n in self.sleeps_by_state_reason.items()],
            "sections": self.sections,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Totals:
        """Strict: anything not exactly as written by `to_json` is a StateFileError."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise StateFileError("corrupt", f"not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise StateFileError("corrupt", "top level is not an object")
        if raw.get("schema") != SCHEMA_VERSION:
            raise StateFileError("schema", f"schema {raw.get('schema')!r}, this version reads {SCHEMA_VERSION}")
        try:
            joules = {str(k): _amount(v) for k, v in _mapping(raw["joules"]).items()}
            wakes = int(_amount(raw["wakes"]))
            sleeps = int(_amount(raw["sleeps"]))
            by_reason = {str(k): _amount(v) for k, v in _mapping(raw.get("wakes_by_reason", {})).items()}
            by_state: dict[tuple[str, str], float] = {}
            for item in raw.get("sleeps_by_state_reason", []):
                if not (isinstance(item, list) and len(item) == 3):
                    raise ValueError("sleeps_by_state_reason entries are [state, reason, count]")
                by_state[(str(item[0]), str(item[1]))] = _amount(item[2])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateFileError("corrupt", f"bad content: {exc!r}") from None
        if len(by_reason) > MAX_RESTORED_LABELS or len(by_state) > MAX_RESTORED_LABELS:
            raise StateFileError("corrupt", "too many label sets")
        sections = raw.get("sections", {})
        if not isinstance(sections, dict):  # the counters are good: only the parts' sections are lost
            return cls(joules, wakes, sleeps, by_reason, by_state, {}, True)
        return cls(joules, wakes, sleeps, by_reason, by_state, {str(k): v for k, v in sections.items()})


def _mapping(value: object) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def _amount(value: object) -> float:
    # bool is an int in Python; a counter of `true` is a corrupt file, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"counter value {value!r} is not a finite non-negative number")
    return number


# -- file operations (run in a worker thread) --------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_totals(path: Path) -> Totals | None:
    """None when there is no file yet (first start); StateFileError when it is bad."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError("unreadable", f"cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise StateFileError("corrupt", "not UTF-8") from None
    return Totals.from_json(text)


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
