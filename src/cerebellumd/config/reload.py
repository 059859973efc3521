"""What a reload may change while the daemon runs (pure: two validated configs in, a plan out).

Each key of the config is either applied live or needs a restart. A reload whose changes touch
any restart key is refused as a whole (the running config stays, every key of it), and the
refusal names those keys; otherwise every change is applied live, none half.

Live, and how (daemon/assembly.py does it):
- `signals`, `demands`, `policy`, `guards`: a new policy core built before the swap; new signals
  are routed to their CAN bus, SOME/IP field or MCU reading and decoded from the next frame on;
  new series for new demands and signals;
- `power` (domains, rail map, rail sensors): the ledger keeps every total and starts new
  domains at zero; the power readers and the rail map are rebuilt;
- `mqtt`: the bridge is rebuilt (it reconnects); operators and the command rate apply at once;
- `someip`: the endpoints are rebuilt;
- `daemon.tick_ms`, `daemon.telemetry_interval_ms`: the tickers restart on the new periods;
  `daemon.safe_state`, `daemon.persist_interval_s`: used from the next stop or save on;
- `accelerator.command_timeout_ms`, `retries`, `retry_backoff_ms`: from the next command on.

Restart: what opens devices, sockets or files the daemon holds for its lifetime, or carries state
that a rebuild would lose (a lease table, the NM state, the watchdog's alarm): the rest. Among
them `vehicle_power` (the CAN latch, the debounce timers and the key-on clock would restart, and a
car parked for hours would look undefined) and `battery` (the integrating budget, the parked clock
and the low-voltage timer; the budget also decides whether the gateway may power down, which a
half-applied change must never flip). `nm` is
restart-only as a whole, every key of it (the AUTOSAR timers, active-mode keys and the partial
networking filter included): its state machine and the bus tap live as long as the daemon.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import Config

#: Top-level sections that apply live as a whole.
LIVE_SECTIONS = frozenset({"signals", "demands", "policy", "guards", "power", "mqtt", "someip"})
#: Keys inside a section that apply live (the section's other keys need a restart).
LIVE_KEYS: Mapping[str, frozenset[str]] = {
    "daemon": frozenset({"tick_ms", "telemetry_interval_ms", "safe_state", "persist_interval_s"}),
    "accelerator": frozenset({"command_timeout_ms", "retries", "retry_backoff_ms"}),
}


@dataclass(frozen=True)
class ReloadPlan:
    """`changed`: every changed key (dotted: a whole section, or `section.key` inside the
    sections of LIVE_KEYS); `restart`: those of them that need a restart."""

    changed: tuple[str, ...]
    restart: tuple[str, ...]

    @property
    def sections(self) -> frozenset[str]:
        """The top-level sections with a change."""
        return frozenset(key.split(".", 1)[0] for key in self.changed)

    @property
    def refused(self) -> bool:
        return bool(self.restart)

    def message(self) -> str:
        if self.restart:
            return ("reload refused, nothing applied: "
                    f"{', '.join(self.restart)} need{'s' if len(self.restart) == 1 else ''} a restart")
        if not self.changed:
            return "reload: no change"
        return f"reload applied live: {', '.join(self.changed)}"


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    before: dict[str, Any] = old.model_dump(mode="json", by_alias=True)
    after: dict[str, Any] = new.model_dump(mode="json", by_alias=True)
    changed: list[str] = []
    restart: list[str] = []
    for section in sorted(set(before) | set(after)):
        a, b = before.get(section), after.get(section)
        if a == b:
            continue
        live_keys = LIVE_KEYS.get(section)
        if live_keys is not None and isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    dotted = f"{section}.{key}"
                    changed.append(dotted)
                    if key not in live_keys:
                        restart.append(dotted)
            continue
        changed.append(section)
        if section not in LIVE_SECTIONS:
            restart.append(section)
    return ReloadPlan(tuple(changed), tuple(restart))

