"""Wires the lease server (`daemon/leases.py`) into the daemon.

- Leases become holds through a hold source, so they take part in every decision (an awake
  lease keeps the accelerator active, reason `hold:app:<app>`), count in
  `cerebellumd_holds_active` and appear in the snapshot's holds (MQTT `state`).
- The priority rule is the lease server's (safety > normal > power_saver, awake wins a tie) on
  top of the policy's (the highest-priority hold decides). Operator holds from MQTT/CLI have
  priorities 1-2, below every lease: an operator does not silently undo a running app; instead
  each operator command starts the override grace, during which only safety leases count.
  A command with a `priority` (a remote tool's hold, docs/mqtt.md) ranks as a lease of that
  priority instead and, like a lease, starts no grace.
- Operator commands are seen where they land, in the daemon's HoldStore: a hold that appears,
  or one that disappears before its expiry (a `release`), is a manual override.
- Lease expiry uses the daemon's clock, the same clock the policy compares `expires_at` with.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge

from ..policies.types import Hold
from .control import is_lease_priority
from .leases import HOLD_PRIORITY, LeasePriority, LeaseServer
from .tasks import cancel_and_wait

if TYPE_CHECKING:
    from .runtime import Daemon

log = logging.getLogger(__name__)


class LeaseService:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.server = LeaseServer(daemon.config.leases, clock=daemon.clock.now)
        self.listeners: list[Callable[[], None]] = []  # told on every lease-table change
        self._operator: dict[str, Hold] = {}
        self._watch: asyncio.Task[None] | None = None
        r = daemon.metrics.registry
        self.m_leases = Gauge("cerebellumd_leases_active", "Application leases in force, by priority.",
                              ["priority"], registry=r)
        self.m_errors = Counter("cerebellumd_lease_errors", "Rejected lease requests by kind.", ["kind"], registry=r)
        self.m_overrides = Counter("cerebellumd_lease_overrides",
                                   "Operator commands that started the lease override grace.", registry=r)
        self._errors_seen: dict[str, int] = {}
        for p in LeasePriority:
            self.m_leases.labels(p.value).set(0)
        daemon.hold_sources.append(self.holds)
        daemon.telemetry_hooks.append(self._on_telemetry)

    async def async_start(self) -> None:
        await self.server.start()
        self._watch = asyncio.create_task(self._watch_changes(), name="lease-changes")
        log.info("lease socket on %s", self.daemon.config.leases.path)

    async def async_stop(self) -> None:
        watch, self._watch = self._watch, None
        await cancel_and_wait(watch)
        await self.server.close()

    async def _watch_changes(self) -> None:
        while True:
            await self.server.wait_changed()
            for listener in self.listeners:
                listener()

    def holds(self, now: float) -> tuple[Hold, ...]:
        """The hold source: lease holds, after noticing operator commands."""
        self._notice_operator(now)
        return self.server.holds(now)

    def _notice_operator(self, now: float) -> None:
        # Lease-ranked holds from remote tools are apps, not manual overrides: no grace.
        current = {h.id: h for h in self.daemon.holds.active(now) if not is_lease_priority(h.priority)}
        added = [h for hid, h in current.items() if hid not in self._operator]
        removed = [h for hid, h in self._operator.items() if hid not in current and h.expires_at > now]
        self._operator = current
        for hold in added + removed:
            until = self.server.manual_override(now, hold.owner)
            self.m_overrides.inc()
            log.info("operator %s commanded the accelerator: non-safety leases wait until %.1f s",
                     hold.owner, until - now)

    def state_extra(self) -> dict[str, Any]:
        return {"leases": self.server.snapshot(self.daemon.clock.now())}

    def _on_telemetry(self, now: float) -> None:
        counts = dict.fromkeys(LeasePriority, 0)
        for lease in self.server.leases(now):
            counts[lease.priority] += 1
        for priority, n in counts.items():
            self.m_leases.labels(priority.value).set(n)
        for kind, n in self.server.errors.items():
            seen = self._errors_seen.get(kind, 0)
            if n > seen:
                self.m_errors.labels(kind).inc(n - seen)
                self._errors_seen[kind] = n


def attach_leases(daemon: Daemon) -> LeaseService | None:
    """Called from Daemon._attach_services: only with `[leases] enabled = true`."""
    if not daemon.config.leases.enabled:
        return None
    service = LeaseService(daemon)
    daemon.services.append(service)
    return service


__all__ = ["HOLD_PRIORITY", "LeaseService", "attach_leases"]
