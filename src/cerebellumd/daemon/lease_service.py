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
- Caps: the assembly passes three narrow callables, never the daemon: the accelerator domain's
  energy (joules, from the ledger), the 12 V budget (Wh or None; absent until a budget part
  exists: leases are then granted) and the MCU's next-wake hook. Energy and budget caps are
  checked at every tick; time caps also by the server's own timer. Ends are exported as
  `cerebellumd_lease_ended_total{reason}`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..config import LeaseConfig
from ..policies.types import Hold
from .clock import Clock
from .control import DEFAULT_TTL_S, Command, CommandProcessor, is_lease_priority
from .host import Events, HoldsHost, Hooks, Undo
from .leases import HOLD_PRIORITY, BudgetSource, EndReason, EnergySource, LeasePriority, LeaseServer, WakeAt
from .metrics import Metrics
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)


class LeaseHost(Events, HoldsHost, Protocol):
    """What the lease part needs of the daemon: telemetry ticks and the hold sources."""


class LeaseService:
    def __init__(self, config: LeaseConfig, *, host: LeaseHost, clock: Clock, metrics: Metrics,
                 energy_j: EnergySource | None = None, budget_wh: BudgetSource | None = None,
                 wake_at: WakeAt | None = None, commands: CommandProcessor | None = None) -> None:
        self.config = config
        self._host = host
        self._clock = clock
        self._commands = commands
        self.server = LeaseServer(config, clock=clock.now, energy_j=energy_j, budget_wh=budget_wh, wake_at=wake_at,
                                  wall_seconds=clock.wall_seconds)
        self._listeners: Hooks[Callable[[], None]] = Hooks()  # told on every lease-table change
        self._operator: dict[str, Hold] = {}
        self._watch: asyncio.Task[None] | None = None
        self._undo: list[Undo] = []
        self.m_leases = metrics.gauge("cerebellumd_leases_active", "Application leases in force, by priority.",
                                      ["priority"])
        self.m_errors = metrics.counter("cerebellumd_lease_errors", "Rejected lease requests by kind.", ["kind"])
        self.m_overrides = metrics.counter("cerebellumd_lease_overrides",
                                           "Operator commands that started the lease override grace.")
        self.m_ended = metrics.counter("cerebellumd_lease_ended", "Leases ended, by reason (released, "
                                       "disconnect, expired, duration_cap, energy_cap, budget).", ["reason"])
        self._errors_seen: dict[str, int] = {}
        self._ended_seen: dict[str, int] = {}
        for p in LeasePriority:
            self.m_leases.labels(p.value).set(0)
        for r in EndReason:
            self.m_ended.labels(r.value)

    def on_change(self, listener: Callable[[], None]) -> Undo:
        return self._listeners.add(listener)

    async def async_start(self) -> None:
        self._undo += [self._host.add_hold_source(self.holds), self._host.on_telemetry(self._on_telemetry),
                       self._host.on_tick(self.server.enforce)]
        if self._commands is not None:
            self._undo.append(self._commands.set_lease_handler(self._on_capped_command))
        await self.server.start()
        self._watch = asyncio.create_task(self._watch_changes(), name="lease-changes")
        log.info("lease socket on %s", self.config.path)

    async def async_stop(self) -> None:
        watch, self._watch = self._watch, None
        await cancel_and_wait(watch)
        while self._undo:
            self._undo.pop()()
        await self.server.close()

    async def _watch_changes(self) -> None:
        while True:
            await self.server.wait_changed()
            for listener in self._listeners:
                listener()

    def _on_capped_command(self, cmd: Command, now: float) -> str | None:
        """An MQTT command with a cap becomes a lease named `mqtt:<owner>`; `release` ends them."""
        app = f"mqtt:{cmd.owner}"[:64]
        if cmd.command == "release":
            self.server.release_remote(app)
            return None
        request: dict[str, Any] = {
            "app": app, "reason": cmd.reason, "mode": "sleep" if cmd.command == "sleep" else "awake",
            "priority": (cmd.priority or LeasePriority.NORMAL).value,
            "ttl_s": cmd.ttl_s if cmd.ttl_s is not None else DEFAULT_TTL_S[cmd.command],
            "max_duration_s": cmd.max_duration_s, "max_energy_wh": cmd.max_energy_wh,
            "min_budget_wh": cmd.min_budget_wh,
        }
        reply = self.server.acquire_remote(request, now)
        return None if reply["ok"] else f"{reply['error']}: {reply['detail']}"

    def holds(self, now: float) -> tuple[Hold, ...]:
        """The hold source: lease holds, after noticing operator commands."""
        self._notice_operator(now)
        return self.server.holds(now)

    def _notice_operator(self, now: float) -> None:
        # Lease-ranked holds from remote tools are apps, not manual overrides: no grace.
        current = {h.id: h for h in self._host.operator_holds(now) if not is_lease_priority(h.priority)}
        added = [h for hid, h in current.items() if hid not in self._operator]
        removed = [h for hid, h in self._operator.items() if hid not in current and h.expires_at > now]
        self._operator = current
        for hold in added + removed:
            until = self.server.manual_override(now, hold.owner)
            self.m_overrides.inc()
            log.info("operator %s commanded the accelerator: non-safety leases wait until %.1f s",
                     hold.owner, until - now)

    def state_extra(self) -> dict[str, Any]:
        return {"leases": self.server.snapshot(self._clock.now())}

    def _on_telemetry(self, now: float) -> None:
        counts = dict.fromkeys(LeasePriority, 0)
        for lease in self.server.leases(now):
            counts[lease.priority] += 1
        for priority, n in counts.items():
            self.m_leases.labels(priority.value).set(n)
        _sync(self.server.errors, self._errors_seen, self.m_errors)
        _sync(self.server.ended, self._ended_seen, self.m_ended)


def _sync(counts: Mapping[str, int], seen: dict[str, int], metric: Any) -> None:
    """Add what `counts` gained since the last call to the labelled counter `metric`."""
    for key, n in counts.items():
        before = seen.get(key, 0)
        if n > before:
            metric.labels(key).inc(n - before)
            seen[key] = n


__all__ = ["HOLD_PRIORITY", "LeaseService"]
