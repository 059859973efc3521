"""The live terminal view (rich): speed, active demands, accelerator state with the reason of
the last decision, per-domain watts and joules."""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..accel import AccelState
from .host import Snapshot

_STATE_STYLE = {
    AccelState.ACTIVE: "bold red", AccelState.IDLE: "yellow", AccelState.SLEEP: "green",
    AccelState.OFF: "blue", AccelState.WAKING: "bold magenta", AccelState.SUSPENDING: "magenta",
    AccelState.UNKNOWN: "bold white on red",
}


def render(snap: Snapshot, title: str = "cerebellumd", speed_signal: str = "speed_kmh", start: float = 0.0) -> Panel:
    """`start` is the policy time shown as t=0 (the demo's plant start)."""
    head = Table.grid(padding=(0, 2))
    head.add_row(
        Text(f"t={snap.time - start:8.1f} s"),
        Text(f"speed {snap.signals.get(speed_signal, float('nan')):6.1f} km/h"),
        Text(f"accelerator {snap.state.value}", style=_STATE_STYLE.get(snap.state, "")),
        Text(f"target {snap.target.value}"),
    )
    why = Text(f"reason: {snap.reason}")
    demands = Text("demands: " + (", ".join(snap.active_demands) or "none"),
                   style="bold" if snap.active_demands else "dim")
    stale = Text("stale: " + (", ".join(snap.stale_signals) or "none"),
                 style="bold red" if snap.stale_signals else "dim")
    power = Table("domain", "source", "W", "J", title="power", expand=False)
    for domain, watts in snap.watts.items():
        power.add_row(domain, "sensor" if domain in snap.measured else "model",
                      f"{watts:7.2f}", f"{snap.joules.get(domain, 0.0):10.1f}")
    power.add_row("total", "", f"{sum(snap.watts.values()):7.2f}", f"{sum(snap.joules.values()):10.1f}")
    counts = Text(
        f"wakes {snap.wakes}  sleeps {snap.sleeps}  frames {snap.frames}  can errors {snap.can_errors}  "
        f"holds {len(snap.holds)}"
        + (f"  last wake {snap.last_wake_latency_s * 1000:.0f} ms" if snap.last_wake_latency_s else ""))
    return Panel(Group(head, why, demands, stale, power, counts), title=title)
